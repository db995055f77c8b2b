// APE attention against two simpler forms from APE.md section 3: a direct
// three-block implementation (prefix, contexts, query each with its own
// log-sum-exp, the contexts' times S*T) and the per-key closed form.
#include "common/engine/ape_attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

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
  static ModelConfig MakeConfig(int h, int kvh, int hd) {
    ModelConfig c;
    c.n_layers = 1;
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

}  // namespace
}  // namespace ape
