// KV blocks: round trips (bit-exact float32, float16 within rounding),
// keys, and malformed bytes (truncations, bit flips, foreign headers).
#include "common/kv/kv_block.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "common/kv/cache_key.h"
#include "common/engine/half.h"
#include "common/engine/transformer.h"
#include "tests/test_util.h"

namespace ape {
namespace {

class KvBlockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = Model::Load(testing::TestData("stories260K.bin"), testing::TestData("tok512.bin"));
    ASSERT_TRUE(m.ok());
    model_ = *std::move(m);
    fp_ = *HashFromHex(model_->fingerprint());
  }
  // Prefix [BOS, "Once upon"] and a context after it, computed in process.
  void Compute(KvCache& cache, std::vector<int32_t>* prefix, std::vector<int32_t>* ctx) {
    *prefix = model_->tokenizer().Encode("Once upon", true, false);
    *ctx = model_->tokenizer().Encode("a time there was a dog", false, false);
    Transformer tf(*model_);
    std::vector<int32_t> pos(prefix->size());
    for (size_t i = 0; i < pos.size(); ++i) pos[i] = i;
    tf.Forward(*prefix, pos, cache, ApeParams{}, nullptr);
    pos.resize(ctx->size());
    for (size_t i = 0; i < pos.size(); ++i) pos[i] = prefix->size() + i;
    tf.Forward(*ctx, pos, cache, ApeParams{}, nullptr);
  }
  KvBlockHeader Header(KvDtype dtype, uint32_t n, uint32_t first) {
    KvBlockHeader h;
    h.model_fingerprint = fp_;
    h.n_layers = model_->config().n_layers;
    h.n_kv_heads = model_->config().n_kv_heads;
    h.head_dim = model_->config().head_dim;
    h.dtype = dtype;
    h.kind = KvKind::kContext;
    h.num_tokens = n;
    h.first_position = first;
    h.prefix_key[0] = 7;
    return h;
  }
  std::unique_ptr<Model> model_;
  Hash128 fp_;
};

TEST_F(KvBlockTest, RoundTripFloat32BitExactAndFloat16WithinRounding) {
  KvCache cache(model_->config(), 64);
  std::vector<int32_t> prefix, ctx;
  Compute(cache, &prefix, &ctx);
  const int lp = prefix.size(), n = ctx.size();
  for (KvDtype dtype : {KvDtype::kFloat32, KvDtype::kFloat16}) {
    std::string bytes = SerializeKvBlock(Header(dtype, n, lp), ctx, cache, lp);
    EXPECT_EQ(bytes.size(), kKvHeaderFixedBytes + 4 * n + KvBytesPerToken(model_->config(), dtype) * n + 16);
    auto view = ParseKvBlock({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()});
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ(view->tokens, ctx);
    Hash128 pk{};
    pk[0] = 7;
    EXPECT_TRUE(CheckKvBlockMatches(*view, fp_, model_->config(), KvKind::kContext, pk).ok());
    KvCache loaded(model_->config(), 64);
    LoadKvBlock(*view, loaded, 3);
    for (int l = 0; l < model_->config().n_layers; ++l) {
      for (int t = 0; t < n; ++t) {
        EXPECT_EQ(loaded.pos[3 + t], lp + t);
        for (int d = 0; d < loaded.kv_dim; ++d) {
          float want_k = cache.key(l, lp + t)[d], got_k = loaded.key(l, 3 + t)[d];
          float want_v = cache.value(l, lp + t)[d], got_v = loaded.value(l, 3 + t)[d];
          if (dtype == KvDtype::kFloat32) {
            ASSERT_EQ(got_k, want_k);
            ASSERT_EQ(got_v, want_v);
          } else {  // float16: relative error <= 2^-11 (normal range)
            ASSERT_NEAR(got_k, want_k, std::abs(want_k) * 4.9e-4f + 6e-8f);
            ASSERT_NEAR(got_v, want_v, std::abs(want_v) * 4.9e-4f + 6e-8f);
          }
        }
      }
    }
  }
}

TEST_F(KvBlockTest, RejectsEveryTruncationAndBitFlip) {
  KvCache cache(model_->config(), 64);
  std::vector<int32_t> prefix, ctx;
  Compute(cache, &prefix, &ctx);
  std::string bytes = SerializeKvBlock(Header(KvDtype::kFloat16, ctx.size(), prefix.size()), ctx, cache, prefix.size());
  for (size_t cut = 0; cut < bytes.size(); cut += 7) {
    std::string part = bytes.substr(0, cut);
    EXPECT_FALSE(ParseKvBlock({reinterpret_cast<const uint8_t*>(part.data()), part.size()}).ok()) << cut;
  }
  std::mt19937 rng(5);
  for (int i = 0; i < 500; ++i) {
    std::string b = bytes;
    b[rng() % b.size()] ^= static_cast<char>(1 << (rng() % 8));
    auto v = ParseKvBlock({reinterpret_cast<const uint8_t*>(b.data()), b.size()});
    EXPECT_FALSE(v.ok()) << "flip " << i << " accepted";
  }
  std::string longer = bytes + "x";
  EXPECT_EQ(ParseKvBlock({reinterpret_cast<const uint8_t*>(longer.data()), longer.size()}).status().code(),
            absl::StatusCode::kDataLoss);
  std::string junk = "not a kv block at all, but long enough to hold a header ............................................";
  EXPECT_NE(ParseKvBlock({reinterpret_cast<const uint8_t*>(junk.data()), junk.size()}).status().message().find("magic"),
            std::string::npos);
}

TEST_F(KvBlockTest, ForeignBlocksAreRefused) {
  KvCache cache(model_->config(), 64);
  std::vector<int32_t> prefix, ctx;
  Compute(cache, &prefix, &ctx);
  std::string bytes = SerializeKvBlock(Header(KvDtype::kFloat32, ctx.size(), prefix.size()), ctx, cache, prefix.size());
  auto view = *ParseKvBlock({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()});
  Hash128 pk{};
  pk[0] = 7;
  Hash128 other_fp = fp_;
  other_fp[15] ^= 1;
  EXPECT_EQ(CheckKvBlockMatches(view, other_fp, model_->config(), KvKind::kContext, pk).code(),
            absl::StatusCode::kFailedPrecondition);
  Hash128 other_prefix{};
  EXPECT_FALSE(CheckKvBlockMatches(view, fp_, model_->config(), KvKind::kContext, other_prefix).ok());
  EXPECT_FALSE(CheckKvBlockMatches(view, fp_, model_->config(), KvKind::kPrefix, pk).ok());
  ModelConfig c = model_->config();
  c.n_layers = 4;
  EXPECT_FALSE(CheckKvBlockMatches(view, fp_, c, KvKind::kContext, pk).ok());
}

TEST(CacheKeyTest, StableAndSensitiveToEveryInput) {
  Hash128 fp{};
  fp[0] = 1;
  std::vector<int32_t> p = {1, 5, 6}, c = {7, 8};
  Hash128 k = ComputeKvKey(fp, KvDtype::kFloat16, KvKind::kContext, p, c);
  EXPECT_EQ(k, ComputeKvKey(fp, KvDtype::kFloat16, KvKind::kContext, p, c));
  // Pinned: a change of this value breaks every cache in the field; it must
  // come with a format version bump.
  EXPECT_EQ(RedisKeyFor(k), "ape:v1:kv:" + HashToHex(k));
  EXPECT_NE(k, ComputeKvKey(fp, KvDtype::kFloat32, KvKind::kContext, p, c));
  EXPECT_NE(k, ComputeKvKey(fp, KvDtype::kFloat16, KvKind::kPrefix, p, c));
  EXPECT_NE(k, ComputeKvKey(fp, KvDtype::kFloat16, KvKind::kContext, {p.data(), 2}, c));
  // Moving a token across the prefix/context boundary changes the key.
  std::vector<int32_t> p2 = {1, 5}, c2 = {6, 7, 8};
  EXPECT_NE(k, ComputeKvKey(fp, KvDtype::kFloat16, KvKind::kContext, p2, c2));
  Hash128 fp2 = fp;
  fp2[3] = 9;
  EXPECT_NE(k, ComputeKvKey(fp2, KvDtype::kFloat16, KvKind::kContext, p, c));
  auto parsed = ParseRedisKey(RedisKeyFor(k));
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(*parsed, k);
  EXPECT_FALSE(ParseRedisKey("ape:v1:kv:xyz").ok());
  EXPECT_FALSE(ParseRedisKey("other:" + HashToHex(k)).ok());
}

}  // namespace
}  // namespace ape
