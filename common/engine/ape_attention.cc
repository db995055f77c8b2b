// APE attention, following docs/APE.md ("The attention") step by step.
//
//   s_j = q.k_j / sqrt(d)
//   Z_C = sum_{j in C} exp(s_j / T)       O_C = sum_{j in C} exp(s_j / T) v_j / Z_C
//   Z_O = sum_{j in O} exp(s_j)           O_O = sum_{j in O} exp(s_j) v_j / Z_O
//   a   = (S*T) * log Z_C                 b   = log Z_O
//   out = (e^a O_C + e^b O_O) / (e^a + e^b)
//
// C = every cached context token (all contexts pooled, no mask among them);
// O = prefix tokens plus query/generated tokens up to the row itself.
#include "common/engine/ape_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/engine/threading.h"

namespace ape {
namespace {
constexpr int kTile = 64;  // keys scored per step (a stack buffer)

// expf for finite x, branch-free so that tile loops vectorize (Cephes'
// polynomial; relative error about 2e-7, like libm's expf in float).
inline float Exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}
}  // namespace

void AccumulateBlock(const float* q, const KvCache& cache, int layer, int kv_head_offset, int head_dim, int begin,
                     int end, float logit_scale, AttentionState* st) {
  float s[kTile];
  for (int t0 = begin; t0 < end; t0 += kTile) {
    const int nt = std::min(kTile, end - t0);
    // Score a tile of keys and find its maximum.
    float tile_max = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < nt; ++j) {
      const float* k = cache.key(layer, t0 + j) + kv_head_offset;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int d = 0; d < head_dim; ++d) dot += q[d] * k[d];
      s[j] = dot * logit_scale;
      tile_max = std::max(tile_max, s[j]);
    }
    // Rescale what was accumulated if the running max grew.
    if (tile_max > st->m) {
      const float r = std::exp(st->m - tile_max);  // exp(-inf) = 0 on the first tile
      st->l *= r;
      for (int d = 0; d < head_dim; ++d) st->acc[d] *= r;
      st->m = tile_max;
    }
    float p[kTile];
#pragma omp simd
    for (int j = 0; j < nt; ++j) p[j] = Exp(s[j] - st->m);
    for (int j = 0; j < nt; ++j) {
      const float* v = cache.value(layer, t0 + j) + kv_head_offset;
      st->l += p[j];
#pragma omp simd
      for (int d = 0; d < head_dim; ++d) st->acc[d] += p[j] * v[d];
    }
  }
}

void ApeAttention(const float* q, int n, int first_slot, const KvCache& cache, int layer, int n_heads, int n_kv_heads,
                  int head_dim, const ApeParams& ape, float* out) {
  const int q_dim = n_heads * head_dim;
  const int group = n_heads / n_kv_heads;
  const float inv_sqrt_d = 1.f / std::sqrt(static_cast<float>(head_dim));
  const float st_exponent = ape.scale * ape.temperature;  // S*T

  // One task per (row, head) pair; rows see different numbers of keys.
  ParallelFor(static_cast<int64_t>(n) * n_heads, /*dynamic=*/true, [&](int64_t task) {
    const int i = static_cast<int>(task / n_heads), h = static_cast<int>(task % n_heads);
    const float* qh = q + static_cast<size_t>(i) * q_dim + h * head_dim;
    float* oh = out + static_cast<size_t>(i) * q_dim + h * head_dim;
    const int kv_off = (h / group) * head_dim;
    const int last = first_slot + i;  // the row sees slots [0, last]
    const int cb = std::min(ape.context_begin, last + 1);
    const int ce = std::min(ape.context_end, last + 1);

    // Block O: prefix [0, cb) and everything after the contexts (ce, last].
    AttentionState o;
    std::fill(o.acc, o.acc + head_dim, 0.f);
    AccumulateBlock(qh, cache, layer, kv_off, head_dim, 0, cb, inv_sqrt_d, &o);
    AccumulateBlock(qh, cache, layer, kv_off, head_dim, ce, last + 1, inv_sqrt_d, &o);
    if (ce <= cb) {  // no context block: ordinary attention, out = O_O
      for (int d = 0; d < head_dim; ++d) oh[d] = o.acc[d] / o.l;
      return;
    }
    // Block C: all contexts pooled, logits divided by T.
    AttentionState c;
    std::fill(c.acc, c.acc + head_dim, 0.f);
    AccumulateBlock(qh, cache, layer, kv_off, head_dim, cb, ce, inv_sqrt_d / ape.temperature, &c);
    if (o.l == 0.f) {  // no O keys visible (a row inside C): out = O_C
      for (int d = 0; d < head_dim; ++d) oh[d] = c.acc[d] / c.l;
      return;
    }
    // Merge: a = S*T * log Z_C, b = log Z_O, weights e^a and e^b.
    const float a = st_exponent * (c.m + std::log(c.l));
    const float b = o.m + std::log(o.l);
    const float mx = std::max(a, b);
    const float wa = std::exp(a - mx), wb = std::exp(b - mx);
    const float norm = 1.f / (wa + wb);
    const float fc = wa * norm / c.l, fo = wb * norm / o.l;
    for (int d = 0; d < head_dim; ++d) oh[d] = fc * c.acc[d] + fo * o.acc[d];
  });
}

}  // namespace ape
