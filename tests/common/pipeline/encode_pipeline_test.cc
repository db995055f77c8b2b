// The encode pipeline in process, on the real stories260K model: blocks
// prefilled kEncodeBlockTokens at a time against one plain Forward each,
// cancellation between blocks, and overwrite against a private
// redis-server.
#include "common/pipeline/encode_pipeline.h"

#include <gtest/gtest.h>

#include <numeric>

#include "common/engine/transformer.h"
#include "common/kv/cache_key.h"
#include "tests/process_util.h"
#include "tests/test_util.h"

namespace ape {
namespace {

class EncodePipelineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = Model::Load(testing::TestData("stories260K.bin"), testing::TestData("tok512.bin"));
    ASSERT_TRUE(m.ok());
    model_ = *std::move(m);
  }
  // A prefix and two contexts long enough to take several blocks each.
  EncodeInput Input(KvDtype dtype) {
    EncodeInput in;
    in.prefix_tokens = {model_->tokenizer().bos_id()};
    for (int i = 1; i < 300; ++i) in.prefix_tokens.push_back(300 + i % 150);  // 300 tokens
    in.contexts = {std::vector<int32_t>(200), std::vector<int32_t>(90)};
    for (auto& c : in.contexts) std::iota(c.begin(), c.end(), 260);
    in.dtype = dtype;
    return in;
  }
  // The simpler way: the prefix in one Forward, then each context in one
  // Forward after it, serialised as the pipeline does.
  std::vector<std::string> Reference(const EncodeInput& in) {
    const int lp = static_cast<int>(in.prefix_tokens.size());
    const Hash128 prefix_key = ComputeKvKey(FingerprintBytes(*model_), in.dtype, KvKind::kPrefix, in.prefix_tokens, {});
    Transformer tf(*model_);
    KvCache cache(model_->config(), 1024);
    auto forward = [&](const std::vector<int32_t>& tokens, int first) {
      std::vector<int32_t> pos(tokens.size());
      std::iota(pos.begin(), pos.end(), first);
      tf.Forward(tokens, pos, cache, ApeParams{}, nullptr);
    };
    auto header = [&](KvKind kind, size_t n, int first) {
      KvBlockHeader h;
      h.model_fingerprint = FingerprintBytes(*model_);
      h.n_layers = model_->config().n_layers;
      h.n_kv_heads = model_->config().n_kv_heads;
      h.head_dim = model_->config().head_dim;
      h.dtype = in.dtype;
      h.kind = kind;
      h.num_tokens = static_cast<uint32_t>(n);
      h.first_position = first;
      h.prefix_key = prefix_key;
      return h;
    };
    forward(in.prefix_tokens, 0);
    std::vector<std::string> blocks = {SerializeKvBlock(header(KvKind::kPrefix, lp, 0), in.prefix_tokens, cache, 0)};
    for (const auto& c : in.contexts) {
      cache.size = lp;
      forward(c, lp);
      blocks.push_back(SerializeKvBlock(header(KvKind::kContext, c.size(), lp), c, cache, lp));
    }
    return blocks;
  }
  std::unique_ptr<Model> model_;
};

TEST_F(EncodePipelineTest, BlockwiseEncodingEqualsOneForwardPerSegment) {
  for (KvDtype dtype : {KvDtype::kFloat32, KvDtype::kFloat16, KvDtype::kInt8}) {
    const EncodeInput in = Input(dtype);
    int checks = 0;
    auto blocks = EncodeBlocks(*model_, in, [&] { return ++checks < 0; });
    ASSERT_TRUE(blocks.ok()) << blocks.status();
    const std::vector<std::string> want = Reference(in);
    ASSERT_EQ(blocks->size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) EXPECT_TRUE((*blocks)[i] == want[i]) << "block " << i;
    EXPECT_EQ(checks, 2 + 1 + 1);  // ceil(300/256) + ceil(200/256) + ceil(90/256)
  }
}

// Cancellation is checked before every block: a request gone during its
// prefix stops there, and one gone before anything computes nothing.
TEST_F(EncodePipelineTest, CancellationStopsBetweenBlocks) {
  const EncodeInput in = Input(KvDtype::kFloat16);
  int checks = 0;
  auto blocks = EncodeBlocks(*model_, in, [&] { return ++checks > 1; });
  EXPECT_EQ(blocks.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(checks, 2);
  EXPECT_EQ(std::string(blocks.status().message()),
            "encoding cancelled (client cancelled or deadline passed) at token 256 of 300 of the prefix");

  testing::RedisServer redis;
  ASSERT_TRUE(redis.ok());
  RedisStore store(*ParseRedisUri(redis.uri()));
  checks = 0;
  auto out = EncodeContexts(*model_, store, in, [&] { return ++checks > 3; });  // gone in the second context
  EXPECT_EQ(out.status().code(), absl::StatusCode::kCancelled) << out.status();
  const EncodeOutput plan = PlanEncode(*model_, in);
  auto exists = store.Exists({plan.prefix.key, plan.contexts[0].key, plan.contexts[1].key});
  ASSERT_TRUE(exists.ok());
  EXPECT_EQ(*exists, (std::vector<bool>{true, true, false}));  // what finished before is kept
}

// Overwrite writes every entry without looking: a key holding something
// that counts as an entry (junk in chunk 0) is replaced.
TEST_F(EncodePipelineTest, OverwriteWritesEveryEntry) {
  testing::RedisServer redis;
  ASSERT_TRUE(redis.ok());
  RedisStore store(*ParseRedisUri(redis.uri()));
  EncodeInput in = Input(KvDtype::kFloat16);
  const EncodeOutput plan = PlanEncode(*model_, in);
  ASSERT_TRUE(store.Put(plan.contexts[0].key, "junk", 0).ok());
  auto out = EncodeContexts(*model_, store, in);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(out->contexts[0].already_cached);
  EXPECT_EQ(out->tokens_computed, 300 + 90);
  in.overwrite = true;
  out = EncodeContexts(*model_, store, in);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_FALSE(out->prefix.already_cached);
  EXPECT_FALSE(out->contexts[0].already_cached);
  EXPECT_FALSE(out->contexts[1].already_cached);
  EXPECT_EQ(out->tokens_computed, 300 + 200 + 90);
  auto got = store.GetMany({plan.prefix.key, plan.contexts[0].key, plan.contexts[1].key});
  ASSERT_TRUE(got.ok());
  const std::vector<std::string> want = Reference(in);
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_TRUE((*got)[i].has_value()) << i;
    EXPECT_TRUE(*(*got)[i] == want[i]) << i;
  }
}

}  // namespace
}  // namespace ape
