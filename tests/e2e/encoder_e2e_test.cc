// ape-encoder end to end: a real redis-server, real encoder processes on
// free loopback ports, a gRPC client.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cstring>
#include <thread>

#include "ape/v1/encoder.grpc.pb.h"
#include "common/kv/cache_key.h"
#include "common/pipeline/encode_pipeline.h"
#include "common/server/kv_dtype.h"
#include "common/store/redis_store.h"
#include "tests/process_util.h"
#include "tests/test_util.h"

namespace ape {
namespace {

using ::ape::testing::PeakRss;
using ::ape::testing::Process;
using ::ape::testing::RedisServer;
using ::ape::testing::TestData;
using ::ape::testing::WideWindowModel;

class EncoderProcess {
 public:
  EncoderProcess(const RedisServer& redis, std::vector<std::string> extra = {}) {
    port_ = testing::FreePort();
    log_ = redis.dir() + "/encoder-" + std::to_string(port_) + ".log";
    std::vector<std::string> argv = {std::string(APE_BIN_DIR) + "/ape-encoder",
                                     "--listen=127.0.0.1:" + std::to_string(port_),
                                     "--redis=" + redis.uri(),
                                     "--model=" + TestData("stories260K.bin"),
                                     "--tokenizer=" + TestData("tok512.bin"),
                                     "--redis_timeout_ms=1000"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    proc_.Start(argv, log_);
    ok_ = testing::WaitForPort(port_, proc_);
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(port_), grpc::InsecureChannelCredentials());
    stub_ = v1::Encoder::NewStub(channel_);
  }
  bool ok() const { return ok_; }
  v1::Encoder::Stub& stub() { return *stub_; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }
  int Stop() { return proc_.Stop(); }
  pid_t pid() const { return proc_.pid(); }
  std::string Log() { return testing::ReadAll(log_); }

 private:
  int port_;
  std::string log_;
  bool ok_ = false;
  Process proc_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Encoder::Stub> stub_;
};

grpc::Status Encode(EncoderProcess& e, const v1::EncodeRequest& req, v1::EncodeResponse* resp) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  return e.stub().Encode(&ctx, req, resp);
}

v1::EncodeRequest Request(v1::KvDtype dtype) {
  v1::EncodeRequest req;
  req.mutable_prefix()->set_text("Once upon a time");
  req.add_contexts()->set_text("Lily had a big red ball.");
  req.add_contexts()->set_text("Tom liked to run in the park with his dog.");
  req.set_dtype(dtype);
  return req;
}

class EncoderE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(redis_.ok());
    auto m = Model::Load(TestData("stories260K.bin"), TestData("tok512.bin"));
    ASSERT_TRUE(m.ok());
    model_ = *std::move(m);
  }
  int64_t CommandCalls(const std::string& cmd) {
    RedisStore store(*ParseRedisUri(redis_.uri()));
    std::string out;
    FILE* p = popen(("redis-cli -p " + std::to_string(redis_.port()) + " INFO commandstats").c_str(), "r");
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
    pclose(p);
    size_t at = out.find("cmdstat_" + cmd + ":calls=");
    return at == std::string::npos ? 0 : std::stoll(out.substr(at + 15 + cmd.size()));
  }
  RedisServer redis_;
  std::unique_ptr<Model> model_;
};

TEST_F(EncoderE2eTest, StoredKvEqualsInProcessComputation) {
  EncoderProcess enc(redis_);
  ASSERT_TRUE(enc.ok()) << enc.Log();
  for (v1::KvDtype dtype : {v1::KV_DTYPE_FLOAT32, v1::KV_DTYPE_FLOAT16, v1::KV_DTYPE_INT8}) {
    v1::EncodeResponse resp;
    grpc::Status s = Encode(enc, Request(dtype), &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_EQ(resp.contexts_size(), 2);
    EXPECT_EQ(resp.model_fingerprint(), model_->fingerprint());
    EncodeInput in;
    in.prefix_tokens = model_->tokenizer().Encode("Once upon a time", true, false);
    in.dtype = *KvDtypeFromProto(dtype, KvDtype::kFloat16);
    EXPECT_EQ(resp.prefix().num_tokens(), in.prefix_tokens.size());
    RedisStore store(*ParseRedisUri(redis_.uri()));
    std::vector<std::string> keys = {resp.prefix().key(), resp.contexts(0).key(), resp.contexts(1).key()};
    auto got = store.GetMany(keys);
    ASSERT_TRUE(got.ok());
    // The prefix block and each context block equal what this process computes.
    const char* texts[] = {"Lily had a big red ball.", "Tom liked to run in the park with his dog."};
    for (const char* t : texts) in.contexts.push_back(model_->tokenizer().Encode(t, false, false));
    auto computed = EncodeBlocks(*model_, in);
    ASSERT_TRUE(computed.ok()) << computed.status();
    const std::vector<std::string>& blocks = *computed;
    EXPECT_EQ((*got)[0], blocks[0]);
    for (int i = 0; i < 2; ++i) {
      const auto& ctx = in.contexts[i];
      EXPECT_EQ(resp.contexts(i).num_tokens(), ctx.size());
      EXPECT_EQ(resp.contexts(i).first_position(), in.prefix_tokens.size());
      EXPECT_FALSE(resp.contexts(i).already_cached());
      ASSERT_TRUE((*got)[i + 1].has_value());
      EXPECT_EQ((*got)[i + 1]->size(), resp.contexts(i).stored_bytes());
      EXPECT_TRUE(*(*got)[i + 1] == blocks[i + 1]) << "context " << i << " dtype " << dtype;
    }
  }
  EXPECT_NE(enc.Log().find("Encode OK contexts=2"), std::string::npos) << enc.Log();
}

TEST_F(EncoderE2eTest, SameKeysAcrossEncodersAndCachedSecondTime) {
  EncoderProcess a(redis_), b(redis_);
  ASSERT_TRUE(a.ok() && b.ok());
  v1::EncodeResponse ra, rb;
  ASSERT_TRUE(Encode(a, Request(v1::KV_DTYPE_FLOAT16), &ra).ok());
  const int64_t hsets = CommandCalls("hset");
  EXPECT_GT(hsets, 0);
  ASSERT_TRUE(Encode(b, Request(v1::KV_DTYPE_FLOAT16), &rb).ok());
  EXPECT_EQ(ra.prefix().key(), rb.prefix().key());
  EXPECT_TRUE(rb.prefix().already_cached());
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(ra.contexts(i).key(), rb.contexts(i).key());
    EXPECT_TRUE(rb.contexts(i).already_cached());
  }
  EXPECT_EQ(CommandCalls("hset"), hsets);  // nothing written the second time
  EXPECT_NE(b.Log().find("computed_tokens=0 written_bytes=0"), std::string::npos) << b.Log();
}

TEST_F(EncoderE2eTest, BadInputGetsClearStatus) {
  EncoderProcess enc(redis_, {"--max_context_tokens=32", "--max_contexts=3"});
  ASSERT_TRUE(enc.ok());
  auto code = [&](const v1::EncodeRequest& r) {
    v1::EncodeResponse resp;
    return Encode(enc, r, &resp);
  };
  v1::EncodeRequest none;
  none.mutable_prefix()->set_text("x");
  EXPECT_EQ(code(none).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::EncodeRequest empty = none;
  empty.add_contexts()->set_text("");
  auto s = code(empty);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("context 0 is empty"), std::string::npos) << s.error_message();
  v1::EncodeRequest big = none;
  big.add_contexts()->set_text(std::string(500, 'a') + " long text that is far beyond thirty-two tokens");
  s = code(big);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("limit is 32"), std::string::npos) << s.error_message();
  v1::EncodeRequest ids = none;
  ids.add_contexts()->mutable_tokens()->add_ids(512);
  s = code(ids);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("outside the vocabulary"), std::string::npos);
  v1::EncodeRequest many = none;
  for (int i = 0; i < 4; ++i) many.add_contexts()->set_text("a dog");
  EXPECT_EQ(code(many).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  // The server is still fine afterwards.
  v1::EncodeRequest ok = none;
  ok.add_contexts()->set_text("a dog");
  EXPECT_TRUE(code(ok).ok());
}

TEST_F(EncoderE2eTest, JunkUnderAKeyIsReplacedByAValidEntry) {
  EncoderProcess enc(redis_);
  ASSERT_TRUE(enc.ok());
  EncodeInput in;
  in.prefix_tokens = model_->tokenizer().Encode("Once upon a time", true, false);
  in.contexts = {model_->tokenizer().Encode("Lily had a big red ball.", false, false)};
  in.dtype = KvDtype::kFloat16;
  const std::string key = PlanEncode(*model_, in).contexts[0].key;
  ASSERT_EQ(std::system(("redis-cli -p " + std::to_string(redis_.port()) + " SET " + key + " junk >/dev/null").c_str()),
            0);
  v1::EncodeResponse resp;
  ASSERT_TRUE(Encode(enc, Request(v1::KV_DTYPE_FLOAT16), &resp).ok());
  EXPECT_EQ(resp.contexts(0).key(), key);
  EXPECT_FALSE(resp.contexts(0).already_cached());
  RedisStore store(*ParseRedisUri(redis_.uri()));
  auto got = store.GetMany({key});
  ASSERT_TRUE((*got)[0].has_value());
  EXPECT_TRUE(ParseKvBlock({reinterpret_cast<const uint8_t*>((*got)[0]->data()), (*got)[0]->size()}).ok());
}

TEST_F(EncoderE2eTest, RedisDownIsUnavailableThenRecovers) {
  EncoderProcess enc(redis_);
  ASSERT_TRUE(enc.ok());
  redis_.Stop();
  v1::EncodeResponse resp;
  auto t0 = std::chrono::steady_clock::now();
  grpc::Status s = Encode(enc, Request(v1::KV_DTYPE_FLOAT16), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_NE(s.error_message().find("redis"), std::string::npos);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  redis_.Start();
  ASSERT_TRUE(redis_.ok());
  resp.Clear();
  s = Encode(enc, Request(v1::KV_DTYPE_FLOAT16), &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.contexts_size(), 2);
}

TEST_F(EncoderE2eTest, TokenizeDetokenizeModelInfoHealthAndShutdown) {
  EncoderProcess enc(redis_);
  ASSERT_TRUE(enc.ok());
  grpc::ClientContext c1;
  v1::TokenizeRequest tr;
  tr.set_text("Once upon a time");
  tr.set_add_bos(true);
  v1::TokenizeResponse tresp;
  ASSERT_TRUE(enc.stub().Tokenize(&c1, tr, &tresp).ok());
  EXPECT_EQ(std::vector<int32_t>(tresp.ids().begin(), tresp.ids().end()),
            (std::vector<int32_t>{1, 403, 407, 261, 378}));
  grpc::ClientContext c2;
  v1::DetokenizeRequest dr;
  for (int32_t id : tresp.ids()) dr.add_ids(id);
  v1::DetokenizeResponse dresp;
  ASSERT_TRUE(enc.stub().Detokenize(&c2, dr, &dresp).ok());
  EXPECT_EQ(dresp.text(), "Once upon a time");
  grpc::ClientContext c3;
  dr.add_ids(99999);
  EXPECT_EQ(enc.stub().Detokenize(&c3, dr, &dresp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  grpc::ClientContext c4;
  v1::ModelInfoResponse info;
  ASSERT_TRUE(enc.stub().ModelInfo(&c4, v1::ModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.n_layers(), 5u);
  EXPECT_EQ(info.kv_bytes_per_token_float16(), 2u * 5 * 32 * 2);
  EXPECT_EQ(info.kv_bytes_per_token_int8(), 2u * 5 * (32 + 4 * 4));  // 4 KV heads of 8: 32 bytes + 4 scales
  EXPECT_EQ(info.fingerprint(), model_->fingerprint());
  // Standard health service.
  grpc::ClientContext c5;
  grpc::ByteBuffer req_buf, resp_buf;
  // grpc.health.v1.HealthCheckRequest{service=""} is the empty message.
  grpc::GenericStub generic(enc.channel());
  grpc::Slice empty("");
  req_buf = grpc::ByteBuffer(&empty, 1);
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status hs;
  generic.UnaryCall(&c5, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &req_buf, &resp_buf,
                    [&](grpc::Status st) {
                      std::lock_guard<std::mutex> l(mu);
                      hs = st;
                      done = true;
                      cv.notify_all();
                    });
  {
    std::unique_lock<std::mutex> l(mu);
    cv.wait_for(l, std::chrono::seconds(10), [&] { return done; });
  }
  ASSERT_TRUE(done && hs.ok()) << hs.error_message();
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(resp_buf.Dump(&slices).ok());
  std::string bytes;
  for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_EQ(bytes, std::string("\x08\x01", 2));  // status: SERVING
  EXPECT_EQ(enc.Stop(), 0);                      // SIGTERM: graceful exit
}

// Overwrite writes every entry even where its key already holds something
// (junk in chunk 0, a stray hash field next to a valid entry). Without it
// such a key counts as cached and keeps its unusable value.
TEST_F(EncoderE2eTest, OverwriteRewritesEntriesAtTheirKeys) {
  EncoderProcess enc(redis_);
  ASSERT_TRUE(enc.ok()) << enc.Log();
  v1::EncodeResponse first;
  ASSERT_TRUE(Encode(enc, Request(v1::KV_DTYPE_FLOAT16), &first).ok());
  const std::string junk_key = first.contexts(0).key(), stray_key = first.contexts(1).key();
  const std::string cli = "redis-cli -p " + std::to_string(redis_.port());
  ASSERT_EQ(std::system((cli + " HSET " + junk_key + " 0 junkjunk >/dev/null").c_str()), 0);
  ASSERT_EQ(std::system((cli + " HSET " + stray_key + " stray field >/dev/null").c_str()), 0);
  RedisStore store(*ParseRedisUri(redis_.uri()));
  auto usable = [&](const std::string& key) {
    auto got = store.GetMany({key});
    return got.ok() && (*got)[0].has_value() &&
           ParseKvBlock({reinterpret_cast<const uint8_t*>((*got)[0]->data()), (*got)[0]->size()}).ok();
  };
  ASSERT_FALSE(usable(junk_key));
  ASSERT_FALSE(usable(stray_key));

  v1::EncodeResponse plain;
  ASSERT_TRUE(Encode(enc, Request(v1::KV_DTYPE_FLOAT16), &plain).ok());
  EXPECT_TRUE(plain.contexts(0).already_cached());
  EXPECT_TRUE(plain.contexts(1).already_cached());
  EXPECT_FALSE(usable(junk_key));
  EXPECT_FALSE(usable(stray_key));

  v1::EncodeRequest req = Request(v1::KV_DTYPE_FLOAT16);
  req.set_overwrite(true);
  v1::EncodeResponse repaired;
  ASSERT_TRUE(Encode(enc, req, &repaired).ok());
  EXPECT_FALSE(repaired.prefix().already_cached());
  EXPECT_FALSE(repaired.contexts(0).already_cached());
  EXPECT_FALSE(repaired.contexts(1).already_cached());
  // Each key now holds exactly the block computed here.
  EncodeInput in;
  in.prefix_tokens = model_->tokenizer().Encode("Once upon a time", true, false);
  for (const char* t : {"Lily had a big red ball.", "Tom liked to run in the park with his dog."}) {
    in.contexts.push_back(model_->tokenizer().Encode(t, false, false));
  }
  auto blocks = EncodeBlocks(*model_, in);
  ASSERT_TRUE(blocks.ok()) << blocks.status();
  auto got = store.GetMany({repaired.prefix().key(), junk_key, stray_key});
  ASSERT_TRUE(got.ok());
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE((*got)[i].has_value()) << i;
    EXPECT_TRUE(*(*got)[i] == (*blocks)[i]) << i;
  }
}

// A long prefix (inside a widened window, so it is accepted) with a 1 s
// deadline: encoding stops at the next block once the deadline passes, and
// the only worker serves the next request within a few seconds.
TEST_F(EncoderE2eTest, CancelledEncodeFreesTheWorker) {
  testing::TempFile wide(WideWindowModel(1 << 16), ".bin");
  EncoderProcess enc(redis_, {"--model=" + wide.path(), "--max_concurrent=1"});
  ASSERT_TRUE(enc.ok()) << enc.Log();
  v1::EncodeRequest long_prefix = Request(v1::KV_DTYPE_FLOAT16);
  auto* ids = long_prefix.mutable_prefix()->mutable_tokens();
  ids->add_ids(1);  // BOS
  for (int i = 1; i < 33601; ++i) ids->add_ids(300 + i % 200);
  const auto t0 = std::chrono::steady_clock::now();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
  v1::EncodeResponse resp;
  EXPECT_EQ(enc.stub().Encode(&ctx, long_prefix, &resp).error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  grpc::Status s = Encode(enc, Request(v1::KV_DTYPE_FLOAT16), &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5)) << enc.Log();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_NE(enc.Log().find("Encode CANCELLED"), std::string::npos) << enc.Log();
}

// Text is checked before anything tokenizes it: invalid UTF-8 is
// INVALID_ARGUMENT naming the field (with a log line), and text over the
// byte limits is refused without the encoder's memory growing the ~30x
// that tokenizing costs.
TEST_F(EncoderE2eTest, TextIsCheckedBeforeTokenizing) {
  EncoderProcess enc(redis_);
  ASSERT_TRUE(enc.ok()) << enc.Log();
  auto tokenize = [&](const std::string& text, v1::TokenizeResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    v1::TokenizeRequest req;
    req.set_text(text);
    return enc.stub().Tokenize(&ctx, req, resp);
  };
  v1::TokenizeResponse tresp;
  grpc::Status s = tokenize("ab\xff", &tresp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "text: invalid UTF-8 at byte 2 (text fields are UTF-8)");
  EXPECT_TRUE(tokenize("caf\xc3\xa9 \xe2\x98\x95 \xf0\x9d\x84\x9e", &tresp).ok());
  for (const auto& [field, bad] : std::vector<std::pair<std::string, std::string>>{
           {"prefix", "\xc0\xaf"}, {"context 1", "ok \xed\xa0\x80"}, {"context 0", "\xf4\x90\x80\x80"}}) {
    v1::EncodeRequest req = Request(v1::KV_DTYPE_FLOAT16);
    if (field == "prefix") req.mutable_prefix()->set_text(bad);
    if (field == "context 0") req.mutable_contexts(0)->set_text(bad);
    if (field == "context 1") req.mutable_contexts(1)->set_text(bad);
    v1::EncodeResponse resp;
    s = Encode(enc, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << field;
    EXPECT_EQ(s.error_message().rfind(field + ": invalid UTF-8 at byte", 0), 0u) << s.error_message();
  }
  EXPECT_NE(enc.Log().find("encoder Tokenize INVALID_ARGUMENT"), std::string::npos) << enc.Log();
  EXPECT_NE(enc.Log().find("encoder Encode INVALID_ARGUMENT"), std::string::npos) << enc.Log();

  // Over the limits: 2 MiB in one field, 17 x 1 MiB in one request.
  v1::EncodeRequest big = Request(v1::KV_DTYPE_FLOAT16);
  big.mutable_contexts(0)->set_text(std::string(2 << 20, 'a'));
  v1::EncodeResponse resp;
  s = Encode(enc, big, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("--max_text_bytes"), std::string::npos) << s.error_message();
  v1::EncodeRequest many = Request(v1::KV_DTYPE_FLOAT16);
  for (int i = 0; i < 17; ++i) many.add_contexts()->set_text(std::string(1 << 20, 'a'));
  s = Encode(enc, many, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("--max_request_text_bytes"), std::string::npos) << s.error_message();
  const int64_t before = PeakRss(enc.pid());
  const int64_t text_bytes = 60 << 20;
  s = tokenize(std::string(text_bytes, 'a'), &tresp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("--max_text_bytes"), std::string::npos) << s.error_message();
  // Receiving the message costs a few copies of it; tokenizing would cost ~30.
  EXPECT_LT(PeakRss(enc.pid()) - before, 4 * text_bytes) << "before " << before;
  EXPECT_TRUE(Encode(enc, Request(v1::KV_DTYPE_FLOAT16), &resp).ok());
}

}  // namespace
}  // namespace ape
