// KV blocks: round trips (bit-exact float32, float16 within rounding, int8
// within half a scale step), keys, and malformed bytes (truncations, bit
// flips, foreign headers, damaged int8 scales).
#include "common/kv/kv_block.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <utility>

#include "common/engine/half.h"
#include "common/engine/transformer.h"
#include "common/kv/cache_key.h"
#include "tests/test_util.h"
#include "xxhash.h"

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

TEST_F(KvBlockTest, RoundTripFloat32BitExactFloat16AndInt8WithinRounding) {
  KvCache cache(model_->config(), 64);
  std::vector<int32_t> prefix, ctx;
  Compute(cache, &prefix, &ctx);
  const int lp = prefix.size(), n = ctx.size(), hd = model_->config().head_dim;
  // int8: at most half a step of the row's head scale (its largest |value| / 127).
  const auto int8_bound = [&](const float* row, int d) {
    float amax = 0.f;
    for (int i = d / hd * hd; i < (d / hd + 1) * hd; ++i) amax = std::max(amax, std::abs(row[i]));
    return amax / 127.f * 0.5f * (1.f + 1e-5f) + 1e-7f;
  };
  for (KvDtype dtype : {KvDtype::kFloat32, KvDtype::kFloat16, KvDtype::kInt8}) {
    std::string bytes = SerializeKvBlock(Header(dtype, n, lp), ctx, cache, lp);
    EXPECT_EQ(bytes.size(), kKvHeaderFixedBytes + 4 * n + KvBytesPerToken(model_->config(), dtype) * n + 16);
    auto view = ParseKvBlock({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()});
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ(view->tokens, ctx);
    Hash128 pk{};
    pk[0] = 7;
    EXPECT_TRUE(CheckKvBlockMatches(*view, fp_, model_->config(), dtype, KvKind::kContext, pk).ok());
    KvCache loaded(model_->config(), 64);
    ASSERT_TRUE(LoadKvBlock(*view, loaded, 3).ok());
    for (int l = 0; l < model_->config().n_layers; ++l) {
      for (int t = 0; t < n; ++t) {
        EXPECT_EQ(loaded.pos[3 + t], lp + t);
        for (int d = 0; d < loaded.kv_dim; ++d) {
          float want_k = cache.key(l, lp + t)[d], got_k = loaded.key(l, 3 + t)[d];
          float want_v = cache.value(l, lp + t)[d], got_v = loaded.value(l, 3 + t)[d];
          if (dtype == KvDtype::kFloat32) {
            ASSERT_EQ(got_k, want_k);
            ASSERT_EQ(got_v, want_v);
          } else if (dtype == KvDtype::kInt8) {
            ASSERT_NEAR(got_k, want_k, int8_bound(cache.key(l, lp + t), d));
            ASSERT_NEAR(got_v, want_v, int8_bound(cache.value(l, lp + t), d));
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
  std::string junk =
      "not a kv block at all, but long enough to hold a header ............................................";
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
  const KvDtype f32 = KvDtype::kFloat32;
  EXPECT_TRUE(CheckKvBlockMatches(view, fp_, model_->config(), f32, KvKind::kContext, pk).ok());
  EXPECT_EQ(CheckKvBlockMatches(view, other_fp, model_->config(), f32, KvKind::kContext, pk).code(),
            absl::StatusCode::kFailedPrecondition);
  Hash128 other_prefix{};
  EXPECT_FALSE(CheckKvBlockMatches(view, fp_, model_->config(), f32, KvKind::kContext, other_prefix).ok());
  EXPECT_FALSE(CheckKvBlockMatches(view, fp_, model_->config(), f32, KvKind::kPrefix, pk).ok());
  auto dtype = CheckKvBlockMatches(view, fp_, model_->config(), KvDtype::kFloat16, KvKind::kContext, pk);
  EXPECT_EQ(dtype.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(dtype.message().find("holds float32, not float16"), std::string::npos) << dtype;
  ModelConfig c = model_->config();
  c.n_layers = 4;
  EXPECT_FALSE(CheckKvBlockMatches(view, fp_, c, f32, KvKind::kContext, pk).ok());
}

// The header alone: from its first 96 bytes, the fields and the whole
// block's size; a truncated or damaged header is refused as ParseKvBlock
// would, a newer version is UNIMPLEMENTED.
TEST_F(KvBlockTest, HeaderParsesFromTheFirstBytes) {
  KvCache cache(model_->config(), 64);
  std::vector<int32_t> prefix, ctx;
  Compute(cache, &prefix, &ctx);
  const KvBlockHeader h = Header(KvDtype::kFloat16, ctx.size(), prefix.size());
  const std::string block = SerializeKvBlock(h, ctx, cache, prefix.size());
  const auto bytes = [](const std::string& s, size_t n) {
    return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), std::min(n, s.size()));
  };
  auto got = ParseKvBlockHeader(bytes(block, kKvHeaderFixedBytes));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->num_tokens, ctx.size());
  EXPECT_EQ(got->first_position, prefix.size());
  EXPECT_EQ(got->dtype, KvDtype::kFloat16);
  EXPECT_EQ(got->model_fingerprint, fp_);
  EXPECT_EQ(got->prefix_key, h.prefix_key);
  EXPECT_EQ(KvBlockBytes(*got), block.size());
  EXPECT_EQ(ParseKvBlockHeader(bytes(block, kKvHeaderFixedBytes - 1)).status().code(), absl::StatusCode::kDataLoss);
  std::string bad = block;
  bad[52] ^= 1;  // num_tokens: header_bytes disagrees
  EXPECT_EQ(ParseKvBlockHeader(bytes(bad, kKvHeaderFixedBytes)).status().code(), absl::StatusCode::kDataLoss);
  std::string newer = block;
  newer[8] = 2;  // format version
  EXPECT_EQ(ParseKvBlockHeader(bytes(newer, kKvHeaderFixedBytes)).status().code(), absl::StatusCode::kUnimplemented);
}

// An int8 block whose checksum is right but whose scale is not a scale an
// encoder writes (negative, NaN, infinite) is refused.
TEST_F(KvBlockTest, Int8BadScalesAreRefused) {
  KvCache cache(model_->config(), 64);
  std::vector<int32_t> prefix, ctx;
  Compute(cache, &prefix, &ctx);
  const KvBlockHeader h = Header(KvDtype::kInt8, ctx.size(), prefix.size());
  const std::string block = SerializeKvBlock(h, ctx, cache, prefix.size());
  const size_t header = kKvHeaderFixedBytes + 4 * ctx.size(), kv_dim = size_t{h.n_kv_heads} * h.head_dim;
  const size_t row = KvRowBytes(KvDtype::kInt8, h.n_kv_heads, h.head_dim);
  ASSERT_EQ(row, kv_dim + 4 * h.n_kv_heads);
  ASSERT_TRUE(ParseKvBlock({reinterpret_cast<const uint8_t*>(block.data()), block.size()}).ok());
  for (const float bad : {-1.f, std::nanf(""), INFINITY}) {
    std::string b = block;
    // The second KV head's scale of the third row (layer 0's keys).
    std::memcpy(b.data() + header + 2 * row + kv_dim + 4 * (h.n_kv_heads - 1), &bad, sizeof(bad));
    const XXH128_hash_t sum = XXH3_128bits(b.data(), b.size() - 16);
    for (int i = 0; i < 8; ++i) {
      b[b.size() - 16 + i] = static_cast<char>(sum.high64 >> (56 - 8 * i));
      b[b.size() - 8 + i] = static_cast<char>(sum.low64 >> (56 - 8 * i));
    }
    auto v = ParseKvBlock({reinterpret_cast<const uint8_t*>(b.data()), b.size()});
    EXPECT_EQ(v.status().code(), absl::StatusCode::kDataLoss) << bad;
    EXPECT_NE(v.status().message().find("scale"), std::string::npos) << v.status();
  }
}

// The int8 row of kv_cache.h, worked by hand: head 0 = {1, -0.5, 0.25, 0}
// has scale 1/127 and values 127, -63.5 -> -64 (ties to even), 31.75 -> 32,
// 0; head 1, all zeros, has scale 0.
TEST(KvInt8RowTest, LayoutWorkedByHand) {
  const float x[8] = {1.f, -0.5f, 0.25f, 0.f, 0.f, 0.f, 0.f, 0.f};
  ASSERT_EQ(KvRowBytes(KvElement::kInt8, 2, 4), 16u);
  uint8_t row[16];
  QuantizeInt8Row(x, 2, 4, row);
  const uint8_t want_q[8] = {127, 0xC0, 32, 0, 0, 0, 0, 0};
  EXPECT_EQ(std::memcmp(row, want_q, 8), 0);
  EXPECT_EQ(Int8Scale(row, 8, 0), 1.f / 127.f);
  EXPECT_EQ(Int8Scale(row, 8, 1), 0.f);
  float back[8];
  DequantizeInt8Row(row, 2, 4, back);
  EXPECT_EQ(back[0], 127.f * (1.f / 127.f));
  EXPECT_EQ(back[1], -64.f / 127.f);
  EXPECT_EQ(back[2], 32.f / 127.f);
  for (int i = 3; i < 8; ++i) EXPECT_EQ(back[i], 0.f);
}

TEST(KvDtypeTest, NamesRoundTripAndOthersAreRefused) {
  for (KvDtype d : {KvDtype::kFloat16, KvDtype::kFloat32, KvDtype::kInt8}) {
    auto parsed = ParseKvDtype(KvDtypeName(d));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_STREQ(KvDtypeName(KvDtype::kFloat16), "float16");
  EXPECT_STREQ(KvDtypeName(KvDtype::kFloat32), "float32");
  EXPECT_STREQ(KvDtypeName(KvDtype::kInt8), "int8");
  for (const char* bad : {"", "fp16", "Float16", "float64", "float16 "}) {
    EXPECT_EQ(ParseKvDtype(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

// The bytes of kv_block_format.md, pinned: every header field at its offset,
// and the XXH3-128 of two whole blocks (f16, f32) of a synthetic cache. A
// change of these values changes every stored entry: it needs a version bump.
TEST(KvBlockFormatTest, BytesArePinned) {
  ModelConfig c;
  c.n_layers = 2;
  c.n_heads = c.n_kv_heads = 2;
  c.head_dim = 4;
  KvCache cache(c, 8);
  for (size_t i = 0; i < cache.k.size(); ++i) {
    cache.k[i] = 0.25f * static_cast<float>(i % 13) - 1.f;
    cache.v[i] = 0.5f - 0.125f * static_cast<float>(i % 7);
  }
  KvBlockHeader h;
  for (int i = 0; i < 16; ++i) {
    h.model_fingerprint[i] = static_cast<uint8_t>(0xa0 + i);
    h.prefix_key[i] = static_cast<uint8_t>(0x10 + i);
  }
  h.n_layers = 2;
  h.n_kv_heads = 2;
  h.head_dim = 4;
  h.kind = KvKind::kContext;
  h.num_tokens = 3;
  h.first_position = 5;
  const std::vector<int32_t> tokens = {7, 300, 2};
  std::map<KvDtype, std::string> digests;
  for (KvDtype dtype : {KvDtype::kFloat16, KvDtype::kFloat32}) {
    h.dtype = dtype;
    const std::string b = SerializeKvBlock(h, tokens, cache, 2);
    auto u32 = [&](size_t at) {
      uint32_t v;
      std::memcpy(&v, b.data() + at, 4);
      return v;
    };
    auto u64 = [&](size_t at) {
      uint64_t v;
      std::memcpy(&v, b.data() + at, 8);
      return v;
    };
    ASSERT_EQ(b.size(), 96 + 4 * 3 + h.payload_bytes() + 16);
    EXPECT_EQ(b.substr(0, 8), std::string("APEKV\r\n\x1a", 8));
    EXPECT_EQ(u32(8), 1u);
    EXPECT_EQ(u32(12), 96u + 4 * 3);
    EXPECT_EQ(b.substr(16, 16), std::string(reinterpret_cast<const char*>(h.model_fingerprint.data()), 16));
    EXPECT_EQ(u32(32), 2u);
    EXPECT_EQ(u32(36), 2u);
    EXPECT_EQ(u32(40), 4u);
    EXPECT_EQ(u32(44), static_cast<uint32_t>(dtype));
    EXPECT_EQ(u32(48), 2u);
    EXPECT_EQ(u32(52), 3u);
    EXPECT_EQ(u32(56), 5u);
    EXPECT_EQ(u32(60), 0u);
    EXPECT_EQ(b.substr(64, 16), std::string(reinterpret_cast<const char*>(h.prefix_key.data()), 16));
    EXPECT_EQ(u64(80), h.payload_bytes());
    EXPECT_EQ(u64(88), 0u);
    EXPECT_EQ(u32(96), 7u);
    EXPECT_EQ(u32(100), 300u);
    EXPECT_EQ(u32(104), 2u);
    XXH128_hash_t sum = XXH3_128bits(b.data(), b.size() - 16);
    EXPECT_EQ(b.substr(b.size() - 16),
              std::string(reinterpret_cast<const char*>(HashFromHalves(sum.high64, sum.low64).data()), 16));
    XXH128_hash_t whole = XXH3_128bits(b.data(), b.size());
    digests[dtype] = HashToHex(HashFromHalves(whole.high64, whole.low64));
  }
  EXPECT_EQ(digests[KvDtype::kFloat16], "7da99d5790767f1648b3acdafa89b9f6");
  EXPECT_EQ(digests[KvDtype::kFloat32], "424f948915372a0c36c7473fd46cc7fd");
}

TEST(CacheKeyTest, StableAndSensitiveToEveryInput) {
  Hash128 fp{};
  fp[0] = 1;
  std::vector<int32_t> p = {1, 5, 6}, c = {7, 8};
  Hash128 k = ComputeKvKey(fp, KvDtype::kFloat16, KvKind::kContext, p, c);
  EXPECT_EQ(k, ComputeKvKey(fp, KvDtype::kFloat16, KvKind::kContext, p, c));
  // Pinned: a change of this value breaks every cache in the field; it must
  // come with a format version bump.
  EXPECT_EQ(RedisKeyFor(k), "ape:v1:kv:0b5f2641842d4a8e59678084a0ea48a7");
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

// AttachKvBlock views the payload in place (no copy): every slot reads back
// what LoadKvBlock would have written (float16 converted the same way), the
// positions follow first_position, and re-serialising slots of a segmented
// cache, across segments, gives the original bytes. Shape and room are
// checked before anything changes.
TEST_F(KvBlockTest, AttachViewsPayloadInPlace) {
  KvCache cache(model_->config(), 64);
  std::vector<int32_t> prefix, ctx;
  Compute(cache, &prefix, &ctx);
  const int lp = prefix.size(), n = ctx.size(), kv_dim = cache.kv_dim;
  for (KvDtype dtype : {KvDtype::kFloat16, KvDtype::kFloat32, KvDtype::kInt8}) {
    auto entry = std::make_shared<KvEntry>(SerializeKvBlock(Header(dtype, n, lp), ctx, cache, lp));
    auto view = ParseKvBlock(entry->span());
    ASSERT_TRUE(view.ok()) << view.status();
    entry->view = *view;
    // Two copies of the block, then 5 writable slots.
    KvCache attached(model_->config(), 2 * n + 5, 2 * n);
    ASSERT_TRUE(AttachKvBlock(entry->view, entry, attached).ok());
    ASSERT_TRUE(AttachKvBlock(entry->view, entry, attached).ok());
    EXPECT_EQ(attached.size, 2 * n);
    EXPECT_EQ(entry.use_count(), 3);  // the two segments hold it
    // No room left before the writable segment: refused, nothing changed.
    EXPECT_EQ(AttachKvBlock(entry->view, entry, attached).code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(attached.size, 2 * n);
    KvCache loaded(model_->config(), n);
    ASSERT_TRUE(LoadKvBlock(entry->view, loaded, 0).ok());
    std::vector<float> k(kv_dim), v(kv_dim);
    for (int l = 0; l < model_->config().n_layers; ++l)
      for (int t = 0; t < 2 * n; ++t) {
        EXPECT_EQ(attached.pos[t], lp + t % n);
        attached.ReadRow(l, t, k.data(), v.data());
        for (int d = 0; d < kv_dim; ++d) {
          ASSERT_EQ(k[d], loaded.key(l, t % n)[d]);
          ASSERT_EQ(v[d], loaded.value(l, t % n)[d]);
        }
        // float32 rows are reachable as pointers; float16 ones are not.
        EXPECT_EQ(std::as_const(attached).key(l, t) != nullptr, dtype == KvDtype::kFloat32);
      }
    // Slots n-3 .. n+2 span both segments: serialised back, they are the
    // original values (float16 to float16, int8 to int8 is exact).
    std::vector<int32_t> six(ctx.begin() + n - 3, ctx.end());
    six.insert(six.end(), ctx.begin(), ctx.begin() + 3);
    const std::string again = SerializeKvBlock(Header(dtype, 6, lp), six, attached, n - 3);
    auto v6 = ParseKvBlock({reinterpret_cast<const uint8_t*>(again.data()), again.size()});
    ASSERT_TRUE(v6.ok()) << v6.status();
    KvCache six_loaded(model_->config(), 6);
    ASSERT_TRUE(LoadKvBlock(*v6, six_loaded, 0).ok());
    for (int l = 0; l < model_->config().n_layers; ++l)
      for (int t = 0; t < 6; ++t)
        for (int d = 0; d < kv_dim; ++d) ASSERT_EQ(six_loaded.key(l, t)[d], loaded.key(l, (n - 3 + t) % n)[d]);
    // The cache ends, the entry is free again.
    {
      KvCache scoped(model_->config(), n, n);
      ASSERT_TRUE(AttachKvBlock(entry->view, entry, scoped).ok());
    }
    EXPECT_EQ(entry.use_count(), 3);
  }
  // Another shape: refused.
  ModelConfig other = model_->config();
  other.n_layers += 1;
  auto entry = std::make_shared<KvEntry>(SerializeKvBlock(Header(KvDtype::kFloat16, n, lp), ctx, cache, lp));
  entry->view = *ParseKvBlock(entry->span());
  KvCache wrong(other, n, n);
  EXPECT_EQ(AttachKvBlock(entry->view, entry, wrong).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(wrong.size, 0);
  // LoadKvBlock writes only the writable segment.
  KvCache ro(model_->config(), n + 1, n);
  EXPECT_EQ(LoadKvBlock(entry->view, ro, 0).code(), absl::StatusCode::kFailedPrecondition);
}

// The pool hands back what was released, keeps at most its idle bound, and
// caches draw from the global pool.
TEST(KvPoolTest, ReusesChunksWithinItsBound) {
  KvPool pool(/*max_idle_bytes=*/size_t{8} << 20);
  void* first;
  {
    KvPool::Chunk a = pool.Acquire(3 << 20);
    ASSERT_NE(a.data(), nullptr);
    EXPECT_GE(a.bytes(), size_t{3} << 20);
    std::memset(a.data(), 1, 3 << 20);
    first = a.data();
    EXPECT_EQ(pool.stats().in_use_bytes, a.bytes());
  }
  EXPECT_EQ(pool.stats().in_use_bytes, 0u);
  EXPECT_GT(pool.stats().idle_bytes, 0u);
  {
    KvPool::Chunk b = pool.Acquire((3 << 20) - 100);  // the same class: the same memory
    EXPECT_EQ(b.data(), first);
    EXPECT_EQ(pool.stats().reused, 1);
  }
  // Over the idle bound: the oldest idle chunks are unmapped.
  { KvPool::Chunk c = pool.Acquire(5 << 20), d = pool.Acquire(5 << 20); }
  EXPECT_LE(pool.stats().idle_bytes, size_t{8} << 20);
  EXPECT_GT(pool.stats().unmapped, 0);
  pool.Trim();
  EXPECT_EQ(pool.stats().idle_bytes, 0u);
  // A chunk larger than the bound is never kept.
  { KvPool::Chunk big = pool.Acquire(9 << 20); }
  EXPECT_EQ(pool.stats().idle_bytes, 0u);
  // Caches use the global pool: a second cache of the same size reuses.
  ModelConfig c;
  c.n_layers = 4;
  c.n_heads = c.n_kv_heads = 2;
  c.head_dim = 64;
  c.dim = 128;
  const int64_t reused = KvPool::Global().stats().reused;
  { KvCache a(c, 4096); }
  { KvCache b(c, 4096); }
  EXPECT_GT(KvPool::Global().stats().reused, reused);
}

}  // namespace
}  // namespace ape
