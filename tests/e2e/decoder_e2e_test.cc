// ape-decoder end to end: real redis-server, ape-encoder and ape-decoder
// processes on free loopback ports; an independent PyTorch reference.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <thread>

#include "ape/v1/decoder.grpc.pb.h"
#include "ape/v1/encoder.grpc.pb.h"
#include "common/engine/model.h"
#include "tests/process_util.h"
#include "tests/test_util.h"

namespace ape {
namespace {

using ::ape::testing::Process;
using ::ape::testing::RedisServer;
using ::ape::testing::TestData;

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

Stream Generate(v1::Decoder::Stub& stub, const v1::GenerateRequest& req, int cancel_after = -1) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
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
  // Corrupt bytes under a key: a miss for a key-only context...
  std::string cli = "redis-cli -p " + std::to_string(redis_.port());
  ASSERT_EQ(std::system((cli + " HSET " + keys[1] + " 0 junkjunk >/dev/null").c_str()), 0);
  s = Generate(*dec_, Request({keys[1]}, v1::MODE_APE));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::NOT_FOUND) << s.status.error_message();
  // ...and re-encoded (through the encoder) when the request has the text.
  v1::GenerateRequest by_text = Request({}, v1::MODE_APE);
  by_text.add_contexts()->set_text(kDocs[1]);
  s = Generate(*dec_, by_text);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_GT(s.final.usage().encoded_tokens(), 0u);
  s = Generate(*dec_, Request({keys[1]}, v1::MODE_APE));  // repaired
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
  Stream c = Generate(*dec_, Request(keys, v1::MODE_APE, 1000), 2);
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

}  // namespace
}  // namespace ape
