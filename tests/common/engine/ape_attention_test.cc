// APE attention against two simpler forms from APE.md section 3: a direct
// three-block implementation (prefix, contexts, query each with its own
// log-sum-exp, the contexts' times S*T) and the per-key closed form. Then
// the matrix-product kernel against the per-row reference kernel over GQA
// groups, head sizes, row counts, context placements and blockings.
#include "common/engine/ape_attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"

#include "common/engine/half.h"
#include "common/engine/transformer.h"

namespace ape {
namespace {

struct RandomCache {
  ModelConfig config;
  KvCache cache;
  std::vector<float> q;
  RandomCache(int n_heads, int n_kv_heads, int head_dim, int slots, int n_query, uint32_t seed)
      : config(MakeConfig(n_heads, n_kv_heads, head_dim)), cache(config, slots) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.5f);
    for (auto& x : cache.k) x = nd(rng);
    for (auto& x : cache.v) x = nd(rng);
    q.resize(static_cast<size_t>(n_query) * n_heads * head_dim);
    for (auto& x : q) x = nd(rng);
    cache.size = slots;
  }
  static ModelConfig MakeConfig(int h, int kvh, int hd, int layers = 1) {
    ModelConfig c;
    c.n_layers = layers;
    c.n_heads = h;
    c.n_kv_heads = kvh;
    c.head_dim = hd;
    c.dim = h * hd;
    return c;
  }
};

double Dot(const float* a, const float* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

double Lse(const std::vector<double>& x) {
  if (x.empty()) return -INFINITY;
  double m = *std::max_element(x.begin(), x.end()), s = 0;
  for (double v : x) s += std::exp(v - m);
  return m + std::log(s);
}

// Three blocks, each normalised on its own, merged with weights e^{lse}.
std::vector<float> ThreeBlock(const RandomCache& s, int row, int first_slot, const ApeParams& p) {
  const ModelConfig& c = s.config;
  std::vector<float> out(c.n_heads * c.head_dim);
  const int last = first_slot + row;
  for (int h = 0; h < c.n_heads; ++h) {
    const float* q = &s.q[(row * c.n_heads + h) * c.head_dim];
    const int kvo = h / (c.n_heads / c.n_kv_heads) * c.head_dim;
    struct Block {
      std::vector<double> logits;
      std::vector<int> slots;
      double weight_exp;
    };
    Block blocks[3];  // prefix, contexts, query
    for (int j = 0; j <= last; ++j) {
      double sj = Dot(q, s.cache.key(0, j) + kvo, c.head_dim) / std::sqrt(c.head_dim);
      int b = j < p.context_begin ? 0 : j < p.context_end ? 1 : 2;
      blocks[b].logits.push_back(b == 1 ? sj / p.temperature : sj);
      blocks[b].slots.push_back(j);
    }
    blocks[0].weight_exp = Lse(blocks[0].logits);
    blocks[1].weight_exp = p.scale * p.temperature * Lse(blocks[1].logits);
    blocks[2].weight_exp = Lse(blocks[2].logits);
    double total = 0;
    std::vector<double> acc(c.head_dim, 0.0);
    for (auto& b : blocks) {
      if (b.slots.empty()) continue;
      double lse = Lse(b.logits), w = std::exp(b.weight_exp);
      total += w;
      for (size_t k = 0; k < b.slots.size(); ++k) {
        double pk = std::exp(b.logits[k] - lse) * w;
        for (int d = 0; d < c.head_dim; ++d) acc[d] += pk * s.cache.value(0, b.slots[k])[kvo + d];
      }
    }
    for (int d = 0; d < c.head_dim; ++d) out[h * c.head_dim + d] = acc[d] / total;
  }
  return out;
}

// weight(j in C) = exp(s_j/T) Z_C^(ST-1) / (Z_C^(ST) + Z_O); weight(j in O) = exp(s_j) / (...).
std::vector<float> ClosedForm(const RandomCache& s, int row, int first_slot, const ApeParams& p) {
  const ModelConfig& c = s.config;
  std::vector<float> out(c.n_heads * c.head_dim);
  const int last = first_slot + row;
  for (int h = 0; h < c.n_heads; ++h) {
    const float* q = &s.q[(row * c.n_heads + h) * c.head_dim];
    const int kvo = h / (c.n_heads / c.n_kv_heads) * c.head_dim;
    std::vector<double> sc(last + 1);
    double zc = 0, zo = 0;
    for (int j = 0; j <= last; ++j) {
      sc[j] = Dot(q, s.cache.key(0, j) + kvo, c.head_dim) / std::sqrt(c.head_dim);
      if (j >= p.context_begin && j < p.context_end)
        zc += std::exp(sc[j] / p.temperature);
      else
        zo += std::exp(sc[j]);
    }
    const double st = p.scale * p.temperature;
    const double denom = std::pow(zc, st) + zo;
    for (int j = 0; j <= last; ++j) {
      const bool in_c = j >= p.context_begin && j < p.context_end;
      double wgt = in_c ? std::exp(sc[j] / p.temperature) * std::pow(zc, st - 1) / denom : std::exp(sc[j]) / denom;
      for (int d = 0; d < c.head_dim; ++d) out[h * c.head_dim + d] += wgt * s.cache.value(0, j)[kvo + d];
    }
  }
  return out;
}

struct Case {
  int heads, kv_heads, head_dim, prefix, contexts, query;
  float T, S;
  int threads;
};

class ApeAttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(ApeAttentionTest, AgreesWithThreeBlockAndClosedForm) {
  const Case& k = GetParam();
  SetComputeThreads(k.threads);
  const int slots = k.prefix + k.contexts + k.query;
  RandomCache s(k.heads, k.kv_heads, k.head_dim, slots, k.query, 1234 + slots);
  ApeParams p{k.prefix, k.prefix + k.contexts, k.T, k.S};
  const int first = k.prefix + k.contexts;
  std::vector<float> out(static_cast<size_t>(k.query) * k.heads * k.head_dim);
  ApeAttention(s.q.data(), k.query, first, s.cache, 0, k.heads, k.kv_heads, k.head_dim, p, out.data());
  for (int row = 0; row < k.query; ++row) {
    auto tb = ThreeBlock(s, row, first, p);
    auto cf = ClosedForm(s, row, first, p);
    for (size_t d = 0; d < tb.size(); ++d) {
      const float got = out[row * tb.size() + d];
      ASSERT_NEAR(got, tb[d], 2e-4f * (1 + std::abs(tb[d]))) << "row " << row << " d " << d;
      ASSERT_NEAR(got, cf[d], 2e-4f * (1 + std::abs(cf[d]))) << "row " << row << " d " << d;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, ApeAttentionTest,
                         ::testing::Values(Case{2, 1, 8, 3, 10, 4, 0.9f, 0.9f, 1},     // defaults, GQA
                                           Case{4, 2, 16, 5, 300, 7, 0.3f, 0.5f, 2},   // T, S far from 1, 2 threads
                                           Case{2, 2, 64, 1, 2000, 3, 0.5f, 0.2f, 2},  // long cache, many tiles
                                           Case{1, 1, 8, 4, 0, 5, 0.5f, 0.5f, 1},      // no contexts: plain causal
                                           Case{2, 1, 8, 2, 65, 1, 1.0f, 1.0f, 2},     // T = S = 1, tile edge
                                           Case{3, 3, 4, 0, 17, 2, 0.7f, 1.0f, 1}));   // no prefix at all

// Contexts are pooled: any permutation of context slots gives the same output.
TEST(ApeAttentionOrderTest, InvariantToContextOrder) {
  RandomCache s(2, 1, 8, 40, 2, 99);
  ApeParams p{4, 36, 0.6f, 0.8f};
  std::vector<float> a(2 * 16), b(2 * 16);
  ApeAttention(s.q.data(), 2, 38, s.cache, 0, 2, 1, 8, p, a.data());
  // Reverse the context slots 4..35 (keys and values together).
  for (int i = 0; i < 16; ++i) {
    std::swap_ranges(s.cache.key(0, 4 + i), s.cache.key(0, 4 + i) + 8, s.cache.key(0, 35 - i));
    std::swap_ranges(s.cache.value(0, 4 + i), s.cache.value(0, 4 + i) + 8, s.cache.value(0, 35 - i));
  }
  ApeAttention(s.q.data(), 2, 38, s.cache, 0, 2, 1, 8, p, b.data());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-5f);
}

// ---- The matrix-product kernel against the per-row reference kernel.

struct KernelCase {
  int heads, kv_heads, head_dim, n;
  int prefix, contexts;  // block C = slots [prefix, prefix + contexts)
  int first_slot;        // rows at slots first_slot .. first_slot + n - 1
  float T, S;
};

std::string CaseName(const ::testing::TestParamInfo<KernelCase>& info) {
  const KernelCase& k = info.param;
  return absl::StrFormat("g%d_d%d_n%d_ctx%d_first%d_%d", k.heads / k.kv_heads, k.head_dim, k.n, k.contexts,
                         k.first_slot, static_cast<int>(info.index));
}

// GQA groups 1, 2 and 7; head_dim 64 and 128; decode, 3, 32 and 300 rows;
// rows after C, starting at its end, starting inside it, and no C at all.
// 37 and 701 are not multiples of any tile or lane-block size.
std::vector<KernelCase> KernelCases() {
  std::vector<KernelCase> cases;
  const int kHeads[][2] = {{2, 2}, {4, 2}, {14, 2}};
  const int prefix = 37, contexts = 701, end = prefix + contexts;
  for (const auto& h : kHeads)
    for (int hd : {64, 128})
      for (int n : {1, 3, 32, 300}) {
        cases.push_back({h[0], h[1], hd, n, prefix, contexts, end + 13, 0.7f, 1.3f});   // generated tokens cached
        cases.push_back({h[0], h[1], hd, n, prefix, contexts, end, 0.5f, 0.8f});        // query right after C
        cases.push_back({h[0], h[1], hd, n, prefix, contexts, end - 350, 1.2f, 0.6f});  // rows inside C
        cases.push_back({h[0], h[1], hd, n, prefix, 0, 400, 0.5f, 0.5f});               // no context block
      }
  cases.push_back({14, 2, 64, 32, 0, 500, 100, 0.8f, 0.9f});   // no prefix, rows inside C: O empty, out = O_C
  cases.push_back({14, 2, 64, 40, 37, 300, 10, 0.8f, 0.9f});   // rows start in the prefix and run into C
  cases.push_back({8, 1, 80, 33, 5, 1000, 1005, 0.3f, 2.0f});  // MQA-like group 8, head_dim 80, big logits
  cases.push_back({7, 7, 16, 1, 3, 5000, 5003, 0.9f, 0.9f});   // decode over many keys (split into chunks)
  return cases;
}

class ApeKernelTest : public ::testing::TestWithParam<KernelCase> {};

// Tolerance: max |new - reference| <= 1e-5 * max |reference| over the case.
// Both are float32 and differ only in rounding: summation order (tiles,
// split-K merges) and the exponential (2^x here, e^x there, each about 2e-7
// relative). A logit s is exact to about |s| * 6e-8, and the weight exp(s)
// inherits that as a relative error: with logits up to ~20 here (T = 0.3,
// 0.5), a few 1e-6. These cases show at most 3.3e-6. A wrong weight (a key
// masked or counted twice, a block with the wrong scale, a bad merge) moves
// outputs by 1e-3 or more.
TEST_P(ApeKernelTest, AgreesWithReferenceKernel) {
  const KernelCase& k = GetParam();
  const int slots = k.first_slot + k.n;
  RandomCache s(k.heads, k.kv_heads, k.head_dim, slots, k.n, 77 + slots + k.n + k.heads);
  const ApeParams p{k.prefix, k.prefix + k.contexts, k.T, k.S};
  const size_t size = static_cast<size_t>(k.n) * k.heads * k.head_dim;
  std::vector<float> want(size);
  SetComputeThreads(2);
  ApeAttentionReference(s.q.data(), k.n, k.first_slot, s.cache, 0, k.heads, k.kv_heads, k.head_dim, p, want.data());
  float magnitude = 0.f;
  for (float x : want) magnitude = std::max(magnitude, std::abs(x));
  ASSERT_GT(magnitude, 0.f);

  // Default blocking, and small tiles/chunks that split every case into
  // several key chunks and tiles with remainders; 1 to 3 threads.
  const ApeKernelOptions kSmall{/*key_tile=*/23, /*target_lanes=*/16, /*min_chunk_keys=*/50};
  for (const ApeKernelOptions& opt : {ApeKernelOptions{}, kSmall})
    for (int threads : {1, 2, 3}) {
      SetComputeThreads(threads);
      std::vector<float> got(size, NAN);
      ApeAttention(s.q.data(), k.n, k.first_slot, s.cache, 0, k.heads, k.kv_heads, k.head_dim, p, got.data(), opt);
      float worst = 0.f;
      size_t at = 0;
      for (size_t i = 0; i < size; ++i) {
        const float diff = std::abs(got[i] - want[i]);
        if (!(diff <= worst)) worst = diff, at = i;  // NaN counts as worst
      }
      EXPECT_LE(worst, 1e-5f * magnitude)
          << "key_tile " << opt.key_tile << ", " << threads << " threads: row " << at / (k.heads * k.head_dim)
          << " got " << got[at] << " want " << want[at] << " (magnitude " << magnitude << ")";
    }
  SetComputeThreads(2);
}

// The AVX-512 lane blocks run every lane through the AVX2 kernels'
// operations in the same order (ape_attention.cc), so the two give the same
// bits, for every blocking: lane blocks of 1, 2 and 3 registers, and odd
// vector counts whose last block stays AVX2.
TEST_P(ApeKernelTest, Avx512LaneBlocksGiveAvx2Bits) {
  if (!CpuHasAvx512()) GTEST_SKIP() << "this CPU has no AVX512F: both settings run the AVX2 kernels";
  const KernelCase& k = GetParam();
  const int slots = k.first_slot + k.n;
  RandomCache s(k.heads, k.kv_heads, k.head_dim, slots, k.n, 91 + slots + k.n + k.heads);
  const ApeParams p{k.prefix, k.prefix + k.contexts, k.T, k.S};
  const size_t size = static_cast<size_t>(k.n) * k.heads * k.head_dim;
  const ApeKernelOptions kBlockings[] = {{}, {23, 16, 50}, {64, 96, 50}, {128, 512, 512, /*decode_kernel=*/false}};
  for (ApeKernelOptions opt : kBlockings) {
    std::vector<float> narrow(size, NAN), wide(size, NAN);
    opt.avx512 = false;
    ApeAttention(s.q.data(), k.n, k.first_slot, s.cache, 0, k.heads, k.kv_heads, k.head_dim, p, narrow.data(), opt);
    opt.avx512 = true;
    ApeAttention(s.q.data(), k.n, k.first_slot, s.cache, 0, k.heads, k.kv_heads, k.head_dim, p, wide.data(), opt);
    size_t differ = 0;
    for (size_t i = 0; i < size; ++i) differ += std::memcmp(&narrow[i], &wide[i], sizeof(float)) != 0;
    EXPECT_EQ(differ, 0u) << "target_lanes " << opt.target_lanes << ", key_tile " << opt.key_tile;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, ApeKernelTest, ::testing::ValuesIn(KernelCases()), CaseName);

// A read-only segment of `count` slots of random values stored as `e`, laid
// out as an entry's payload (per layer K then V, [slots][row] each) in a
// buffer the segment keeps alive; `values` gets the float32 values it holds
// (rounded through float16 or quantized to int8 as stored), in the same
// [layer][K/V][slot][kv_dim] order. Values are drawn in that order.
KvSegment RandomSegment(KvElement e, int count, const ModelConfig& c, std::mt19937& rng,
                        std::normal_distribution<float>& nd, std::vector<float>* values) {
  const int kv_dim = c.kv_dim();
  const size_t row = KvRowBytes(e, c.n_kv_heads, c.head_dim), half = static_cast<size_t>(count) * row;
  auto buf = std::make_shared<std::vector<uint8_t>>(2 * half * c.n_layers);
  values->assign(2 * static_cast<size_t>(count) * kv_dim * c.n_layers, 0.f);
  std::vector<float> x(kv_dim);
  for (size_t r = 0; r < 2 * static_cast<size_t>(count) * c.n_layers; ++r) {
    for (float& v : x) v = nd(rng);
    uint8_t* out = buf->data() + r * row;
    float* held = values->data() + r * kv_dim;
    switch (e) {
      case KvElement::kFloat32: std::memcpy(out, x.data(), row), std::copy(x.begin(), x.end(), held); break;
      case KvElement::kFloat16:
        for (int d = 0; d < kv_dim; ++d) {
          const uint16_t h = FloatToHalf(x[d]);
          std::memcpy(out + 2 * d, &h, 2);
          held[d] = HalfToFloat(h);
        }
        break;
      case KvElement::kInt8:
        QuantizeInt8Row(x.data(), c.n_kv_heads, c.head_dim, out);
        DequantizeInt8Row(out, c.n_kv_heads, c.head_dim, held);
        break;
    }
  }
  KvSegment seg;
  seg.count = count;
  seg.element = e;
  seg.row_stride = row;
  seg.layer_stride = 2 * half;
  seg.k = buf->data();
  seg.v = buf->data() + half;
  seg.owner = buf;
  return seg;
}

// ---- A cache of segments (kv_cache.h): float16, int8 and float32 runs
// viewed in place, then the writable float32 segment.
//
// The same values in a flat float32 cache (rounded through float16, or
// quantized, where a segment stores float16 or int8) must give the same
// outputs: the kernel converts per run of slots inside a tile, so tiles
// crossing segment boundaries, segments of one slot, and layers other than 0
// (the layer stride) are all exercised. Bit-identical: the tiles see the same
// float32 values (an int8 value is its scale times it, in both).
struct SegmentedCase {
  int heads, kv_heads, head_dim, n;
  std::vector<int> runs;  // read-only segment lengths; negative = float32
  int writable;           // slots of the writable segment (rows included)
  int prefix;             // block C = [prefix, sum of runs)
  bool int8 = false;      // the positive runs int8 instead of float16
};

class ApeSegmentedTest : public ::testing::TestWithParam<SegmentedCase> {};

TEST_P(ApeSegmentedTest, Float16AndInt8SegmentsEqualRoundedFloat32Cache) {
  const SegmentedCase& k = GetParam();
  constexpr int kLayers = 3;
  const ModelConfig c = RandomCache::MakeConfig(k.heads, k.kv_heads, k.head_dim, kLayers);
  const int kv_dim = c.kv_dim();
  int read_only = 0;
  for (int r : k.runs) read_only += std::abs(r);
  const int slots = read_only + k.writable;
  std::mt19937 rng(5 + slots);
  std::normal_distribution<float> nd(0.f, 1.5f);
  KvCache flat(c, slots);
  KvCache segmented(c, slots, read_only);
  const KvElement stored = k.int8 ? KvElement::kInt8 : KvElement::kFloat16;
  // Read-only runs: each in an entry's payload layout, in its own buffer
  // kept alive by the cache; the flat cache gets the values they hold.
  for (int r : k.runs) {
    const int count = std::abs(r), first = segmented.size;
    const size_t half = static_cast<size_t>(count) * kv_dim;
    std::vector<float> values;
    KvSegment seg = RandomSegment(r > 0 ? stored : KvElement::kFloat32, count, c, rng, nd, &values);
    for (int l = 0; l < kLayers; ++l) {
      std::copy_n(values.data() + 2 * l * half, half, flat.key(l, first));
      std::copy_n(values.data() + (2 * l + 1) * half, half, flat.value(l, first));
    }
    ASSERT_TRUE(segmented.AppendReadOnly(seg, 1000 + first).ok());
    for (int j = 0; j < count; ++j) flat.pos[first + j] = 1000 + first + j;
  }
  ASSERT_EQ(segmented.size, read_only);
  // Nothing more fits before the writable segment.
  KvSegment extra;
  extra.count = 1;
  EXPECT_EQ(segmented.AppendReadOnly(extra, 0).code(), absl::StatusCode::kFailedPrecondition);
  for (int l = 0; l < kLayers; ++l)
    for (int j = read_only; j < slots; ++j)
      for (int d = 0; d < kv_dim; ++d) {
        segmented.key(l, j)[d] = flat.key(l, j)[d] = nd(rng);
        segmented.value(l, j)[d] = flat.value(l, j)[d] = nd(rng);
      }
  flat.size = segmented.size = slots;
  // Every slot reads back the same through ReadRow.
  std::vector<float> ka(kv_dim), va(kv_dim), kb(kv_dim), vb(kv_dim);
  for (int j = 0; j < slots; ++j) {
    flat.ReadRow(2, j, ka.data(), va.data());
    segmented.ReadRow(2, j, kb.data(), vb.data());
    ASSERT_EQ(ka, kb) << j;
    ASSERT_EQ(va, vb) << j;
  }
  std::vector<float> q(static_cast<size_t>(k.n) * k.heads * k.head_dim);
  for (auto& x : q) x = nd(rng);
  const ApeParams p{k.prefix, read_only, 0.7f, 0.9f};
  const int first_slot = slots - k.n;
  const size_t size = q.size();
  const ApeKernelOptions kSmall{/*key_tile=*/23, /*target_lanes=*/16, /*min_chunk_keys=*/50};
  for (int layer : {0, 2})
    for (const ApeKernelOptions& opt : {ApeKernelOptions{}, kSmall}) {
      std::vector<float> want(size), got(size, NAN);
      ApeAttention(q.data(), k.n, first_slot, flat, layer, k.heads, k.kv_heads, k.head_dim, p, want.data(), opt);
      ApeAttention(q.data(), k.n, first_slot, segmented, layer, k.heads, k.kv_heads, k.head_dim, p, got.data(), opt);
      for (size_t i = 0; i < size; ++i)
        ASSERT_EQ(got[i], want[i]) << "layer " << layer << " tile " << opt.key_tile << " at " << i;
      // And the reference kernel reads segments too.
      std::vector<float> ref_flat(size), ref_seg(size);
      ApeAttentionReference(q.data(), k.n, first_slot, flat, layer, k.heads, k.kv_heads, k.head_dim, p,
                            ref_flat.data());
      ApeAttentionReference(q.data(), k.n, first_slot, segmented, layer, k.heads, k.kv_heads, k.head_dim, p,
                            ref_seg.data());
      // (Not bit-identical: its dot products vectorize by the rows'
      // alignment, which differs between a converted row and a cache row.)
      float magnitude = 0.f;
      for (float x : ref_flat) magnitude = std::max(magnitude, std::abs(x));
      for (size_t i = 0; i < size; ++i) {
        ASSERT_NEAR(ref_seg[i], ref_flat[i], 1e-5f * magnitude) << i;
        ASSERT_NEAR(got[i], ref_flat[i], 1e-5f * magnitude) << i;
      }
    }
  // Bytes read: float16 runs count half, int8 ones a byte a value and their scales.
  size_t want_bytes = 0;
  for (int r : k.runs) {
    want_bytes += 2 * static_cast<size_t>(std::abs(r)) *
                  (r < 0    ? kv_dim * 4
                   : k.int8 ? kv_dim + 4 * k.kv_heads
                            : kv_dim * 2);
  }
  want_bytes += 2 * static_cast<size_t>(k.writable) * kv_dim * 4;
  EXPECT_EQ(segmented.KvBytesRead(slots), want_bytes);
  EXPECT_EQ(flat.KvBytesRead(slots), 2 * static_cast<size_t>(slots) * kv_dim * 4);
}

INSTANTIATE_TEST_SUITE_P(
    Runs, ApeSegmentedTest,
    ::testing::Values(
        // A prefix, contexts of odd lengths (tiles of 128 and 23 cross them), one of a single slot.
        SegmentedCase{14, 2, 64, 1, {8, 300, 1, 77, 129}, 5, 8},
        SegmentedCase{14, 2, 64, 32, {8, 300, 1, 77, 129}, 40, 8},
        // float32 runs between float16 ones (a float32 entry), head_dim 128, GQA 2.
        SegmentedCase{4, 2, 128, 3, {5, -40, 200, -1, 64}, 3, 5},
        // Odd widths: kv_dim 3 * 12 = 36 (not a multiple of 8: the scalar tail of the conversion).
        SegmentedCase{3, 3, 12, 2, {2, 33, 17}, 4, 2},
        // int8 runs (rows of 136 bytes: values, then the 2 heads' scales), between float32 ones too.
        SegmentedCase{14, 2, 64, 32, {8, 300, 1, 77, 129}, 40, 8, true},
        SegmentedCase{4, 2, 128, 3, {5, -40, 200, -1, 64}, 3, 5, true},
        // int8 with odd head_dim: scales at odd offsets, values past the last whole 8.
        SegmentedCase{3, 3, 13, 2, {2, 33, 17}, 4, 2, true}));

// ---- Decode (one row) over many segments: the head_dim-vectorized decode
// kernel against the reference kernel and the matrix-product kernels.
//
// The decoder's APE cache is one float16 segment per context (a cache
// entry), then the writable float32 rows. Segments of odd lengths (1 to 61
// slots, some float32) make tiles of every blocking cross segment edges and
// hold lone keys at run ends; C starts inside the first segment and ends
// inside a later one, so block pieces split runs too.
struct DecodeCase {
  int heads, kv_heads, head_dim;
  int segments;  // read-only segments before the writable rows
  int writable;  // writable slots; the decode row is the last one
  int prefix;    // block C = [prefix, context_end)
  int c_tail;    // context_end = read-only slots - c_tail (O after C within the segments); < 0: no C
  float T, S;
  bool int8 = false;  // the segments that are not float32 are int8, not float16
};

class ApeDecodeTest : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(ApeDecodeTest, ManySegmentsAgreeWithReference) {
  const DecodeCase& k = GetParam();
  constexpr int kLayers = 2;
  const ModelConfig c = RandomCache::MakeConfig(k.heads, k.kv_heads, k.head_dim, kLayers);
  const int kv_dim = c.kv_dim();
  std::mt19937 rng(11 + k.segments * 7 + k.head_dim);
  std::normal_distribution<float> nd(0.f, 1.5f);
  std::vector<int> lengths;  // negative: a float32 segment
  int read_only = 0;
  for (int i = 0; i < k.segments; ++i) {
    const int len = 1 + (i * 37 + 11) % 61;
    lengths.push_back(i % 5 == 3 ? -len : len);
    read_only += len;
  }
  const int slots = read_only + k.writable;
  KvCache cache(c, slots, read_only);
  const KvElement stored = k.int8 ? KvElement::kInt8 : KvElement::kFloat16;
  for (int r : lengths) {
    std::vector<float> values;
    KvSegment seg = RandomSegment(r > 0 ? stored : KvElement::kFloat32, std::abs(r), c, rng, nd, &values);
    ASSERT_TRUE(cache.AppendReadOnly(seg, cache.size).ok());
  }
  for (int l = 0; l < kLayers; ++l)
    for (int j = read_only; j < slots; ++j)
      for (int d = 0; d < kv_dim; ++d) cache.key(l, j)[d] = nd(rng), cache.value(l, j)[d] = nd(rng);
  cache.size = slots;
  std::vector<float> q(static_cast<size_t>(k.heads) * k.head_dim);
  for (auto& x : q) x = nd(rng);
  const ApeParams p{k.prefix, k.c_tail < 0 ? k.prefix : read_only - k.c_tail, k.T, k.S};
  const int first_slot = slots - 1;
  ApeKernelOptions matrix;
  matrix.decode_kernel = false;
  for (int layer = 0; layer < kLayers; ++layer) {
    SetComputeThreads(2);
    std::vector<float> want(q.size()), other(q.size());
    ApeAttentionReference(q.data(), 1, first_slot, cache, layer, k.heads, k.kv_heads, k.head_dim, p, want.data());
    ApeAttention(q.data(), 1, first_slot, cache, layer, k.heads, k.kv_heads, k.head_dim, p, other.data(), matrix);
    float magnitude = 0.f;
    for (float x : want) magnitude = std::max(magnitude, std::abs(x));
    ASSERT_GT(magnitude, 0.f);
    // Tiles of 64 keys (the default over 2 KV heads), of 11 and of 1; key
    // chunks of the default size and of 50 keys; 1 to 3 threads.
    const ApeKernelOptions kOptions[] = {{}, {23, 16, 50}, {2, 16, 50}};
    for (const ApeKernelOptions& opt : kOptions)
      for (int threads : {1, 2, 3}) {
        SetComputeThreads(threads);
        std::vector<float> got(q.size(), NAN);
        ApeAttention(q.data(), 1, first_slot, cache, layer, k.heads, k.kv_heads, k.head_dim, p, got.data(), opt);
        for (size_t i = 0; i < q.size(); ++i) {
          ASSERT_NEAR(got[i], want[i], 1e-5f * magnitude)
              << "layer " << layer << " key_tile " << opt.key_tile << " threads " << threads << " at " << i;
          ASSERT_NEAR(got[i], other[i], 1e-5f * magnitude)
              << "layer " << layer << " key_tile " << opt.key_tile << " threads " << threads << " at " << i;
        }
      }
  }
  SetComputeThreads(2);
}

INSTANTIATE_TEST_SUITE_P(Segments, ApeDecodeTest,
                         ::testing::Values(
                             // The Qwen2.5-0.5B attention shape: GQA 7, head_dim 64.
                             DecodeCase{14, 2, 64, 60, 9, 5, 0, 0.8f, 0.9f},
                             // O keys after C inside the segments; big logits (T = 0.3).
                             DecodeCase{14, 2, 64, 25, 3, 1, 40, 0.3f, 2.0f},
                             // GQA 8 (two head blocks of 4), head_dim 72 (rows of 144 bytes
                             // in float16: a 16-byte tail in the tile copy), one KV head.
                             DecodeCase{8, 1, 72, 30, 2, 3, 0, 0.7f, 1.3f},
                             // GQA 1 and 3, head_dim 8 and 128.
                             DecodeCase{4, 4, 8, 40, 5, 2, 7, 0.9f, 0.9f},
                             DecodeCase{6, 2, 128, 20, 4, 0, 0, 0.5f, 0.8f},
                             // No context block: ordinary attention over the segments.
                             DecodeCase{14, 2, 64, 10, 6, 0, -1, 1.f, 1.f},
                             // int8 segments: the Qwen shape, GQA 8 with head_dim 72, GQA 1.
                             DecodeCase{14, 2, 64, 60, 9, 5, 0, 0.8f, 0.9f, true},
                             DecodeCase{8, 1, 72, 30, 2, 3, 0, 0.7f, 1.3f, true},
                             DecodeCase{4, 4, 8, 40, 5, 2, 7, 0.9f, 0.9f, true}));

}  // namespace
}  // namespace ape
