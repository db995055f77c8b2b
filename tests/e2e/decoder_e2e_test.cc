// ape-decoder end to end: real redis-server, ape-encoder and ape-decoder
// processes on free loopback ports; an independent PyTorch reference.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>

#include "ape/v1/decoder.grpc.pb.h"
#include "ape/v1/encoder.grpc.pb.h"
#include "common/engine/model.h"
#include "tests/process_util.h"
#include "tests/test_util.h"

namespace ape {
namespace {

using ::ape::testing::PeakRss;
using ::ape::testing::Process;
using ::ape::testing::RedisServer;
using ::ape::testing::TestData;
using ::ape::testing::WideWindowModel;

class Server {
 public:
  Server(const std::string& binary, const RedisServer& redis, std::vector<std::string> extra) {
    port_ = testing::FreePort();
    log_ = redis.dir() + "/" + binary + "-" + std::to_string(port_) + ".log";
    std::vector<std::string> argv = {std::string(APE_BIN_DIR) + "/" + binary,
                                     "--listen=127.0.0.1:" + std::to_string(port_),
                                     "--redis=" + redis.uri(),
                                     "--model=" + TestData("stories260K.bin"),
                                     "--tokenizer=" + TestData("tok512.bin"),
                                     "--redis_timeout_ms=1000"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    proc_.Start(argv, log_);
    ok_ = testing::WaitForPort(port_, proc_);
    channel_ = grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  bool ok() const { return ok_; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }
  std::string Log() { return testing::ReadAll(log_); }
  pid_t pid() const { return proc_.pid(); }

 private:
  int port_;
  std::string log_;
  bool ok_;
  Process proc_;
  std::shared_ptr<grpc::Channel> channel_;
};

struct Stream {
  grpc::Status status;
  std::vector<v1::TokenDelta> tokens;
  v1::Final final;
  bool has_final = false;
  std::string text() const {
    std::string t;
    for (auto& d : tokens) t += d.text();
    return t;
  }
  std::vector<int32_t> ids() const {
    std::vector<int32_t> v;
    for (auto& d : tokens)
      if (d.id() >= 0) v.push_back(d.id());
    return v;
  }
};

Stream Generate(v1::Decoder::Stub& stub, const v1::GenerateRequest& req, int cancel_after = -1,
                std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  auto reader = stub.Generate(&ctx, req);
  Stream s;
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (msg.has_token()) s.tokens.push_back(msg.token());
    if (msg.has_final()) {
      s.final = msg.final();
      s.has_final = true;
    }
    if (cancel_after >= 0 && static_cast<int>(s.tokens.size()) >= cancel_after) ctx.TryCancel();
  }
  s.status = reader->Finish();
  return s;
}

// "Once upon a time" `n` times: 4n tokens after BOS with tok512.
std::string Repeated(int n) {
  std::string text = "Once upon a time";
  for (int i = 1; i < n; ++i) text += " Once upon a time";
  return text;
}

const char* kPrefix = "Once upon a time";
const std::vector<std::string> kDocs = {" there was a girl named Lily. She had a big red ball.",
                                        " Tom had a dog. The dog liked to run in the park.",
                                        " The sun was hot and the sky was blue."};

class DecoderE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(redis_.ok());
    encoder_ = std::make_unique<Server>("ape-encoder", redis_, std::vector<std::string>{});
    decoder_ = std::make_unique<Server>("ape-decoder", redis_,
                                        std::vector<std::string>{"--encoder=" + encoder_->address(), "--max_queue=16"});
    ASSERT_TRUE(encoder_->ok() && decoder_->ok()) << decoder_->Log();
    enc_ = v1::Encoder::NewStub(encoder_->channel());
    dec_ = v1::Decoder::NewStub(decoder_->channel());
  }
  std::vector<std::string> EncodeDocs(v1::KvDtype dtype, const std::string& prefix = kPrefix) {
    v1::EncodeRequest req;
    req.mutable_prefix()->set_text(prefix);
    for (auto& d : kDocs) req.add_contexts()->set_text(d);
    req.set_dtype(dtype);
    v1::EncodeResponse resp;
    grpc::ClientContext ctx;
    EXPECT_TRUE(enc_->Encode(&ctx, req, &resp).ok());
    std::vector<std::string> keys;
    for (auto& c : resp.contexts()) keys.push_back(c.key());
    return keys;
  }
  std::vector<int32_t> Tokenize(const std::string& text, bool bos) {
    v1::TokenizeRequest req;
    req.set_text(text);
    req.set_add_bos(bos);
    v1::TokenizeResponse resp;
    grpc::ClientContext ctx;
    EXPECT_TRUE(enc_->Tokenize(&ctx, req, &resp).ok());
    return {resp.ids().begin(), resp.ids().end()};
  }
  // Commands Redis has served (INFO commandstats), INFO itself not counted.
  int64_t RedisCommands() {
    FILE* p = popen(("redis-cli -p " + std::to_string(redis_.port()) + " INFO commandstats").c_str(), "r");
    std::string out;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
    pclose(p);
    int64_t calls = 0;
    for (size_t at = out.find("cmdstat_"); at != std::string::npos; at = out.find("cmdstat_", at + 1)) {
      const size_t colon = out.find(":calls=", at);
      if (out.compare(at, colon - at, "cmdstat_info") != 0) calls += std::stoll(out.substr(colon + 7));
    }
    return calls;
  }
  grpc::Status Score(const v1::GenerateRequest& req, v1::ScoreResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    return dec_->Score(&ctx, req, resp);
  }
  v1::GenerateRequest Request(const std::vector<std::string>& keys, v1::Mode mode, int max_tokens = 12) {
    v1::GenerateRequest req;
    req.set_prefix(kPrefix);
    for (auto& k : keys) req.add_contexts()->set_key(k);
    req.set_query(" One day, Lily");
    req.set_mode(mode);
    req.set_max_tokens(max_tokens);
    return req;
  }
  RedisServer redis_;
  std::unique_ptr<Server> encoder_, decoder_;
  std::unique_ptr<v1::Encoder::Stub> enc_;
  std::unique_ptr<v1::Decoder::Stub> dec_;
};

// Every mode against the PyTorch reference, token by token, within 1e-3.
TEST_F(DecoderE2eTest, AgreesWithPyTorchReference) {
  auto keys = EncodeDocs(v1::KV_DTYPE_FLOAT32);
  nlohmann::json base;
  base["model"] = TestData("stories260K.bin");
  base["prefix"] = Tokenize(kPrefix, true);
  base["contexts"] = nlohmann::json::array();
  for (auto& d : kDocs) base["contexts"].push_back(Tokenize(d, false));
  base["query"] = Tokenize(" One day, Lily", false);
  for (auto [mode, name, T, S] :
       std::vector<std::tuple<v1::Mode, const char*, float, float>>{{v1::MODE_SEQUENTIAL, "SEQUENTIAL", 1, 1},
                                                                    {v1::MODE_PARALLEL, "PARALLEL", 1, 1},
                                                                    {v1::MODE_APE, "APE", 0.9f, 0.9f},
                                                                    {v1::MODE_APE, "APE", 0.4f, 0.6f}}) {
    v1::GenerateRequest req = Request(keys, mode, 10);
    req.set_dtype(v1::KV_DTYPE_FLOAT32);
    if (mode == v1::MODE_APE) {
      req.set_ape_temperature(T);
      req.set_ape_scale(S);
    }
    Stream s = Generate(*dec_, req);
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    nlohmann::json r = base;
    r["mode"] = name;
    r["T"] = T;
    r["S"] = S;
    r["generated"] = s.ids();
    testing::TempFile in(r.dump());
    std::string cmd =
        "/usr/bin/python3 " + std::string(APE_SOURCE_DIR) + "/tests/reference/ape_reference.py < " + in.path();
    FILE* p = popen(cmd.c_str(), "r");
    std::string out;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
    ASSERT_EQ(pclose(p), 0) << out;
    auto ref = nlohmann::json::parse(out);
    ASSERT_EQ(ref["logprobs"].size(), s.ids().size());
    for (size_t i = 0; i < s.ids().size(); ++i) {
      EXPECT_NEAR(s.tokens[i].logprob(), ref["logprobs"][i].get<float>(), 1e-3f)
          << name << " T=" << T << " token " << i;
      EXPECT_EQ(s.ids()[i], ref["argmax"][i].get<int>()) << name << " token " << i;
    }
  }
}

TEST_F(DecoderE2eTest, StreamsTextUsageTimingsAndFinishReasons) {
  auto keys = EncodeDocs(v1::KV_DTYPE_FLOAT16);
  v1::GenerateRequest req = Request(keys, v1::MODE_APE, 30);
  req.set_top_logprobs(3);
  Stream s = Generate(*dec_, req);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  ASSERT_TRUE(s.has_final);
  EXPECT_EQ(s.final.finish_reason(), "length");
  EXPECT_EQ(s.final.usage().generated_tokens(), 30u);
  EXPECT_EQ(s.final.text(), s.text());
  EXPECT_GT(s.final.usage().cached_tokens(), 0u);
  EXPECT_EQ(s.final.usage().encoded_tokens(), 0u);
  EXPECT_GT(s.final.timings().time_to_first_token_ms(), 0);
  EXPECT_NEAR(s.final.ape_temperature(), 0.9f, 1e-6);
  EXPECT_EQ(s.tokens[0].top_logprobs_size(), 3);
  EXPECT_EQ(s.tokens[0].top_logprobs(0).id(), s.tokens[0].id());  // greedy picks the top
  // The streamed text equals the detokenized ids.
  v1::DetokenizeRequest dr;
  auto q = Tokenize(" One day, Lily", false);
  dr.add_ids(q.back());
  for (int32_t id : s.ids()) dr.add_ids(id);
  v1::DetokenizeResponse dresp;
  grpc::ClientContext c;
  ASSERT_TRUE(enc_->Detokenize(&c, dr, &dresp).ok());
  std::string qpiece;
  {
    v1::DetokenizeRequest one;
    one.add_ids(q.back());
    v1::DetokenizeResponse r1;
    grpc::ClientContext c1;
    ASSERT_TRUE(enc_->Detokenize(&c1, one, &r1).ok());
    qpiece = r1.text();
  }
  EXPECT_EQ(qpiece + s.text(), dresp.text());
  // A stop string cuts the text before it.
  std::string text = s.text();
  std::string stop = text.substr(text.size() / 2, 3);
  req.add_stop(stop);
  Stream st = Generate(*dec_, req);
  ASSERT_TRUE(st.status.ok());
  EXPECT_EQ(st.final.finish_reason(), "stop");
  EXPECT_EQ(st.text(), text.substr(0, text.find(stop)));
  EXPECT_NE(decoder_->Log().find("decoder Generate OK mode=MODE_APE contexts=3"), std::string::npos) << decoder_->Log();
}

TEST_F(DecoderE2eTest, MissingForeignAndCorruptCaches) {
  auto keys = EncodeDocs(v1::KV_DTYPE_FLOAT16);
  // Missing: a well-formed key nobody stored.
  std::string missing = "ape:v1:kv:00112233445566778899aabbccddeeff";
  Stream s = Generate(*dec_, Request({keys[0], missing}, v1::MODE_APE));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(s.status.error_message().find(missing), std::string::npos) << s.status.error_message();
  // Foreign: contexts encoded after another prefix are never used.
  auto other = EncodeDocs(v1::KV_DTYPE_FLOAT16, "A different prefix");
  s = Generate(*dec_, Request({other[0]}, v1::MODE_APE));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.status.error_message();
  // Malformed key.
  s = Generate(*dec_, Request({"not-a-key"}, v1::MODE_APE));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // Bytes that are no KV block under a key: a miss for a key-only context,
  // encoded in memory when the request has the text, and left alone (not
  // ours to overwrite).
  std::string cli = "redis-cli -p " + std::to_string(redis_.port());
  ASSERT_EQ(std::system((cli + " HSET " + keys[1] + " 0 junkjunk >/dev/null").c_str()), 0);
  s = Generate(*dec_, Request({keys[1]}, v1::MODE_APE));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::NOT_FOUND) << s.status.error_message();
  v1::GenerateRequest by_text = Request({}, v1::MODE_APE);
  by_text.add_contexts()->set_text(kDocs[1]);
  s = Generate(*dec_, by_text);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_GT(s.final.usage().encoded_tokens(), 0u);
  s = Generate(*dec_, Request({keys[1]}, v1::MODE_APE));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::NOT_FOUND) << s.status.error_message();
  // An entry of ours damaged by a stray hash field: unreadable by key, and
  // repaired (re-encoded through the encoder with overwrite) when the request
  // has the text.
  ASSERT_EQ(std::system((cli + " HSET " + keys[2] + " stray field >/dev/null").c_str()), 0);
  s = Generate(*dec_, Request({keys[2]}, v1::MODE_APE));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::NOT_FOUND) << s.status.error_message();
  by_text = Request({}, v1::MODE_APE);
  by_text.add_contexts()->set_text(kDocs[2]);
  s = Generate(*dec_, by_text);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_GT(s.final.usage().encoded_tokens(), 0u);
  s = Generate(*dec_, Request({keys[2]}, v1::MODE_APE));  // repaired
  EXPECT_TRUE(s.status.ok()) << s.status.error_message();
  // Bad parameters.
  v1::GenerateRequest bad = Request(keys, v1::MODE_APE);
  bad.set_ape_temperature(-1);
  EXPECT_EQ(Generate(*dec_, bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad = Request(keys, v1::MODE_APE);
  bad.set_query("");
  EXPECT_EQ(Generate(*dec_, bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad = Request(keys, v1::MODE_APE);
  bad.mutable_sampling()->set_top_p(2);
  EXPECT_EQ(Generate(*dec_, bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad = Request(keys, v1::MODE_APE);
  bad.add_contexts();  // empty ref
  EXPECT_EQ(Generate(*dec_, bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

// Score takes Generate's path: a context sent as text that is not cached is
// encoded through --encoder (its log shows the encode, Redis then holds the
// entry), and the distribution is the one Generate's first token comes from.
TEST_F(DecoderE2eTest, ScoreEncodesThroughTheEncoderAndAgreesWithGenerate) {
  const std::string doc = " Sam found a small blue bird in the garden. It could not fly.";
  v1::GenerateRequest req = Request({}, v1::MODE_APE, 1);
  req.add_contexts()->set_text(doc);
  req.set_top_logprobs(20);
  v1::ScoreResponse score;
  grpc::Status st = Score(req, &score);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_EQ(score.logprobs_size(), 512);  // tok512's vocabulary
  EXPECT_EQ(score.usage().cached_tokens(), 0u);
  EXPECT_GT(score.usage().encoded_tokens(), 0u);
  EXPECT_NE(encoder_->Log().find("encoder Encode OK contexts=1 cached=0"), std::string::npos) << encoder_->Log();
  EXPECT_NE(decoder_->Log().find("decoder Score OK mode=MODE_APE contexts=1"), std::string::npos) << decoder_->Log();
  v1::EncodeRequest again;
  again.mutable_prefix()->set_text(kPrefix);
  again.add_contexts()->set_text(doc);
  v1::EncodeResponse cached;
  grpc::ClientContext ectx;
  ASSERT_TRUE(enc_->Encode(&ectx, again, &cached).ok());
  EXPECT_TRUE(cached.contexts(0).already_cached());
  EXPECT_TRUE(cached.prefix().already_cached());
  // Generate, on the same request, now reads the entries back.
  Stream s = Generate(*dec_, req);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.final.usage().encoded_tokens(), 0u);
  EXPECT_EQ(s.final.usage().cached_tokens(), score.usage().encoded_tokens());
  ASSERT_FALSE(s.tokens.empty());
  const v1::TokenDelta& first = s.tokens[0];
  ASSERT_GE(first.id(), 0);
  EXPECT_NEAR(first.logprob(), score.logprobs(first.id()), 1e-4f);
  ASSERT_EQ(first.top_logprobs_size(), 20);
  for (const auto& t : first.top_logprobs()) EXPECT_NEAR(t.logprob(), score.logprobs(t.id()), 1e-4f) << t.id();
  EXPECT_EQ(first.top_logprobs(0).id(),
            std::max_element(score.logprobs().begin(), score.logprobs().end()) - score.logprobs().begin());
}

// Every field is checked before any I/O: an invalid request sends Redis no
// command at all, and gets INVALID_ARGUMENT (not UNAVAILABLE) while Redis is
// down.
TEST_F(DecoderE2eTest, InvalidRequestsAreRefusedBeforeAnyIo) {
  auto keys = EncodeDocs(v1::KV_DTYPE_FLOAT16);
  std::vector<std::pair<std::string, v1::GenerateRequest>> bad;
  for (v1::Mode mode : {v1::MODE_APE, v1::MODE_PARALLEL, v1::MODE_SEQUENTIAL}) {
    bad.emplace_back("empty query, " + v1::Mode_Name(mode), Request(keys, mode));
    bad.back().second.set_query("");
  }
  bad.emplace_back("ape_temperature", Request(keys, v1::MODE_APE));
  bad.back().second.set_ape_temperature(-1);
  bad.emplace_back("ape_scale", Request(keys, v1::MODE_APE));
  bad.back().second.set_ape_scale(3);
  bad.emplace_back("unknown mode", Request(keys, static_cast<v1::Mode>(9)));
  bad.emplace_back("unknown dtype", Request(keys, v1::MODE_APE));
  bad.back().second.set_dtype(static_cast<v1::KvDtype>(7));
  bad.emplace_back("malformed key", Request({keys[0], "ape:v1:kv:not-hex"}, v1::MODE_APE));
  bad.emplace_back("empty key", Request({keys[0], ""}, v1::MODE_APE));
  bad.emplace_back("empty ref", Request(keys, v1::MODE_APE));
  bad.back().second.add_contexts();
  bad.emplace_back("empty text", Request(keys, v1::MODE_APE));
  bad.back().second.add_contexts()->set_text("");
  bad.emplace_back("token id", Request(keys, v1::MODE_APE));
  bad.back().second.add_contexts()->mutable_tokens()->add_ids(512);
  bad.emplace_back("top_p", Request(keys, v1::MODE_APE));
  bad.back().second.mutable_sampling()->set_top_p(2);
  bad.emplace_back("top_logprobs", Request(keys, v1::MODE_APE));
  bad.back().second.set_top_logprobs(21);
  bad.emplace_back("stop", Request(keys, v1::MODE_APE));
  bad.back().second.add_stop(std::string(257, 'x'));
  bad.emplace_back("max_tokens", Request(keys, v1::MODE_APE, 5000));
  auto expect_invalid = [&](const char* when) {
    for (const auto& [what, req] : bad) {
      Stream g = Generate(*dec_, req);
      EXPECT_EQ(g.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
          << when << ": " << what << ": " << g.status.error_message();
      v1::ScoreResponse resp;
      grpc::Status s = Score(req, &resp);
      EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
          << when << ": " << what << ": " << s.error_message();
    }
  };
  const int64_t before = RedisCommands();
  expect_invalid("Redis up");
  EXPECT_EQ(RedisCommands(), before);
  redis_.Stop();
  expect_invalid("Redis down");
  // The same request, valid, does reach Redis.
  EXPECT_EQ(Generate(*dec_, Request(keys, v1::MODE_APE)).status.error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(DecoderE2eTest, CancelFreesTheWorkerAndConcurrentStreamsAreCorrect) {
  auto keys = EncodeDocs(v1::KV_DTYPE_FLOAT16);
  Stream want = Generate(*dec_, Request(keys, v1::MODE_APE, 40));
  ASSERT_TRUE(want.status.ok());
  // Cancel after 2 tokens of a long generation; the only worker must be freed.
  auto t0 = std::chrono::steady_clock::now();
  Stream c = Generate(*dec_, Request(keys, v1::MODE_APE, 400), 2);  // 400: inside the window
  EXPECT_EQ(c.status.error_code(), grpc::StatusCode::CANCELLED);
  Stream after = Generate(*dec_, Request(keys, v1::MODE_APE, 40));
  EXPECT_TRUE(after.status.ok());
  EXPECT_EQ(after.ids(), want.ids());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(20));
  // 8 concurrent streams, all correct.
  std::vector<Stream> results(8);
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      auto stub = v1::Decoder::NewStub(decoder_->channel());
      results[i] = Generate(*stub, Request(keys, v1::MODE_APE, 40));
    });
  }
  for (auto& t : threads) t.join();
  for (auto& r : results) {
    EXPECT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.ids(), want.ids());
    EXPECT_EQ(r.text(), want.text());
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_NE(decoder_->Log().find("Generate CANCELLED"), std::string::npos) << decoder_->Log();
}

TEST_F(DecoderE2eTest, OverloadGetsResourceExhausted) {
  RedisServer& r = redis_;
  Server small("ape-decoder", r, {"--max_queue=0", "--max_concurrent=1"});
  ASSERT_TRUE(small.ok());
  auto keys = EncodeDocs(v1::KV_DTYPE_FLOAT16);
  auto stub = v1::Decoder::NewStub(small.channel());
  std::atomic<int> exhausted{0}, ok{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      auto st = v1::Decoder::NewStub(small.channel());
      Stream s = Generate(*st, Request(keys, v1::MODE_APE, 300));
      if (s.status.ok())
        ++ok;
      else if (s.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED)
        ++exhausted;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_GE(ok.load(), 1);
  EXPECT_GE(exhausted.load(), 1);
  EXPECT_EQ(ok.load() + exhausted.load(), 4);
}

// Prefix, query and the positions a request spans are bounded by the model's
// window (512 for stories260K) before any work: a 33,601-token prefix is
// refused at once (it used to be encoded locally for minutes), and so are a
// long query, a SEQUENTIAL prompt past the window and max_tokens past it,
// without a Redis command. APE contexts share positions: the same contexts
// fit in APE.
TEST_F(DecoderE2eTest, PromptsAreBoundedByTheWindowBeforeAnyWork) {
  auto keys = EncodeDocs(v1::KV_DTYPE_FLOAT16);
  const int64_t before = RedisCommands();
  v1::GenerateRequest long_prefix = Request({}, v1::MODE_APE);  // its prefix and context must be encoded
  long_prefix.set_prefix(Repeated(8400));
  long_prefix.add_contexts()->set_text(kDocs[0]);
  ASSERT_EQ(Tokenize(long_prefix.prefix(), true).size(), 33601u);
  const auto t0 = std::chrono::steady_clock::now();
  Stream s = Generate(*dec_, long_prefix, -1, std::chrono::seconds(20));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.status.error_message();
  EXPECT_EQ(s.status.error_message(),
            "prefix: 33601 tokens, the limit is 512 (--max_prefix_tokens, default the model's context length)");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  v1::GenerateRequest long_query = Request(keys, v1::MODE_APE);
  long_query.set_query(Repeated(130));
  s = Generate(*dec_, long_query, -1, std::chrono::seconds(20));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.status.error_message().find("query: 520 tokens, the limit is 512 (--max_query_tokens"), std::string::npos)
      << s.status.error_message();
  // 40 contexts of ~16 tokens: past the window in a row, not side by side.
  v1::GenerateRequest many = Request({}, v1::MODE_SEQUENTIAL, 4);
  for (int i = 0; i < 40; ++i) many.add_contexts()->set_text(kDocs[i % kDocs.size()]);
  s = Generate(*dec_, many, -1, std::chrono::seconds(20));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.status.error_message().find("the limit is 512 (--max_positions"), std::string::npos)
      << s.status.error_message();
  v1::GenerateRequest generate_past = Request(keys, v1::MODE_APE, 500);
  generate_past.add_contexts()->set_text(kDocs[0]);
  s = Generate(*dec_, generate_past, -1, std::chrono::seconds(20));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.status.error_message().find("max_tokens 500), the limit is 512 (--max_positions"), std::string::npos)
      << s.status.error_message();
  EXPECT_EQ(RedisCommands(), before);
  many.set_mode(v1::MODE_APE);
  s = Generate(*dec_, many, -1, std::chrono::seconds(20));
  EXPECT_TRUE(s.status.ok()) << s.status.error_message();
}

// A long prefix inside a widened window is encoded locally (no --encoder);
// with a 1 s deadline the encoding stops between blocks, and the only
// worker serves the next request within a few seconds.
TEST_F(DecoderE2eTest, CancelledLocalEncodingFreesTheWorker) {
  testing::TempFile wide(WideWindowModel(1 << 16), ".bin");
  Server local("ape-decoder", redis_, {"--model=" + wide.path(), "--max_concurrent=1"});
  ASSERT_TRUE(local.ok()) << local.Log();
  auto stub = v1::Decoder::NewStub(local.channel());
  v1::GenerateRequest long_prefix = Request({}, v1::MODE_APE, 4);
  long_prefix.set_prefix(Repeated(8400));  // 33,601 tokens
  long_prefix.add_contexts()->set_text(kDocs[0]);
  const auto t0 = std::chrono::steady_clock::now();
  Stream s = Generate(*stub, long_prefix, -1, std::chrono::seconds(1));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.status.error_message();
  v1::GenerateRequest small = Request({}, v1::MODE_APE, 4);
  small.add_contexts()->set_text(kDocs[1]);
  s = Generate(*stub, small, -1, std::chrono::seconds(20));
  EXPECT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5)) << local.Log();
}

// Every request is budgeted in bytes of float32 KV (--max_request_kv_mb;
// 16 MiB = 13,107 slots of 1,280 bytes for stories260K), float16 entries
// counting half a slot. Contexts sent as text are counted before any I/O
// (70 x 400 float16 tokens = 14,000 slots); 256 copies of one 400-token key
// (51,200 slots, 62.5 MiB of float16) are refused before the cache is
// allocated (the key is read once): the decoder's peak memory grows by far
// less than that cache. (400: a key-only context counts against the
// 512-position window once loaded.)
TEST_F(DecoderE2eTest, KvBudgetIsCheckedBeforeAllocating) {
  Server small("ape-decoder", redis_, {"--encoder=" + encoder_->address(), "--max_request_kv_mb=16"});
  ASSERT_TRUE(small.ok()) << small.Log();
  auto stub = v1::Decoder::NewStub(small.channel());
  v1::EncodeRequest enc;
  enc.mutable_prefix()->set_text(kPrefix);
  auto* ids = enc.add_contexts()->mutable_tokens();
  for (int i = 0; i < 400; ++i) ids->add_ids(300 + i % 200);
  v1::EncodeResponse encoded;
  grpc::ClientContext ectx;
  ASSERT_TRUE(enc_->Encode(&ectx, enc, &encoded).ok());
  const std::string key = encoded.contexts(0).key();
  ASSERT_TRUE(Generate(*stub, Request({key}, v1::MODE_APE, 4)).status.ok());  // warm

  const int64_t commands = RedisCommands();
  v1::GenerateRequest by_text = Request({}, v1::MODE_APE, 4);
  for (int i = 0; i < 70; ++i) by_text.add_contexts()->set_text(Repeated(100));  // 400 tokens each
  Stream s = Generate(*stub, by_text);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.status.error_message();
  EXPECT_NE(s.status.error_message().find("the limit is 13107 slots (--max_request_kv_mb=16"), std::string::npos)
      << s.status.error_message();
  EXPECT_EQ(RedisCommands(), commands);

  const int64_t peak = PeakRss(small.pid());
  s = Generate(*stub, Request(std::vector<std::string>(256, key), v1::MODE_APE, 4));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.status.error_message();
  const int64_t cache_bytes = int64_t{256} * 400 * 640;
  EXPECT_LT(PeakRss(small.pid()) - peak, cache_bytes) << "peak before " << peak;
  EXPECT_TRUE(Generate(*stub, Request({key}, v1::MODE_APE, 4)).status.ok());
}

TEST_F(DecoderE2eTest, ApeParametersAreBounded) {
  auto keys = EncodeDocs(v1::KV_DTYPE_FLOAT16);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (float bad : {1e-45f, 0.04f, 2.5f, 1e9f, -1.f, nan}) {
    for (const char* field : {"ape_temperature", "ape_scale"}) {
      v1::GenerateRequest req = Request(keys, v1::MODE_APE, 4);
      if (std::string(field) == "ape_temperature")
        req.set_ape_temperature(bad);
      else
        req.set_ape_scale(bad);
      Stream s = Generate(*dec_, req);
      EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << field << " " << bad;
      EXPECT_EQ(s.status.error_message().rfind(field, 0), 0u) << s.status.error_message();
    }
  }
  v1::GenerateRequest edge = Request(keys, v1::MODE_APE, 4);
  edge.set_ape_temperature(0.05f);
  edge.set_ape_scale(2.f);
  Stream s = Generate(*dec_, edge);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_FLOAT_EQ(s.final.ape_temperature(), 0.05f);
  for (const auto& t : s.tokens) EXPECT_TRUE(std::isfinite(t.logprob()));
}

// Text fields are bytes on the wire and UTF-8 is checked by the decoder:
// INVALID_ARGUMENT naming the field, and a log line (the protobuf runtime
// used to refuse it first: INTERNAL, no message, no log).
TEST_F(DecoderE2eTest, InvalidUtf8IsInvalidArgumentNamingTheField) {
  auto keys = EncodeDocs(v1::KV_DTYPE_FLOAT16);
  std::vector<std::pair<std::string, v1::GenerateRequest>> bad;
  bad.emplace_back("prefix", Request(keys, v1::MODE_APE, 4));
  bad.back().second.set_prefix("Once upon a \xe0\x80\xaf time");  // overlong '/'
  bad.emplace_back("query", Request(keys, v1::MODE_APE, 4));
  bad.back().second.set_query(" One day, \xff");
  bad.emplace_back("stop 1", Request(keys, v1::MODE_APE, 4));
  bad.back().second.add_stop(".");
  bad.back().second.add_stop("\xed\xa0\x80");  // a surrogate
  bad.emplace_back("context 3", Request(keys, v1::MODE_APE, 4));
  bad.back().second.add_contexts()->set_text("Lily \xc3");  // truncated
  for (const auto& [field, req] : bad) {
    Stream s = Generate(*dec_, req);
    EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << field;
    EXPECT_EQ(s.status.error_message().rfind(field + ": invalid UTF-8 at byte ", 0), 0u) << s.status.error_message();
    v1::ScoreResponse resp;
    EXPECT_EQ(Score(req, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT) << field;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const std::string log = decoder_->Log();
  EXPECT_NE(log.find("decoder Generate INVALID_ARGUMENT"), std::string::npos) << log;
  EXPECT_NE(log.find("error=\"query: invalid UTF-8 at byte 10"), std::string::npos) << log;
  v1::GenerateRequest good = Request(keys, v1::MODE_APE, 4);
  good.set_query(" One day, Lily said \xe2\x80\x9chi\xe2\x80\x9d");
  EXPECT_TRUE(Generate(*dec_, good).status.ok());
}

// Client input in a status or a log line is an excerpt: a 1 MB key is
// named by its first bytes and its size.
TEST_F(DecoderE2eTest, ClientInputIsEchoedAsAnExcerpt) {
  const std::string huge = "ape:v1:kv:" + std::string(1 << 20, 'z');
  const size_t log_before = decoder_->Log().size();
  Stream s = Generate(*dec_, Request({huge}, v1::MODE_APE, 4));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_LT(s.status.error_message().size(), 300u) << s.status.error_message().substr(0, 300);
  EXPECT_NE(s.status.error_message().find("... (1048586 bytes)"), std::string::npos)
      << s.status.error_message().substr(0, 300);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_LT(decoder_->Log().size() - log_before, 1000u);
}

// A queued request whose deadline passes leaves the queue at once (it used
// to hold its place until the next 50 ms poll): with the only worker busy
// and the queue (4) filled by requests with 30 ms deadlines, or flooded
// with 1 ms deadlines, the next request is queued and served, and every
// expired request's log line shows it left the queue at its deadline.
TEST_F(DecoderE2eTest, ExpiredRequestsLeaveTheQueueAtOnce) {
  testing::TempFile wide(WideWindowModel(1 << 16), ".bin");
  Server busy_server("ape-decoder", redis_,
                     {"--model=" + wide.path(), "--max_concurrent=1", "--max_queue=4", "--threads=1"});
  ASSERT_TRUE(busy_server.ok()) << busy_server.Log();
  auto stub = v1::Decoder::NewStub(busy_server.channel());
  // The worker: a 40,000-token SEQUENTIAL prefill, cancelled after 5 s.
  v1::GenerateRequest long_req = Request({}, v1::MODE_SEQUENTIAL, 1);
  long_req.set_query(Repeated(10000));
  std::thread worker([&] { Generate(*stub, long_req, -1, std::chrono::seconds(5)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  v1::GenerateRequest quick = Request({}, v1::MODE_APE, 2);
  quick.add_contexts()->set_text(kDocs[0]);
  // `n` requests at once; returns how many expired (the others may find
  // the queue full).
  auto burst = [&](int n, std::chrono::milliseconds timeout) {
    std::vector<std::thread> threads;
    std::atomic<int> expired{0};
    for (int i = 0; i < n; ++i) {
      threads.emplace_back([&] {
        auto st = v1::Decoder::NewStub(busy_server.channel());
        const grpc::StatusCode code = Generate(*st, quick, -1, timeout).status.error_code();
        EXPECT_NE(code, grpc::StatusCode::OK);  // the worker is busy throughout
        expired += code == grpc::StatusCode::DEADLINE_EXCEEDED;
      });
    }
    for (auto& t : threads) t.join();
    return expired.load();
  };
  std::vector<Stream> served(2);
  std::vector<std::thread> waiting;
  EXPECT_EQ(burst(4, std::chrono::milliseconds(30)), 4);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  waiting.emplace_back([&] { served[0] = Generate(*stub, quick, -1, std::chrono::seconds(30)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_GT(burst(20, std::chrono::milliseconds(1)), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  waiting.emplace_back([&] { served[1] = Generate(*stub, quick, -1, std::chrono::seconds(30)); });
  for (auto& t : waiting) t.join();
  worker.join();
  for (const Stream& r : served) EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const std::string log = busy_server.Log();
  const std::regex expired_line("Generate DEADLINE_EXCEEDED .*queue_ms=([0-9.]+)");
  int lines = 0;
  for (auto it = std::sregex_iterator(log.begin(), log.end(), expired_line); it != std::sregex_iterator(); ++it) {
    ++lines;
    EXPECT_LT(std::stod((*it)[1]), 45.0) << (*it)[0];
  }
  EXPECT_GE(lines, 4) << log;
}

}  // namespace
}  // namespace ape
