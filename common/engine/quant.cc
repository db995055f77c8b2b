// Weight types as the file stores them: block layouts, conversions, GGML's
// reference quantizers and the dot-product kernels (see quant.h).
//
// The file reads top to bottom as the data flows:
//   1. block layouts (the structs below are the documentation; data is read
//      through memcpy/unaligned loads, never through a struct pointer, since
//      rows need not be aligned);
//   2. DequantizeRow;
//   3. QuantizeRow: GGML's reference quantizers, arithmetic kept in GGML's
//      order so the bytes match llama-quantize's;
//   4. activations (PrepareActivations);
//   5. DotRowsReference, plain scalar;
//   6. the AVX2 kernels (R rows x T tokens, for DotRows and DotRowsBatch;
//      4 x 3 float tiles for FloatGemm, the float weights' prefill, which
//      has no AVX-512 variant);
//   7. the AVX-512 kernels;
//   8. run-time dispatch.
#include "common/engine/quant.h"

#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common/engine/half.h"

namespace ape {
namespace {

// ---------------------------------------------------------------------------
// 1. Block layouts (GGML ggml-common.h; little-endian, no padding)
// ---------------------------------------------------------------------------

constexpr int kQk0 = 32;   // elements per Q8_0 / Q4_0 / Q5_0 block
constexpr int kQkK = 256;  // elements per K-quant super-block

// Q8_0: x[j] = d * qs[j].
struct BlockQ8_0 {
  uint16_t d;  // f16 scale
  int8_t qs[kQk0];
};
static_assert(sizeof(BlockQ8_0) == 34);

// Q4_0: for j < 16, x[j] = d * ((qs[j] & 15) - 8) and x[j + 16] = d * ((qs[j] >> 4) - 8).
struct BlockQ4_0 {
  uint16_t d;  // f16 scale
  uint8_t qs[kQk0 / 2];
};
static_assert(sizeof(BlockQ4_0) == 18);

// Q5_0: Q4_0's nibbles plus a fifth bit per element in qh (a little-endian
// uint32, bit j for element j): for j < 16,
//   x[j]      = d * (((qs[j] & 15) | (qh >> j & 1) << 4) - 16),
//   x[j + 16] = d * (((qs[j] >> 4) | (qh >> (j + 16) & 1) << 4) - 16).
struct BlockQ5_0 {
  uint16_t d;     // f16 scale
  uint8_t qh[4];  // fifth bits
  uint8_t qs[kQk0 / 2];
};
static_assert(sizeof(BlockQ5_0) == 22);

// Q5_1: as Q5_0 with a minimum instead of the bias, x[j] = d * q5[j] + m
// (q5 in 0..31, built as in Q5_0).
struct BlockQ5_1 {
  uint16_t d;  // f16 scale
  uint16_t m;  // f16 minimum
  uint8_t qh[4];
  uint8_t qs[kQk0 / 2];
};
static_assert(sizeof(BlockQ5_1) == 24);

// Q4_K: 8 sub-blocks s of 32 elements, x = d * sc[s] * q - dmin * m[s], q in 0..15.
//   scales[12] packs the 6-bit sc[8] and m[8]:
//     s < 4:  sc[s] = scales[s] & 63,  m[s] = scales[s + 4] & 63
//     s >= 4: sc[s] = (scales[s + 4] & 15) | (scales[s - 4] >> 6) << 4
//             m[s]  = (scales[s + 4] >> 4) | (scales[s]     >> 6) << 4
//   qs[32c + l] (c < 4, l < 32): low nibble is element 64c + l (sub-block 2c),
//   high nibble element 64c + 32 + l (sub-block 2c + 1).
struct BlockQ4K {
  uint16_t d;     // f16 scale of the sub-block scales
  uint16_t dmin;  // f16 scale of the sub-block mins
  uint8_t scales[12];
  uint8_t qs[kQkK / 2];
};
static_assert(sizeof(BlockQ4K) == 144);

// Q5_K: Q4_K with a fifth bit per element, q in 0..31: element 64c + l
// (c < 4, l < 32) takes bit 2c of qh[l] as its fifth bit, element
// 64c + 32 + l bit 2c + 1.
struct BlockQ5K {
  uint16_t d;     // f16 scale of the sub-block scales
  uint16_t dmin;  // f16 scale of the sub-block mins
  uint8_t scales[12];
  uint8_t qh[kQkK / 8];
  uint8_t qs[kQkK / 2];
};
static_assert(sizeof(BlockQ5K) == 176);

// Element 64c + 32h + l's quant (h = 0 low nibble, 1 high nibble) of a
// Q4_K or Q5_K block.
inline int KQuant(const BlockQ4K& b, int c, int h, int l) { return (b.qs[32 * c + l] >> (4 * h)) & 15; }
inline int KQuant(const BlockQ5K& b, int c, int h, int l) {
  return ((b.qs[32 * c + l] >> (4 * h)) & 15) | ((b.qh[l] >> (2 * c + h)) & 1) << 4;
}

// Q6_K: 16 sub-blocks of 16 elements, x[e] = d * scales[e / 16] * (q[e] - 32), q in 0..63.
//   Two halves h of 128 elements; for l < 32, with L = ql + 64h and H = qh + 32h:
//     q[128h + l]      = (L[l] & 15)      | ((H[l] >> 0) & 3) << 4
//     q[128h + l + 32] = (L[l + 32] & 15) | ((H[l] >> 2) & 3) << 4
//     q[128h + l + 64] = (L[l] >> 4)      | ((H[l] >> 4) & 3) << 4
//     q[128h + l + 96] = (L[l + 32] >> 4) | ((H[l] >> 6) & 3) << 4
struct BlockQ6K {
  uint8_t ql[kQkK / 2];  // low 4 bits
  uint8_t qh[kQkK / 4];  // high 2 bits
  int8_t scales[kQkK / 16];
  uint16_t d;  // f16 scale of the scales
};
static_assert(sizeof(BlockQ6K) == 210);

// Q8_K (activations only): x[j] = d * qs[j]; bsums[i] = sum of qs[16i .. 16i + 15].
struct BlockQ8K {
  float d;
  int8_t qs[kQkK];
  int16_t bsums[kQkK / 16];
};
static_assert(sizeof(BlockQ8K) == 292);

template <typename Block>
inline Block LoadBlock(const uint8_t* p, int64_t i) {
  Block b;
  std::memcpy(&b, p + i * sizeof(Block), sizeof(Block));
  return b;
}

template <typename Block>
inline void StoreBlock(const Block& b, uint8_t* p, int64_t i) {
  std::memcpy(p + i * sizeof(Block), &b, sizeof(Block));
}

inline uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline float LoadF32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}

// Element j's 5-bit quant (0..31) of a Q5_0 or Q5_1 block.
template <typename Block>
inline int Q5Quant(const Block& b, int j) {
  const int low = j < 16 ? b.qs[j] & 15 : b.qs[j - 16] >> 4;
  return low | static_cast<int>(LoadU32(b.qh) >> j & 1) << 4;
}

// The 6-bit scale and min of Q4_K sub-block s (GGML get_scale_min_k4).
inline void Q4KScaleMin(const uint8_t* scales, int s, int* sc, int* m) {
  if (s < 4) {
    *sc = scales[s] & 63;
    *m = scales[s + 4] & 63;
  } else {
    *sc = (scales[s + 4] & 15) | ((scales[s - 4] >> 6) << 4);
    *m = (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4);
  }
}

// Q6_K element e (0..255) of a block, as q in 0..63 (before the -32).
inline int Q6KQuant(const BlockQ6K& b, int e) {
  const int h = e / 128, k = (e % 128) / 32, l = e % 32;
  const uint8_t low = b.ql[64 * h + l + 32 * (k & 1)];
  const int nibble = k < 2 ? low & 15 : low >> 4;
  return nibble | (((b.qh[32 * h + l] >> (2 * k)) & 3) << 4);
}

// ---------------------------------------------------------------------------
// 2. Rows -> float32
// ---------------------------------------------------------------------------

void DequantizeQ8_0(const uint8_t* row, float* out, int64_t n) {
  for (int64_t i = 0; i < n / kQk0; ++i) {
    const BlockQ8_0 b = LoadBlock<BlockQ8_0>(row, i);
    const float d = HalfToFloat(b.d);
    for (int j = 0; j < kQk0; ++j) out[i * kQk0 + j] = b.qs[j] * d;
  }
}

void DequantizeQ4_0(const uint8_t* row, float* out, int64_t n) {
  for (int64_t i = 0; i < n / kQk0; ++i) {
    const BlockQ4_0 b = LoadBlock<BlockQ4_0>(row, i);
    const float d = HalfToFloat(b.d);
    for (int j = 0; j < kQk0 / 2; ++j) {
      out[i * kQk0 + j] = ((b.qs[j] & 15) - 8) * d;
      out[i * kQk0 + j + 16] = ((b.qs[j] >> 4) - 8) * d;
    }
  }
}

void DequantizeQ5_0(const uint8_t* row, float* out, int64_t n) {
  for (int64_t i = 0; i < n / kQk0; ++i) {
    const BlockQ5_0 b = LoadBlock<BlockQ5_0>(row, i);
    const float d = HalfToFloat(b.d);
    for (int j = 0; j < kQk0; ++j) out[i * kQk0 + j] = (Q5Quant(b, j) - 16) * d;
  }
}

void DequantizeQ5_1(const uint8_t* row, float* out, int64_t n) {
  for (int64_t i = 0; i < n / kQk0; ++i) {
    const BlockQ5_1 b = LoadBlock<BlockQ5_1>(row, i);
    const float d = HalfToFloat(b.d), m = HalfToFloat(b.m);
    for (int j = 0; j < kQk0; ++j) out[i * kQk0 + j] = Q5Quant(b, j) * d + m;
  }
}

// Q4_K and Q5_K (Block).
template <typename Block>
void DequantizeKMin(const uint8_t* row, float* out, int64_t n) {
  for (int64_t i = 0; i < n / kQkK; ++i) {
    const Block b = LoadBlock<Block>(row, i);
    const float d = HalfToFloat(b.d), dmin = HalfToFloat(b.dmin);
    float* y = out + i * kQkK;
    for (int c = 0; c < 4; ++c) {
      int sc0, m0, sc1, m1;
      Q4KScaleMin(b.scales, 2 * c, &sc0, &m0);
      Q4KScaleMin(b.scales, 2 * c + 1, &sc1, &m1);
      const float d0 = d * sc0, min0 = dmin * m0, d1 = d * sc1, min1 = dmin * m1;
      for (int l = 0; l < 32; ++l) {
        y[64 * c + l] = d0 * KQuant(b, c, 0, l) - min0;
        y[64 * c + 32 + l] = d1 * KQuant(b, c, 1, l) - min1;
      }
    }
  }
}

void DequantizeQ6K(const uint8_t* row, float* out, int64_t n) {
  for (int64_t i = 0; i < n / kQkK; ++i) {
    const BlockQ6K b = LoadBlock<BlockQ6K>(row, i);
    const float d = HalfToFloat(b.d);
    for (int e = 0; e < kQkK; ++e) out[i * kQkK + e] = d * b.scales[e / 16] * (Q6KQuant(b, e) - 32);
  }
}

void DequantizeQ8K(const uint8_t* row, float* out, int64_t n) {
  for (int64_t i = 0; i < n / kQkK; ++i) {
    const BlockQ8K b = LoadBlock<BlockQ8K>(row, i);
    for (int j = 0; j < kQkK; ++j) out[i * kQkK + j] = b.d * b.qs[j];
  }
}

// ---------------------------------------------------------------------------
// 3. float32 -> rows: GGML's reference quantizers (ggml-quants.c)
// ---------------------------------------------------------------------------
// Bit-identity with llama-quantize needs the same float operations in the
// same order, so the expressions below keep GGML's shape, and none of them
// may be contracted into an FMA (llama-quantize's are not: with contraction
// the Q4_K and Q6_K rows differ, 1-3% of them). quant_test compares the
// results with llama-quantize's files byte for byte.

#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
// GGML nearest_int: round to nearest, ties to even, via the 1.5*2^23 trick
// (valid for |x| <= 2^22).
inline int NearestInt(float x) {
  const float v = x + 12582912.f;
  int32_t i;
  std::memcpy(&i, &v, 4);
  return (i & 0x007fffff) - 0x00400000;
}

// GGML quantize_row_q8_0_ref.
void QuantizeQ8_0(const float* x, uint8_t* out, int64_t n) {
  for (int64_t i = 0; i < n / kQk0; ++i) {
    const float* xb = x + i * kQk0;
    float amax = 0.0f;
    for (int j = 0; j < kQk0; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    BlockQ8_0 b;
    b.d = FloatToHalf(d);
    for (int j = 0; j < kQk0; ++j) b.qs[j] = static_cast<int8_t>(std::round(xb[j] * id));
    StoreBlock(b, out, i);
  }
}

// GGML quantize_row_q4_0_ref / quantize_row_q5_0_ref: the scale maps the
// value of largest magnitude to -2^(bits-1) (d = max / -8, max / -16);
// quants are truncated from x/d + 2^(bits-1) + 0.5 and capped at 2^bits - 1.
// Returns d; q[j] gets element j's quant.
template <int kBits>
float SymmetricLevels(const float* xb, int* q) {
  constexpr int kHalf = 1 << (kBits - 1), kMax = (1 << kBits) - 1;
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < kQk0; ++j) {
    if (amax < std::fabs(xb[j])) {
      amax = std::fabs(xb[j]);
      max = xb[j];
    }
  }
  const float d = max / -kHalf;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int j = 0; j < kQk0; ++j) q[j] = std::min(kMax, static_cast<int>(xb[j] * id + (kHalf + 0.5f)));
  return d;
}

void QuantizeQ4_0(const float* x, uint8_t* out, int64_t n) {
  for (int64_t i = 0; i < n / kQk0; ++i) {
    int q[kQk0];
    BlockQ4_0 b;
    b.d = FloatToHalf(SymmetricLevels<4>(x + i * kQk0, q));
    for (int j = 0; j < kQk0 / 2; ++j) b.qs[j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
    StoreBlock(b, out, i);
  }
}

void QuantizeQ5_0(const float* x, uint8_t* out, int64_t n) {
  for (int64_t i = 0; i < n / kQk0; ++i) {
    int q[kQk0];
    BlockQ5_0 b;
    b.d = FloatToHalf(SymmetricLevels<5>(x + i * kQk0, q));
    uint32_t qh = 0;
    for (int j = 0; j < kQk0 / 2; ++j) {
      b.qs[j] = static_cast<uint8_t>((q[j] & 15) | (q[j + 16] & 15) << 4);
      qh |= static_cast<uint32_t>(q[j] >> 4) << j | static_cast<uint32_t>(q[j + 16] >> 4) << (j + 16);
    }
    std::memcpy(b.qh, &qh, 4);
    StoreBlock(b, out, i);
  }
}

// GGML quantize_row_q5_1_ref: the block's range [min, max] in 31 steps,
// quants rounded (half up) from (x - min) / d.
void QuantizeQ5_1(const float* x, uint8_t* out, int64_t n) {
  for (int64_t i = 0; i < n / kQk0; ++i) {
    const float* xb = x + i * kQk0;
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < kQk0; ++j) {
      min = std::min(min, xb[j]);
      max = std::max(max, xb[j]);
    }
    const float d = (max - min) / 31;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    BlockQ5_1 b;
    b.d = FloatToHalf(d);
    b.m = FloatToHalf(min);
    uint32_t qh = 0;
    for (int j = 0; j < kQk0 / 2; ++j) {
      const int q0 = static_cast<uint8_t>((xb[j] - min) * id + 0.5f);
      const int q1 = static_cast<uint8_t>((xb[j + 16] - min) * id + 0.5f);
      b.qs[j] = static_cast<uint8_t>((q0 & 15) | (q1 & 15) << 4);
      qh |= static_cast<uint32_t>((q0 >> 4) & 1) << j | static_cast<uint32_t>((q1 >> 4) & 1) << (j + 16);
    }
    std::memcpy(b.qh, &qh, 4);
    StoreBlock(b, out, i);
  }
}

// GGML make_qkx2_quants: levels L[i] in 0..nmax and (scale, -min) fitting
// x ~ scale * L + min by weighted least squares, trying nstep + 1 scales
// around nmax / (max - min). Returns the scale; *neg_min = -min >= 0.
float FitScaleMin(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* neg_min, uint8_t* Laux,
                  float rmin, float rdelta, int nstep) {
  float min = x[0], max = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    const float w = weights[i];
    sum_w += w;
    sum_x += w * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *neg_min = -min;
    return 0.f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    const int l = NearestInt(iscale * (x[i] - min));
    L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    float diff = scale * L[i] + min - x[i];
    diff = diff * diff;
    best_error += weights[i] * diff;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = NearestInt(iscale * (x[i] - min));
      l = std::max(0, std::min(nmax, l));
      Laux[i] = static_cast<uint8_t>(l);
      const float w = weights[i];
      sum_l += w * l;
      sum_l2 += w * l * l;
      sum_xl += w * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * Laux[i] + this_min - x[i];
        diff = diff * diff;
        cur_error += weights[i] * diff;
      }
      if (cur_error < best_error) {
        for (int i = 0; i < n; ++i) L[i] = Laux[i];
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *neg_min = -min;
  return scale;
}

// Levels L[e] (0..15 or 0..31) of a Q4_K / Q5_K block into its quant fields.
void PackLevels(const uint8_t* L, BlockQ4K* b) {
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) b->qs[32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4);
  }
}
void PackLevels(const uint8_t* L, BlockQ5K* b) {
  std::memset(b->qh, 0, sizeof(b->qh));
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      const int l0 = L[64 * c + l], l1 = L[64 * c + 32 + l];
      b->qs[32 * c + l] = static_cast<uint8_t>((l0 & 15) | (l1 & 15) << 4);
      b->qh[l] |= static_cast<uint8_t>((l0 >> 4) << (2 * c) | (l1 >> 4) << (2 * c + 1));
    }
  }
}

// GGML quantize_row_q4_K_ref and quantize_row_q5_K_ref (what llama-quantize
// runs for Q4_K / Q5_K without an importance matrix); they differ only in the
// levels (nmax 15 / 31) and the scale search (rmin -1 / -0.5, 20 / 15 steps).
template <typename Block>
void QuantizeKMin(const float* x, uint8_t* out, int64_t n) {
  constexpr bool kQ5 = std::is_same_v<Block, BlockQ5K>;
  constexpr int kNmax = kQ5 ? 31 : 15;
  uint8_t L[kQkK], Laux[32];
  float weights[32], mins[8], scales[8];
  for (int64_t i = 0; i < n / kQkK; ++i, x += kQkK) {
    // Fit each sub-block of 32, weighting elements by rms + |x|.
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
      float sum_x2 = 0;
      for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
      const float av_x = std::sqrt(sum_x2 / 32);
      for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
      scales[j] = FitScaleMin(32, kNmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, kQ5 ? -0.5f : -1.f, 0.1f,
                              kQ5 ? 15 : 20);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    // Quantize the scales and mins to 6 bits and pack them.
    Block b;
    std::memset(&b, 0, sizeof(b));
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
      uint8_t ls = static_cast<uint8_t>(NearestInt(inv_scale * scales[j]));
      uint8_t lm = static_cast<uint8_t>(NearestInt(inv_min * mins[j]));
      ls = std::min<uint8_t>(63, ls);
      lm = std::min<uint8_t>(63, lm);
      if (j < 4) {
        b.scales[j] = ls;
        b.scales[j + 4] = lm;
      } else {
        b.scales[j + 4] = (ls & 15) | ((lm & 15) << 4);
        b.scales[j - 4] |= (ls >> 4) << 6;
        b.scales[j] |= (lm >> 4) << 6;
      }
    }
    b.d = FloatToHalf(max_scale / 63.f);
    b.dmin = FloatToHalf(max_min / 63.f);
    // Requantize every element with the rounded scales.
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      Q4KScaleMin(b.scales, j, &sc, &m);
      const float d = HalfToFloat(b.d) * sc;
      if (d == 0.0f) continue;
      const float dm = HalfToFloat(b.dmin) * m;
      for (int ii = 0; ii < 32; ++ii) {
        const int l = NearestInt((x[32 * j + ii] + dm) / d);
        L[32 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(kNmax, l)));
      }
    }
    PackLevels(L, &b);
    StoreBlock(b, out, i);
  }
}

// GGML make_qx_quants with rmse_type 1 and no importance weights: signed
// levels L[i] - nmax in -nmax..nmax-1 and the scale minimizing the
// x^2-weighted squared error over 19 candidate scales. Returns the scale.
float FitScale(int n, int nmax, const float* x, int8_t* L) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < 1e-15f) {  // GGML GROUP_MAX_EPS: all zero
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = NearestInt(iscale * x[i]);
    l = std::max(-nmax, std::min(nmax - 1, l));
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      int l = NearestInt(iscale * x[i]);
      l = std::max(-nmax, std::min(nmax - 1, l));
      const float w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) {
        const int l = NearestInt(iscale * x[i]);
        L[i] = static_cast<int8_t>(nmax + std::max(-nmax, std::min(nmax - 1, l)));
      }
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// GGML quantize_row_q6_K_ref (llama-quantize's Q6_K without an importance
// matrix: quantize_q6_K -> quantize_row_q6_K_ref).
void QuantizeQ6K(const float* x, uint8_t* out, int64_t n) {
  int8_t L[kQkK];
  float scales[16];
  for (int64_t i = 0; i < n / kQkK; ++i, x += kQkK) {
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
      scales[ib] = FitScale(16, 32, x + 16 * ib, L + 16 * ib);
      if (std::fabs(scales[ib]) > max_abs_scale) {
        max_abs_scale = std::fabs(scales[ib]);
        max_scale = scales[ib];
      }
    }
    BlockQ6K b;
    std::memset(&b, 0, sizeof(b));
    if (max_abs_scale < 1e-15f) {  // all zero
      b.d = FloatToHalf(0.f);
      StoreBlock(b, out, i);
      continue;
    }
    // 8-bit sub-block scales, then every element requantized with them.
    const float iscale = -128.f / max_scale;
    b.d = FloatToHalf(1 / iscale);
    for (int ib = 0; ib < 16; ++ib) b.scales[ib] = static_cast<int8_t>(std::min(127, NearestInt(iscale * scales[ib])));
    for (int j = 0; j < 16; ++j) {
      const float d = HalfToFloat(b.d) * b.scales[j];
      if (d == 0.0f) continue;
      for (int ii = 0; ii < 16; ++ii) {
        const int l = NearestInt(x[16 * j + ii] / d);
        L[16 * j + ii] = static_cast<int8_t>(std::max(-32, std::min(31, l)) + 32);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int8_t* q = L + 128 * h;
      for (int l = 0; l < 32; ++l) {
        b.ql[64 * h + l] = (q[l] & 15) | ((q[l + 64] & 15) << 4);
        b.ql[64 * h + l + 32] = (q[l + 32] & 15) | ((q[l + 96] & 15) << 4);
        b.qh[32 * h + l] = (q[l] >> 4) | ((q[l + 32] >> 4) << 2) | ((q[l + 64] >> 4) << 4) | ((q[l + 96] >> 4) << 6);
      }
    }
    StoreBlock(b, out, i);
  }
}

// GGML quantize_row_q8_K_ref (the scale maps the value of largest magnitude
// to -127), plus the 16-element sums. An all-zero block gets d = 0 and zero
// sums (GGML leaves its sums unset).
void QuantizeQ8K(const float* x, uint8_t* out, int64_t n) {
  for (int64_t i = 0; i < n / kQkK; ++i, x += kQkK) {
    BlockQ8K b;
    std::memset(&b, 0, sizeof(b));
    float max = 0, amax = 0;
    for (int j = 0; j < kQkK; ++j) {
      const float ax = std::fabs(x[j]);
      if (ax > amax) {
        amax = ax;
        max = x[j];
      }
    }
    if (amax != 0.0f) {
      const float iscale = -127.f / max;
      for (int j = 0; j < kQkK; ++j) b.qs[j] = static_cast<int8_t>(std::min(127, NearestInt(iscale * x[j])));
      for (int j = 0; j < 16; ++j) {
        int sum = 0;
        for (int ii = 0; ii < 16; ++ii) sum += b.qs[16 * j + ii];
        b.bsums[j] = static_cast<int16_t>(sum);
      }
      b.d = 1 / iscale;
    }
    StoreBlock(b, out, i);
  }
}

#if defined(__clang__)
#pragma clang fp contract(on)
#else
#pragma GCC pop_options
#endif
// GGML ggml_compute_fp32_to_bf16: round to nearest even; NaN stays NaN (quiet).
inline uint16_t FloatToBf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((u >> 16) | 64);
  return static_cast<uint16_t>((u + (0x7fff + ((u >> 16) & 1))) >> 16);
}

}  // namespace

// ---------------------------------------------------------------------------
// Public conversions
// ---------------------------------------------------------------------------

bool IsWeightType(GgmlType t) {
  switch (t) {
    case GgmlType::kF32:
    case GgmlType::kF16:
    case GgmlType::kBF16:
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_0:
    case GgmlType::kQ5_0:
    case GgmlType::kQ5_1:
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
    case GgmlType::kQ6_K: return true;
    default: return false;
  }
}

GgmlType ActivationType(GgmlType t) {
  switch (t) {
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_0:
    case GgmlType::kQ5_0:
    case GgmlType::kQ5_1: return GgmlType::kQ8_0;
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
    case GgmlType::kQ6_K: return GgmlType::kQ8_K;
    default: return GgmlType::kF32;
  }
}

void DequantizeRow(GgmlType t, const uint8_t* row, float* out, int64_t n) {
  switch (t) {
    case GgmlType::kF32: std::memcpy(out, row, n * sizeof(float)); return;
    case GgmlType::kF16: HalfToFloat(reinterpret_cast<const uint16_t*>(row), out, n); return;  // F16C, any address
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) out[i] = Bf16ToFloat(LoadU16(row + 2 * i));
      return;
    case GgmlType::kQ8_0: DequantizeQ8_0(row, out, n); return;
    case GgmlType::kQ4_0: DequantizeQ4_0(row, out, n); return;
    case GgmlType::kQ5_0: DequantizeQ5_0(row, out, n); return;
    case GgmlType::kQ5_1: DequantizeQ5_1(row, out, n); return;
    case GgmlType::kQ4_K: DequantizeKMin<BlockQ4K>(row, out, n); return;
    case GgmlType::kQ5_K: DequantizeKMin<BlockQ5K>(row, out, n); return;
    case GgmlType::kQ6_K: DequantizeQ6K(row, out, n); return;
    case GgmlType::kQ8_K: DequantizeQ8K(row, out, n); return;
    default: std::abort();  // callers check IsWeightType
  }
}

// llama-quantize (ggml_quantize_chunk) converts to F16 with
// ggml_fp32_to_fp16_row and to BF16 with ggml_fp32_to_bf16_row_ref; the
// block types go through the reference quantizers named above.
void QuantizeRow(GgmlType t, const float* x, uint8_t* out, int64_t n) {
  switch (t) {
    case GgmlType::kF32: std::memcpy(out, x, n * sizeof(float)); return;
    case GgmlType::kF16:  // round to nearest even (F16C), as GGML_FP32_TO_FP16
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = FloatToHalf(x[i]);
        std::memcpy(out + 2 * i, &h, 2);
      }
      return;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = FloatToBf16(x[i]);
        std::memcpy(out + 2 * i, &h, 2);
      }
      return;
    case GgmlType::kQ8_0: QuantizeQ8_0(x, out, n); return;
    case GgmlType::kQ4_0: QuantizeQ4_0(x, out, n); return;
    case GgmlType::kQ5_0: QuantizeQ5_0(x, out, n); return;
    case GgmlType::kQ5_1: QuantizeQ5_1(x, out, n); return;
    case GgmlType::kQ4_K: QuantizeKMin<BlockQ4K>(x, out, n); return;
    case GgmlType::kQ5_K: QuantizeKMin<BlockQ5K>(x, out, n); return;
    case GgmlType::kQ6_K: QuantizeQ6K(x, out, n); return;
    case GgmlType::kQ8_K: QuantizeQ8K(x, out, n); return;
    default: std::abort();
  }
}

// ---------------------------------------------------------------------------
// 4. Activations
// ---------------------------------------------------------------------------
// Q8_0 activations follow GGML's x86 quantize_row_q8_0, what llama.cpp's
// CPU backend does before a Q8_0/Q4_0 matmul: it differs from the
// reference quantizer (weights) in taking 127/amax as the inverse scale and
// rounding ties to even. Q8_K activations are GGML's reference (its x86
// quantize_row_q8_K is the reference). Both give quants in -127..127,
// which the kernels rely on.
namespace {

void QuantizeQ8_0Activations(const float* x, uint8_t* out, int64_t n) {
  for (int64_t i = 0; i < n / kQk0; ++i) {
    const float* xb = x + i * kQk0;
    float amax = 0.0f;
    for (int j = 0; j < kQk0; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float id = amax != 0.0f ? 127.f / amax : 0.0f;
    BlockQ8_0 b;
    b.d = FloatToHalf(amax / 127.f);
    for (int j = 0; j < kQk0; ++j) b.qs[j] = static_cast<int8_t>(std::nearbyint(xb[j] * id));
    StoreBlock(b, out, i);
  }
}

}  // namespace

size_t ActivationBytes(GgmlType t, int64_t n) {
  const GgmlType a = ActivationType(t);
  if (a == GgmlType::kF32) return n * sizeof(float);
  return GgmlRowBytes(static_cast<uint32_t>(a), n);
}

void PrepareActivations(GgmlType t, const float* x, int64_t n, uint8_t* out) {
  if (ActivationType(t) == GgmlType::kQ8_0) {
    QuantizeQ8_0Activations(x, out, n);
  } else {
    QuantizeRow(ActivationType(t), x, out, n);
  }
}

// ---------------------------------------------------------------------------
// 5. Scalar reference dot products
// ---------------------------------------------------------------------------
namespace {

// Float weights: dequantize-style, summed in double.
template <typename Convert>
float DotFloatReference(const uint8_t* w, const uint8_t* x, int64_t n, int elem_bytes, Convert convert) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(convert(w + i * elem_bytes)) * LoadF32(x + 4 * i);
  return static_cast<float>(sum);
}

// Block types as GGML's scalar vec_dot: an exact integer sum per block,
// scaled and added in float.

// Element j's signed quant of a block whose x = d * quant.
inline int SignedQuant(const BlockQ8_0& b, int j) { return b.qs[j]; }
inline int SignedQuant(const BlockQ4_0& b, int j) { return (j < 16 ? b.qs[j] & 15 : b.qs[j - 16] >> 4) - 8; }
inline int SignedQuant(const BlockQ5_0& b, int j) { return Q5Quant(b, j) - 16; }

// Q8_0, Q4_0, Q5_0 (Block) x Q8_0.
template <typename Block>
float DotScaledReference(const uint8_t* w, const uint8_t* act, int64_t n) {
  float sum = 0;
  for (int64_t i = 0; i < n / kQk0; ++i) {
    const Block b = LoadBlock<Block>(w, i);
    const BlockQ8_0 a = LoadBlock<BlockQ8_0>(act, i);
    int sumi = 0;
    for (int j = 0; j < kQk0; ++j) sumi += SignedQuant(b, j) * a.qs[j];
    sum += sumi * (HalfToFloat(b.d) * HalfToFloat(a.d));
  }
  return sum;
}

// d*da * (q . a) + m*da * sum(a) per block (llama.cpp takes da * sum(a)
// from its Q8_1 activation blocks, the same value).
float DotQ5_1Reference(const uint8_t* w, const uint8_t* act, int64_t n) {
  float sum = 0;
  for (int64_t i = 0; i < n / kQk0; ++i) {
    const BlockQ5_1 b = LoadBlock<BlockQ5_1>(w, i);
    const BlockQ8_0 a = LoadBlock<BlockQ8_0>(act, i);
    int sumi = 0, suma = 0;
    for (int j = 0; j < kQk0; ++j) {
      sumi += Q5Quant(b, j) * a.qs[j];
      suma += a.qs[j];
    }
    const float da = HalfToFloat(a.d);
    sum += sumi * (HalfToFloat(b.d) * da) + HalfToFloat(b.m) * (da * suma);
  }
  return sum;
}

// sum_s sc[s] * (q . a over s) * d*da - sum_s m[s] * (a summed over s) * dmin*da.
template <typename Block>
float DotKMinReference(const uint8_t* w, const uint8_t* act, int64_t n) {
  float sum = 0;
  for (int64_t i = 0; i < n / kQkK; ++i) {
    const Block b = LoadBlock<Block>(w, i);
    const BlockQ8K a = LoadBlock<BlockQ8K>(act, i);
    int sumi = 0, summ = 0;
    for (int s = 0; s < 8; ++s) {
      int sc, m;
      Q4KScaleMin(b.scales, s, &sc, &m);
      int dot = 0;
      for (int l = 0; l < 32; ++l) dot += KQuant(b, s / 2, s % 2, l) * a.qs[32 * s + l];
      sumi += sc * dot;
      summ += m * (a.bsums[2 * s] + a.bsums[2 * s + 1]);
    }
    sum += (HalfToFloat(b.d) * a.d) * sumi;
    sum -= (HalfToFloat(b.dmin) * a.d) * summ;
  }
  return sum;
}

float DotQ6KReference(const uint8_t* w, const uint8_t* act, int64_t n) {
  float sum = 0;
  for (int64_t i = 0; i < n / kQkK; ++i) {
    const BlockQ6K b = LoadBlock<BlockQ6K>(w, i);
    const BlockQ8K a = LoadBlock<BlockQ8K>(act, i);
    int sumi = 0;
    for (int s = 0; s < 16; ++s) {
      int dot = 0;
      for (int l = 0; l < 16; ++l) dot += (Q6KQuant(b, 16 * s + l) - 32) * a.qs[16 * s + l];
      sumi += b.scales[s] * dot;
    }
    sum += (HalfToFloat(b.d) * a.d) * sumi;
  }
  return sum;
}

float DotRowReference(GgmlType t, const uint8_t* w, const uint8_t* act, int64_t n) {
  switch (t) {
    case GgmlType::kF32: return DotFloatReference(w, act, n, 4, LoadF32);
    case GgmlType::kF16:
      return DotFloatReference(w, act, n, 2, [](const uint8_t* p) { return HalfToFloat(LoadU16(p)); });
    case GgmlType::kBF16:
      return DotFloatReference(w, act, n, 2, [](const uint8_t* p) { return Bf16ToFloat(LoadU16(p)); });
    case GgmlType::kQ8_0: return DotScaledReference<BlockQ8_0>(w, act, n);
    case GgmlType::kQ4_0: return DotScaledReference<BlockQ4_0>(w, act, n);
    case GgmlType::kQ5_0: return DotScaledReference<BlockQ5_0>(w, act, n);
    case GgmlType::kQ5_1: return DotQ5_1Reference(w, act, n);
    case GgmlType::kQ4_K: return DotKMinReference<BlockQ4K>(w, act, n);
    case GgmlType::kQ5_K: return DotKMinReference<BlockQ5K>(w, act, n);
    case GgmlType::kQ6_K: return DotQ6KReference(w, act, n);
    default: std::abort();
  }
}

}  // namespace

void DotRowsReference(GgmlType t, const uint8_t* w, size_t row_bytes, int rows, const uint8_t* act, int64_t n,
                      float* y) {
  for (int r = 0; r < rows; ++r) y[r] = DotRowReference(t, w + r * row_bytes, act, n);
}

// ---------------------------------------------------------------------------
// 6. AVX2 + FMA + F16C kernels (the baseline, -march=x86-64-v3)
// ---------------------------------------------------------------------------
// Each kernel computes R rows against T tokens' activations: the
// per-block work shared by the rows (activation loads, sums) is done once
// per token, the unpacking shared by the tokens (weight loads, nibbles,
// scales) once per row; the R x T results are independent chains the CPU
// overlaps. Float, Q4_K and Q6_K weights have a grid of kernels (R, T =
// 1..4; decode runs T = 1, DotRows; decode batches and prefill run token
// groups, DotRowsBatch). Q8_0 and Q4_0 weights pair their blocks and tile
// rows and tokens themselves (PairsBatch: a row x up to 8 tokens, the
// activations rearranged once per token group). Either way results are
// bit-identical to T = 1's.
namespace {

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float HorizontalSum(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

inline __m256i LoadU256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m128i LoadU128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// The 32 nibbles of a Q4_0 block in element order (low nibbles, then high).
inline __m256i Q4_0Nibbles(const uint8_t* qs) {
  const __m128i q = LoadU128(qs);
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1);
  return _mm256_and_si256(both, _mm256_set1_epi8(15));
}

// Decode streams each weight matrix once, R rows at a time: R short
// streams (a Q4_K row of 2048 elements is 1152 bytes) that the hardware
// prefetchers pick up late. So every kernel prefetches the same bytes of
// the next group of rows (R rows on) while it works on this one, one
// group's time ahead. Past the last row this touches whatever follows the
// matrix, which is harmless (prefetches never fault).
inline void PrefetchLines(const uint8_t* p, int bytes) {
  for (int i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

// Elements i..i+7 (x8) or i (x1) of a float row, converted to float.
inline __m256 LoadF32x8(const uint8_t* row, int64_t i) {
  return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + i);
}
inline __m256 LoadF16x8(const uint8_t* row, int64_t i) { return _mm256_cvtph_ps(LoadU128(row + 2 * i)); }
inline __m256 LoadBf16x8(const uint8_t* row, int64_t i) {
  const __m256i u32 = _mm256_cvtepu16_epi32(LoadU128(row + 2 * i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u32, 16));
}
inline float LoadF32x1(const uint8_t* row, int64_t i) { return LoadF32(row + 4 * i); }
inline float LoadF16x1(const uint8_t* row, int64_t i) { return HalfToFloat(LoadU16(row + 2 * i)); }
inline float LoadBf16x1(const uint8_t* row, int64_t i) { return Bf16ToFloat(LoadU16(row + 2 * i)); }

// Float weights: 16 elements per step for each row, 8-wide FMAs.
// Load8(p, i) converts elements i..i+7 of the row at p to float.
// Every kernel of this section computes R rows against T tokens: y[j *
// y_stride + r] = dot(row r, token j), token j's activations at act + j *
// act_stride. Each (row, token) result goes through the same operations in
// the same order whatever R and T are (the loops over r and j only repeat
// them), so a row's result for a token does not depend on how many tokens
// run with it: decode batches give every stream what it gets alone.
template <int R, int T, int kElemBytes, typename Load8, typename Load1>
inline void DotFloatRows(const uint8_t* w, size_t row_bytes, const uint8_t* act, size_t act_stride, int64_t n, float* y,
                         size_t y_stride, Load8 load8, Load1 load1) {
  const float* x[T];  // read with unaligned loads only
  for (int j = 0; j < T; ++j) x[j] = reinterpret_cast<const float*>(act + j * act_stride);
  __m256 acc0[R][T], acc1[R][T];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) acc0[r][j] = acc1[r][j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + r * row_bytes;
      if (i * kElemBytes % 64 == 0) PrefetchLines(row + R * row_bytes + i * kElemBytes, 64);  // each line once
      const __m256 w0 = load8(row, i), w1 = load8(row, i + 8);
      for (int j = 0; j < T; ++j) {
        acc0[r][j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[j] + i), acc0[r][j]);
        acc1[r][j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[j] + i + 8), acc1[r][j]);
      }
    }
  }
  for (; i + 8 <= n; i += 8) {
    for (int r = 0; r < R; ++r) {
      const __m256 w0 = load8(w + r * row_bytes, i);
      for (int j = 0; j < T; ++j) acc0[r][j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[j] + i), acc0[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < T; ++j) {
      float s = HorizontalSum(_mm256_add_ps(acc0[r][j], acc1[r][j]));
      for (int64_t k = i; k < n; ++k) s = std::fma(load1(w + r * row_bytes, k), LoadF32x1(act + j * act_stride, k), s);
      y[j * y_stride + r] = s;
    }
  }
}

#define APE_KERNEL_ARGS \
  const uint8_t *w, size_t row_bytes, const uint8_t *act, size_t act_stride, int64_t n, float *y, size_t y_stride
#define APE_KERNEL_PASS w, row_bytes, act, act_stride, n, y, y_stride

template <int R, int T>
void DotF32Avx2(APE_KERNEL_ARGS) {
  DotFloatRows<R, T, 4>(APE_KERNEL_PASS, LoadF32x8, LoadF32x1);
}
template <int R, int T>
void DotF16Avx2(APE_KERNEL_ARGS) {
  DotFloatRows<R, T, 2>(APE_KERNEL_PASS, LoadF16x8, LoadF16x1);
}
template <int R, int T>
void DotBf16Avx2(APE_KERNEL_ARGS) {
  DotFloatRows<R, T, 2>(APE_KERNEL_PASS, LoadBf16x8, LoadBf16x1);
}

// The f16 scales at p and p + stride as floats in lanes 0 and 1.
inline __m128 TwoHalves(const uint8_t* p, size_t stride) {
  return _mm_cvtph_ps(_mm_cvtsi32_si128(LoadU16(p) | LoadU16(p + stride) << 16));
}

// [s0 x4 | s1 x4] from lanes 0 and 1 of s.
inline __m256 SpreadPair(__m128 s) {
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

// Q8_0 and Q4_0 weights against Q8_0 activations run blocks in pairs, in
// a layout where one 256-bit register holds half of each block of the
// pair: x = [elements 0..15 of block 2p | elements 0..15 of block 2p+1],
// y = the same for elements 16..31. That is how a Q4_0 pair unpacks (low
// nibbles of its two 16-byte quant arrays = x, high nibbles = y), and for
// Q8_0 it is two 16-byte loads per register. maddubs + madd then leave 8
// int32 lanes, the low 4 summing to block 2p and the high 4 to block
// 2p+1, which take the scales [d(2p) x4 | d(2p+1) x4]: one convert, one
// multiply and one FMA per pair of blocks for each (row, token). An odd
// last block is a pair whose second block is zero (its lanes add 0).
//
// The activations are rearranged into that layout once per group of
// tokens (ActPair below), so all rows share the shuffles, the f16 -> f32
// scale conversions and Q4_0's offset sums; the weights are unpacked once
// per row for all the tokens of the group (up to kPairGroup).
//
// Every (row, token) result is the same chain whatever the group size and
// however the rows are chunked: per pair, an exact int32 sum per lane, then
// acc = fma(float(sum), dw * da, acc) with one 8-lane accumulator, pairs
// in order; at the end the lanes' horizontal sum. So DotRows and
// DotRowsBatch agree bit for bit for any number of tokens.
struct alignas(64) ActPair {
  int8_t x[32];  // elements 0..15 of block 2p, then of block 2p+1
  int8_t y[32];  // elements 16..31, the same way
  float d[8];    // d(2p) x4, d(2p+1) x4, as float
  union {
    int32_t off[8];  // Q4_0, Q5_0: 8 * the sum of the activations each lane covers
    float sum[8];    // Q5_1 instead: that sum (the lane's 8 activations) times d, as float
  };
};
static_assert(sizeof(ActPair) == 128);

constexpr int kPairGroup = 8;  // tokens per group: 8 accumulators + a row's registers fit in 16
// A group's activations are walked in slices of at most this many bytes, so
// they stay in L1 while every row of the chunk passes over them.
constexpr int64_t kPairSliceBytes = 16 << 10;

inline __m256i LoadA256(const int8_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }

// One token's Q8_0 blocks (PrepareActivations) -> (nb + 1) / 2 ActPairs,
// with `off` or, for kinds with a minimum term (kScaledSums), `sum`.
template <bool kScaledSums>
void MakeActPairs(const uint8_t* act, int64_t nb, ActPair* out) {
  constexpr size_t kBlock = sizeof(BlockQ8_0);
  const __m256i eights = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
  for (int64_t p = 0; 2 * p < nb; ++p) {
    const uint8_t* ab = act + 2 * p * kBlock;
    const bool second = 2 * p + 1 < nb;
    const __m256i a0 = LoadU256(ab + 2), a1 = second ? LoadU256(ab + kBlock + 2) : _mm256_setzero_si256();
    const __m256i x = _mm256_permute2x128_si256(a0, a1, 0x20), y = _mm256_permute2x128_si256(a0, a1, 0x31);
    ActPair& o = out[p];
    _mm256_store_si256(reinterpret_cast<__m256i*>(o.x), x);
    _mm256_store_si256(reinterpret_cast<__m256i*>(o.y), y);
    const float d0 = HalfToFloat(LoadU16(ab)), d1 = second ? HalfToFloat(LoadU16(ab + kBlock)) : 0.f;
    _mm256_store_ps(o.d, _mm256_setr_m128(_mm_set1_ps(d0), _mm_set1_ps(d1)));
    const __m256i sum8 = _mm256_add_epi16(_mm256_maddubs_epi16(eights, x), _mm256_maddubs_epi16(eights, y));
    const __m256i off = _mm256_madd_epi16(sum8, ones);
    if constexpr (kScaledSums) {
      // off / 8 is exact in float (|sum| <= 8 * 127); times d rounds once.
      const __m256 sum = _mm256_mul_ps(_mm256_cvtepi32_ps(off), _mm256_set1_ps(0.125f));
      _mm256_store_ps(o.sum, _mm256_mul_ps(sum, _mm256_load_ps(o.d)));
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(o.off), off);
    }
  }
}

// As PrefetchLines for the pair kernels: the line holding the same pair
// `ahead` bytes on, 4 rows on: soon enough for memory, late enough to be
// used (rows sliced for a token group are read a slice at a time).
constexpr int kPairPrefetchRows = 4;
inline void PrefetchPair(const uint8_t* wb, size_t ahead) {
  _mm_prefetch(reinterpret_cast<const char*>(wb + ahead), _MM_HINT_T0);
}

// [d x4 | 0 x4]: the scales of an odd last block's pair.
inline __m256 HalfPairScale(const uint8_t* d) { return _mm256_zextps128_ps256(_mm_set1_ps(HalfToFloat(LoadU16(d)))); }

// The int32 lanes of u1 . s1 + u2 . s2, u unsigned bytes and s signed ones
// (lane i sums bytes 4i..4i+3 of both products): on AVX2 maddubs gives
// int16 sums of byte pairs, then madd the int32 lanes (kPairs16: the two
// products' int16 sums are added first, for quants small enough that they
// fit); with kVnni, two vpdpbusd (AVX512-VNNI on 256-bit registers) give the
// int32 lanes at once. Every sum is exact, so both give the same integers
// and the kernels the same bits. vpdpbusd is written in asm, so that this
// file keeps its AVX2 baseline: the kVnni kernels run only where the CPU
// has it (PairsBatchFor). The kinds take it for token groups only (UseVnni):
// alternated on an Emerald Rapids Xeon, it made 64-token prefill about 1.2x
// faster and one-token decode no faster, or slower (Q4_0 53-55 against
// 60-61 tokens/s), where a step's two chained vpdpbusd are its longest
// latency.
// vpdpbusd for a kernel of T tokens: for token groups only (above).
template <bool kVnni, int T>
constexpr bool UseVnni() {
  return kVnni && T > 1;
}

template <bool kVnni, bool kPairs16>
inline __m256i DotBytes(__m256i u1, __m256i s1, __m256i u2, __m256i s2) {
  if constexpr (kVnni) {
    __m256i acc = _mm256_setzero_si256();
    asm("vpdpbusd %1, %2, %0\n\tvpdpbusd %3, %4, %0" : "+&x"(acc) : "x"(s1), "x"(u1), "x"(s2), "x"(u2));
    return acc;
  } else {
    const __m256i ones = _mm256_set1_epi16(1), p1 = _mm256_maddubs_epi16(u1, s1), p2 = _mm256_maddubs_epi16(u2, s2);
    if constexpr (kPairs16) return _mm256_madd_epi16(_mm256_add_epi16(p1, p2), ones);
    return _mm256_add_epi32(_mm256_madd_epi16(p1, ones), _mm256_madd_epi16(p2, ones));
  }
}

// Q8_0 x Q8_0, one pair of blocks of one row against T tokens: the
// weights' magnitudes once, then per token |w| . (a with w's sign)
// (exact: a in -127..127; a byte pair's products reach 2 * 128 * 127, so
// the two halves' int16 sums are not added before widening).
template <bool kVnni>
struct Q8_0Pairs {
  static constexpr size_t kBlock = sizeof(BlockQ8_0);
  static constexpr bool kScaledSums = false;  // reads ActPair::off

  // A whole pair of blocks at wb, and an odd last block alone.
  template <int T>
  static inline void Pair(const uint8_t* wb, const ActPair* a, int64_t a_stride, __m256* acc) {
    const __m256i x = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(wb + kBlock + 2),
                                          reinterpret_cast<const __m128i*>(wb + 2));
    const __m256i y = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(wb + kBlock + 18),
                                          reinterpret_cast<const __m128i*>(wb + 18));
    Step<T>(x, y, SpreadPair(TwoHalves(wb, kBlock)), a, a_stride, acc);
  }
  template <int T>
  static inline void Odd(const uint8_t* wb, const ActPair* a, int64_t a_stride, __m256* acc) {
    Step<T>(_mm256_zextsi128_si256(LoadU128(wb + 2)), _mm256_zextsi128_si256(LoadU128(wb + 18)), HalfPairScale(wb), a,
            a_stride, acc);
  }

  template <int T>
  static inline void Step(__m256i x, __m256i y, __m256 dw, const ActPair* a, int64_t a_stride, __m256* acc) {
    const __m256i ux = _mm256_sign_epi8(x, x), uy = _mm256_sign_epi8(y, y);
    for (int j = 0; j < T; ++j) {
      const ActPair& aj = a[j * a_stride];
      const __m256i sumi = DotBytes<UseVnni<kVnni, T>(), false>(ux, _mm256_sign_epi8(LoadA256(aj.x), x), uy,
                                                                _mm256_sign_epi8(LoadA256(aj.y), y));
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_mul_ps(dw, _mm256_load_ps(aj.d)), acc[j]);
    }
  }
};

// Unsigned weight quants u minus a bias of 8 << kBiasShift (Q4_0: 8, Q5_0:
// 16) against T tokens: (u - bias) . a = u . a - bias * sum(a), u in maddubs'
// unsigned operand, the second term from ActPair::off (8 * sum(a)) shifted.
// lo holds the pair's elements 0..15 (the x layout), hi 16..31 (y).
template <int T, int kBiasShift, bool kVnni>
inline void UnsignedPairStep(__m256i lo, __m256i hi, __m256 dw, const ActPair* a, int64_t a_stride, __m256* acc) {
  for (int j = 0; j < T; ++j) {
    const ActPair& aj = a[j * a_stride];
    // Quant x activation pairs: at most 4 * 31 * 127 in int16.
    const __m256i dot = DotBytes<UseVnni<kVnni, T>(), true>(lo, LoadA256(aj.x), hi, LoadA256(aj.y));
    const __m256i bias = _mm256_slli_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(aj.off)), kBiasShift);
    const __m256i sumi = _mm256_sub_epi32(dot, bias);
    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_mul_ps(dw, _mm256_load_ps(aj.d)), acc[j]);
  }
}

// Q4_0 x Q8_0: (q - 8) . a, the nibbles unsigned.
template <bool kVnni>
struct Q4_0Pairs {
  static constexpr size_t kBlock = sizeof(BlockQ4_0);
  static constexpr bool kScaledSums = false;  // reads ActPair::off

  template <int T>
  static inline void Pair(const uint8_t* wb, const ActPair* a, int64_t a_stride, __m256* acc) {
    const __m256i q = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(wb + kBlock + 2),
                                          reinterpret_cast<const __m128i*>(wb + 2));
    Step<T>(q, SpreadPair(TwoHalves(wb, kBlock)), a, a_stride, acc);
  }
  template <int T>
  static inline void Odd(const uint8_t* wb, const ActPair* a, int64_t a_stride, __m256* acc) {
    Step<T>(_mm256_zextsi128_si256(LoadU128(wb + 2)), HalfPairScale(wb), a, a_stride, acc);
  }

  template <int T>
  static inline void Step(__m256i q, __m256 dw, const ActPair* a, int64_t a_stride, __m256* acc) {
    const __m256i m4 = _mm256_set1_epi8(15);
    UnsignedPairStep<T, 0, kVnni>(_mm256_and_si256(q, m4), _mm256_and_si256(_mm256_srli_epi16(q, 4), m4), dw, a,
                                  a_stride, acc);
  }
};

// The fifth bits of a pair of Q5_0/Q5_1 blocks as bytes of 16 (set) or 0,
// in the pair layout: x (elements 0..15 of each block) takes bits 0..15 of
// each block's qh, y bits 16..31. qh2 = qh(2p) | qh(2p+1) << 32, broadcast
// to both 128-bit lanes, so lane 0 spreads qh(2p)'s bytes, lane 1 qh(2p+1)'s.
inline void FifthBits(uint64_t qh2, __m256i* x, __m256i* y) {
  const __m256i v = _mm256_set1_epi64x(static_cast<int64_t>(qh2));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201)), sixteen = _mm256_set1_epi8(16);
  const __m256i sx = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4,
                                                             4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5));
  const __m256i sy = _mm256_shuffle_epi8(v, _mm256_setr_epi8(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 6, 6, 6, 6,
                                                             6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7));
  *x = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(sx, bit), bit), sixteen);
  *y = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(sy, bit), bit), sixteen);
}

// The 5-bit quants (Q5_0, Q5_1: qh at byte kQh of a block, qs at kQs) of
// the pair of blocks at wb (kBlock bytes apart), or of a last odd block
// alone (second: false; its pair's second half is zero), in the pair layout:
// Q4_0's nibbles, with the fifth bits or'ed in (the x register takes bits
// 0..15 of each block's qh, the y register bits 16..31).
template <size_t kBlock, size_t kQh, size_t kQs>
inline void FiveBitPair(const uint8_t* wb, bool second, __m256i* lo, __m256i* hi) {
  const __m256i q = second ? _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(wb + kBlock + kQs),
                                                 reinterpret_cast<const __m128i*>(wb + kQs))
                           : _mm256_zextsi128_si256(LoadU128(wb + kQs));
  const uint64_t qh2 = LoadU32(wb + kQh) | (second ? uint64_t{LoadU32(wb + kBlock + kQh)} << 32 : 0);
  __m256i x, y;
  FifthBits(qh2, &x, &y);
  const __m256i m4 = _mm256_set1_epi8(15);
  *lo = _mm256_or_si256(_mm256_and_si256(q, m4), x);
  *hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), y);
}

// Q5_0 x Q8_0: (q - 16) . a, q the 5-bit quants.
template <bool kVnni>
struct Q5_0Pairs {
  static constexpr size_t kBlock = sizeof(BlockQ5_0);
  static constexpr bool kScaledSums = false;  // reads ActPair::off

  template <int T>
  static inline void Pair(const uint8_t* wb, const ActPair* a, int64_t a_stride, __m256* acc) {
    __m256i lo, hi;
    FiveBitPair<kBlock, 2, 6>(wb, true, &lo, &hi);
    UnsignedPairStep<T, 1, kVnni>(lo, hi, SpreadPair(TwoHalves(wb, kBlock)), a, a_stride, acc);
  }
  template <int T>
  static inline void Odd(const uint8_t* wb, const ActPair* a, int64_t a_stride, __m256* acc) {
    __m256i lo, hi;
    FiveBitPair<kBlock, 2, 6>(wb, false, &lo, &hi);
    UnsignedPairStep<T, 1, kVnni>(lo, hi, HalfPairScale(wb), a, a_stride, acc);
  }
};

// Q5_1 x Q8_0: d * (q . a) + m * sum(a) per block, q as Q5_0's; sum(a)
// times the activations' d from ActPair::sum, made once per token for
// every row.
template <bool kVnni>
struct Q5_1Pairs {
  static constexpr size_t kBlock = sizeof(BlockQ5_1);
  static constexpr bool kScaledSums = true;

  template <int T>
  static inline void Pair(const uint8_t* wb, const ActPair* a, int64_t a_stride, __m256* acc) {
    __m256i lo, hi;
    FiveBitPair<kBlock, 4, 8>(wb, true, &lo, &hi);
    Step<T>(lo, hi, SpreadPair(TwoHalves(wb, kBlock)), SpreadPair(TwoHalves(wb + 2, kBlock)), a, a_stride, acc);
  }
  template <int T>
  static inline void Odd(const uint8_t* wb, const ActPair* a, int64_t a_stride, __m256* acc) {
    __m256i lo, hi;
    FiveBitPair<kBlock, 4, 8>(wb, false, &lo, &hi);
    Step<T>(lo, hi, HalfPairScale(wb), HalfPairScale(wb + 2), a, a_stride, acc);
  }

  template <int T>
  static inline void Step(__m256i lo, __m256i hi, __m256 dw, __m256 mw, const ActPair* a, int64_t a_stride,
                          __m256* acc) {
    for (int j = 0; j < T; ++j) {
      const ActPair& aj = a[j * a_stride];
      const __m256i dot = DotBytes<UseVnni<kVnni, T>(), true>(lo, LoadA256(aj.x), hi, LoadA256(aj.y));
      const __m256 dwa = _mm256_mul_ps(dw, _mm256_load_ps(aj.d));
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), dwa, acc[j]);
      acc[j] = _mm256_fmadd_ps(mw, _mm256_load_ps(aj.sum), acc[j]);
    }
  }
};

// One row (its blocks of kind K) against T tokens, pairs p0..p1-1 (of nb
// blocks: the pair past nb / 2 is the odd last block), into acc.
template <typename K, int T>
inline void PairRow(const uint8_t* row, size_t row_bytes, const ActPair* a, int64_t a_stride, int64_t p0, int64_t p1,
                    int64_t nb, __m256* acc) {
  const int64_t full = std::min(p1, nb / 2);
  int64_t p = p0;
  for (; p < full; ++p) {
    const uint8_t* wb = row + 2 * p * K::kBlock;
    PrefetchPair(wb, kPairPrefetchRows * row_bytes);
    K::template Pair<T>(wb, a + p, a_stride, acc);
  }
  if (p < p1) K::template Odd<T>(row + 2 * p * K::kBlock, a + p, a_stride, acc);
}

// `rows` rows against T tokens' ActPairs (token j's at a + j * np), a row
// at a time: decode (one token) then reads the band as one sequential
// stream, which measured faster here than 2 or 4 rows side by side (the
// old kernels' way, for four independent FMA chains; the CPU overlaps a
// row's chain with the next row's anyway). When
// the group's pairs outgrow a slice, the rows take the pairs a slice at a
// time (their accumulators wait in memory in between), so the slice's
// activations stay in L1 while the rows' weights come from L2.
template <typename K, int T>
void PairsTile(const uint8_t* w, size_t row_bytes, int rows, const ActPair* a, int64_t np, int64_t nb, float* y,
               size_t y_stride) {
  const int64_t slice = std::max<int64_t>(1, kPairSliceBytes / (T * static_cast<int64_t>(sizeof(ActPair))));
  if (T == 1 || slice >= np) {
    for (int r = 0; r < rows; ++r) {
      __m256 acc[T];
      for (int j = 0; j < T; ++j) acc[j] = _mm256_setzero_ps();
      PairRow<K, T>(w + r * row_bytes, row_bytes, a, np, 0, np, nb, acc);
      for (int j = 0; j < T; ++j) y[j * y_stride + r] = HorizontalSum(acc[j]);
    }
    return;
  }
  thread_local std::vector<float> accs;  // 8 lanes per (row, token)
  if (accs.size() < static_cast<size_t>(rows) * T * 8) accs.resize(static_cast<size_t>(rows) * T * 8);
  std::fill_n(accs.begin(), static_cast<size_t>(rows) * T * 8, 0.f);
  for (int64_t p0 = 0; p0 < np; p0 += slice) {
    const int64_t p1 = std::min(np, p0 + slice);
    for (int r = 0; r < rows; ++r) {
      __m256 acc[T];
      for (int j = 0; j < T; ++j) acc[j] = _mm256_loadu_ps(&accs[(r * T + j) * 8]);
      PairRow<K, T>(w + r * row_bytes, row_bytes, a, np, p0, p1, nb, acc);
      for (int j = 0; j < T; ++j) _mm256_storeu_ps(&accs[(r * T + j) * 8], acc[j]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < T; ++j) y[j * y_stride + r] = HorizontalSum(_mm256_loadu_ps(&accs[(r * T + j) * 8]));
}

// DotRowsBatch for Q8_0 / Q4_0 weights (and DotRows, n_tokens = 1). Rows
// go in chunks that stay in L2 (at least a MatMul band of 64 rows, so its
// weights are read from memory once); within a chunk, tokens go in groups
// of up to kPairGroup, split evenly (9 tokens: 5 + 4), each group's
// activations rearranged once.
template <typename K>
void PairsBatch(const uint8_t* w, size_t row_bytes, int rows, const uint8_t* act, size_t act_stride, int n_tokens,
                int64_t n, float* y, size_t y_stride) {
  if (n_tokens <= 0 || rows <= 0) return;
  const int64_t nb = n / kQk0, np = (nb + 1) / 2;
  if (np == 0) {
    for (int j = 0; j < n_tokens; ++j)
      for (int r = 0; r < rows; ++r) y[j * y_stride + r] = 0.f;
    return;
  }
  const int groups = (n_tokens + kPairGroup - 1) / kPairGroup;
  const int group = (n_tokens + groups - 1) / groups;
  thread_local std::vector<ActPair> pairs;
  if (pairs.size() < static_cast<size_t>(group * np)) pairs.resize(group * np);
  const int chunk = static_cast<int>(std::max<size_t>(64, (256 << 10) / std::max<size_t>(row_bytes, 1)));
  for (int r0 = 0; r0 < rows; r0 += chunk) {
    const int r1 = std::min(rows, r0 + chunk);
    for (int j0 = 0; j0 < n_tokens; j0 += group) {
      const int tokens = std::min(group, n_tokens - j0);
      for (int j = 0; j < tokens; ++j)
        MakeActPairs<K::kScaledSums>(act + (j0 + j) * act_stride, nb, pairs.data() + j * np);
      const uint8_t* wr = w + r0 * row_bytes;
      float* yr = y + j0 * y_stride + r0;
      switch (tokens) {
        case 1: PairsTile<K, 1>(wr, row_bytes, r1 - r0, pairs.data(), np, nb, yr, y_stride); break;
        case 2: PairsTile<K, 2>(wr, row_bytes, r1 - r0, pairs.data(), np, nb, yr, y_stride); break;
        case 3: PairsTile<K, 3>(wr, row_bytes, r1 - r0, pairs.data(), np, nb, yr, y_stride); break;
        case 4: PairsTile<K, 4>(wr, row_bytes, r1 - r0, pairs.data(), np, nb, yr, y_stride); break;
        case 5: PairsTile<K, 5>(wr, row_bytes, r1 - r0, pairs.data(), np, nb, yr, y_stride); break;
        case 6: PairsTile<K, 6>(wr, row_bytes, r1 - r0, pairs.data(), np, nb, yr, y_stride); break;
        case 7: PairsTile<K, 7>(wr, row_bytes, r1 - r0, pairs.data(), np, nb, yr, y_stride); break;
        default: PairsTile<K, 8>(wr, row_bytes, r1 - r0, pairs.data(), np, nb, yr, y_stride); break;
      }
    }
  }
}

// Shuffle masks: kBroadcast16.mask[k] copies int16 lane k of each 128-bit
// lane to all 8 of its lanes.
struct Broadcast16Masks {
  alignas(32) uint8_t mask[8][32];
};
constexpr Broadcast16Masks MakeBroadcast16Masks() {
  Broadcast16Masks m{};
  for (int k = 0; k < 8; ++k) {
    for (int i = 0; i < 32; ++i) m.mask[k][i] = static_cast<uint8_t>(2 * k + i % 2);
  }
  return m;
}
constexpr Broadcast16Masks kBroadcast16 = MakeBroadcast16Masks();

inline __m256i Broadcast16(__m256i v, int k) {
  return _mm256_shuffle_epi8(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(kBroadcast16.mask[k])));
}

// The 8 sub-block scales and mins of a Q4_K block, as int16 (one per lane).
inline void Q4KScalesMins(const uint8_t* packed, __m128i* scales, __m128i* mins) {
  uint32_t u[3];
  std::memcpy(u, packed, 12);
  const uint64_t sc =
      (u[0] & 0x3f3f3f3fu) | static_cast<uint64_t>((u[2] & 0x0f0f0f0fu) | ((u[0] >> 6) & 0x03030303u) << 4) << 32;
  const uint64_t m = (u[1] & 0x3f3f3f3fu) |
                     static_cast<uint64_t>(((u[2] >> 4) & 0x0f0f0f0fu) | ((u[1] >> 6) & 0x03030303u) << 4) << 32;
  *scales = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(static_cast<int64_t>(sc)));
  *mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(static_cast<int64_t>(m)));
}

// 16 in byte l of the result where bit k of byte l of `qh` is set (the
// fifth bits of one Q5_K nibble run).
template <int k>
inline __m256i FifthBitsOf(__m256i qh) {
  const __m256i at4 = k <= 4 ? _mm256_slli_epi16(qh, 4 - k) : _mm256_srli_epi16(qh, k - 4);
  return _mm256_and_si256(at4, _mm256_set1_epi8(16));  // (16-bit shifts: bit 4 of each byte came from its own bit k)
}

// Q4_K / Q5_K (Block) x Q8_K: d*da * sum_s sc[s] (q . a)_s - dmin*da * sum_s
// m[s] (sum a)_s, the first sum in int32 lanes (maddubs, then madd by the
// scale), the second from the activation block sums. Q5_K's quants (0..31)
// are Q4_K's nibbles with the fifth bits or'ed in.
template <typename Block, int R, int T>
void DotKMinAvx2(APE_KERNEL_ARGS) {
  constexpr bool kQ5 = std::is_same_v<Block, BlockQ5K>;
  const __m256i m4 = _mm256_set1_epi8(15);
  __m256 acc[R][T];
  __m128 acc_min[R][T];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) acc[r][j] = _mm256_setzero_ps(), acc_min[r][j] = _mm_setzero_ps();
  for (int64_t b = 0; b < n / kQkK; ++b) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* wb = w + r * row_bytes + b * sizeof(Block);
      PrefetchLines(wb + R * row_bytes, sizeof(Block));
      __m128i sc128, m128;
      Q4KScalesMins(wb + offsetof(Block, scales), &sc128, &m128);
      const __m256i scales = _mm256_broadcastsi128_si256(sc128);
      const uint8_t* qs = wb + offsetof(Block, qs);
      __m256i qh = _mm256_setzero_si256();
      if constexpr (kQ5) qh = LoadU256(wb + offsetof(BlockQ5K, qh));
      __m256i sumi[T];
      for (int j = 0; j < T; ++j) sumi[j] = _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c) {
        const __m256i q = LoadU256(qs + 32 * c);
        __m256i lo = _mm256_and_si256(q, m4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        if constexpr (kQ5) {
          // Bits 2c and 2c + 1 of qh[l]; qh moves 2 bits on per c.
          lo = _mm256_or_si256(lo, FifthBitsOf<0>(qh));
          hi = _mm256_or_si256(hi, FifthBitsOf<1>(qh));
          qh = _mm256_srli_epi16(qh, 2);
        }
        const __m256i slo = Broadcast16(scales, 2 * c);
        const __m256i shi = Broadcast16(scales, 2 * c + 1);
        for (int j = 0; j < T; ++j) {
          const uint8_t* aq = act + j * act_stride + b * sizeof(BlockQ8K) + offsetof(BlockQ8K, qs) + 64 * c;
          const __m256i plo = _mm256_maddubs_epi16(lo, LoadU256(aq));
          const __m256i phi = _mm256_maddubs_epi16(hi, LoadU256(aq + 32));
          sumi[j] =
              _mm256_add_epi32(sumi[j], _mm256_add_epi32(_mm256_madd_epi16(plo, slo), _mm256_madd_epi16(phi, shi)));
        }
      }
      // d and dmin are adjacent f16s: both converted at once.
      const __m128 dmins = TwoHalves(wb, 2);
      for (int j = 0; j < T; ++j) {
        const uint8_t* ab = act + j * act_stride + b * sizeof(BlockQ8K);
        const uint8_t* bsums = ab + offsetof(BlockQ8K, bsums);
        // Sums of the activations over each 32-element sub-block.
        const __m128i asum = _mm_hadd_epi16(LoadU128(bsums), LoadU128(bsums + 16));
        const __m128 dd = _mm_mul_ps(dmins, _mm_set1_ps(LoadF32(ab)));
        acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[j]), _mm256_broadcastss_ps(dd), acc[r][j]);
        acc_min[r][j] =
            _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(m128, asum)), _mm_permute_ps(dd, 0x55), acc_min[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) y[j * y_stride + r] = HorizontalSum(acc[r][j]) - HorizontalSum(acc_min[r][j]);
}
template <int R, int T>
void DotQ4KAvx2(APE_KERNEL_ARGS) {
  DotKMinAvx2<BlockQ4K, R, T>(APE_KERNEL_PASS);
}
template <int R, int T>
void DotQ5KAvx2(APE_KERNEL_ARGS) {
  DotKMinAvx2<BlockQ5K, R, T>(APE_KERNEL_PASS);
}

// Shuffle masks for Q6_K: kScalePairs.mask[g] = bytes [2g x 8, 2g+1 x 8],
// the scales of the two sub-blocks of 32-element group g.
struct ScalePairMasks {
  alignas(16) uint8_t mask[8][16];
};
constexpr ScalePairMasks MakeScalePairMasks() {
  ScalePairMasks m{};
  for (int g = 0; g < 8; ++g) {
    for (int i = 0; i < 16; ++i) m.mask[g][i] = static_cast<uint8_t>(2 * g + i / 8);
  }
  return m;
}
constexpr ScalePairMasks kScalePairs = MakeScalePairMasks();

// The scales of group g as int16: [sc[2g] x 8 | sc[2g + 1] x 8].
inline __m256i Q6KScalePair(__m128i scales, int g) {
  return _mm256_cvtepi8_epi16(
      _mm_shuffle_epi8(scales, _mm_load_si128(reinterpret_cast<const __m128i*>(kScalePairs.mask[g]))));
}

// Q6_K x Q8_K: d*da * (sum_s sc[s] (q . a)_s - 32 * sum_s sc[s] (sum a)_s),
// all in int32 lanes; q in 0..63 goes through maddubs unsigned.
template <int R, int T>
void DotQ6KAvx2(APE_KERNEL_ARGS) {
  const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(0x30);
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < n / kQkK; ++b) {
    const size_t ab0 = b * sizeof(BlockQ8K);
    for (int r = 0; r < R; ++r) {
      const uint8_t* wb = w + r * row_bytes + b * sizeof(BlockQ6K);
      PrefetchLines(wb + R * row_bytes, sizeof(BlockQ6K));
      const __m128i sc = LoadU128(wb + offsetof(BlockQ6K, scales));
      const __m256i sc16 = _mm256_cvtepi8_epi16(sc);
      // The -32 offset: 32 * sum_s sc[s] * bsums[s].
      __m256i sumi[T];
      for (int j = 0; j < T; ++j) {
        const __m256i bsums = LoadU256(act + j * act_stride + ab0 + offsetof(BlockQ8K, bsums));
        sumi[j] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsums), 5));
      }
      for (int h = 0; h < 2; ++h) {
        const __m256i ql0 = LoadU256(wb + 64 * h), ql1 = LoadU256(wb + 64 * h + 32);
        const __m256i qh = LoadU256(wb + offsetof(BlockQ6K, qh) + 32 * h);
        const __m256i q[4] = {
            _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2)),
            _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2)),
        };
        for (int k = 0; k < 4; ++k) {
          const int g = 4 * h + k;
          const __m256i pair = Q6KScalePair(sc, g);
          for (int j = 0; j < T; ++j) {
            const uint8_t* aq = act + j * act_stride + ab0 + offsetof(BlockQ8K, qs) + 32 * g;
            sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], LoadU256(aq)), pair));
          }
        }
      }
      const float dw = HalfToFloat(LoadU16(wb + offsetof(BlockQ6K, d)));
      for (int j = 0; j < T; ++j) {
        const float d = dw * LoadF32(act + j * act_stride + ab0);
        acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[j]), _mm256_set1_ps(d), acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) y[j * y_stride + r] = HorizontalSum(acc[r][j]);
}

// Prefill with float weights (FloatGemm): R rows x T tokens, one 8-wide
// accumulator per (row, token), the whole row length in one pass. Per step
// of 8 elements the T tokens' activations are loaded once and each row's
// weights once (converted from F16/BF16 in the register), then R x T FMAs:
// at R = 4, T = 3 that is 12 accumulators + 3 activations + 1 weight = the
// 16 AVX2 registers, and 7 loads feed 12 FMAs, so the FMA units, not the
// loads, set the pace. Nothing is packed or converted ahead: the weights
// are read in the file's type straight from the mapping.
// (The loads are template arguments, so they inline into the loop.)
template <int R, int T, __m256 (*load8)(const uint8_t*, int64_t), float (*load1)(const uint8_t*, int64_t)>
void GemmFloatTile(const uint8_t* w, size_t row_bytes, const float* x, size_t ldx, int64_t n, float* y, size_t ldy) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 xv[T];
    for (int j = 0; j < T; ++j) xv[j] = _mm256_loadu_ps(x + j * ldx + i);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = load8(w + r * row_bytes, i);
      for (int j = 0; j < T; ++j) acc[r][j] = _mm256_fmadd_ps(wv, xv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < T; ++j) {
      float s = HorizontalSum(acc[r][j]);
      for (int64_t k = i; k < n; ++k) s = std::fma(load1(w + r * row_bytes, k), x[j * ldx + k], s);
      y[j * ldy + r] = s;
    }
  }
}

using GemmTileFn = void (*)(const uint8_t* w, size_t row_bytes, const float* x, size_t ldx, int64_t n, float* y,
                            size_t ldy);
constexpr int kGemmRows = 4, kGemmTokens = 3;  // the tile (above)

template <int R, int T>
constexpr GemmTileFn GemmF32Tile = GemmFloatTile<R, T, LoadF32x8, LoadF32x1>;
template <int R, int T>
constexpr GemmTileFn GemmF16Tile = GemmFloatTile<R, T, LoadF16x8, LoadF16x1>;
template <int R, int T>
constexpr GemmTileFn GemmBf16Tile = GemmFloatTile<R, T, LoadBf16x8, LoadBf16x1>;

// [R - 1][T - 1] for R in 1..kGemmRows, T in 1..kGemmTokens.
using GemmGrid = GemmTileFn[kGemmRows][kGemmTokens];
#define APE_GEMM_ROW(k, R) \
  { k<R, 1>, k<R, 2>, k<R, 3> }
#define APE_GEMM_GRID(k) \
  { APE_GEMM_ROW(k, 1), APE_GEMM_ROW(k, 2), APE_GEMM_ROW(k, 3), APE_GEMM_ROW(k, 4) }
constexpr GemmGrid kGemmF32 = APE_GEMM_GRID(GemmF32Tile);
constexpr GemmGrid kGemmF16 = APE_GEMM_GRID(GemmF16Tile);
constexpr GemmGrid kGemmBf16 = APE_GEMM_GRID(GemmBf16Tile);
#undef APE_GEMM_GRID
#undef APE_GEMM_ROW

}  // namespace

// Rows are taken in chunks of about 256 KiB, which stay in L2 while every
// tile of tokens passes over them; a tile's activations (3 tokens) stay in
// L1 while the chunk's rows go by 4 at a time.
void FloatGemm(GgmlType t, const uint8_t* w, size_t row_bytes, int rows, const float* x, size_t ldx, int n_tokens,
               int64_t n, float* y, size_t ldy) {
  const GemmGrid& tile = t == GgmlType::kF32 ? kGemmF32 : t == GgmlType::kF16 ? kGemmF16 : kGemmBf16;
  const int chunk = static_cast<int>(std::max<size_t>(kGemmRows, (256 << 10) / std::max<size_t>(row_bytes, 1)));
  for (int r0 = 0; r0 < rows; r0 += chunk) {
    const int r1 = std::min(rows, r0 + chunk);
    for (int j = 0; j < n_tokens; j += kGemmTokens) {
      const int tokens = std::min(kGemmTokens, n_tokens - j);
      for (int r = r0; r < r1; r += kGemmRows) {
        tile[std::min(kGemmRows, r1 - r) - 1][tokens - 1](w + r * row_bytes, row_bytes, x + j * ldx, ldx, n,
                                                          y + j * ldy + r, ldy);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// 7. AVX-512 kernels (AVX512F/BW/VL + VNNI), chosen at run time
// ---------------------------------------------------------------------------
// Float weights run 16 lanes wide. The block types keep the AVX2 kernels,
// the pair kernels (section 6) with vpdpbusd for token groups. Q8_0 and
// Q4_0 had AVX-512 kernels of their own (vpdpbusd, R rows x T tokens); on
// an Emerald Rapids Xeon the pair kernels measured faster in the same
// window, decode 1.2-1.3x and 64-token prefill 1.2-1.5x
// (bench/results/engine.md), so they went. Q4_K and Q6_K: their int16 step
// carries the sub-block scale multiply, which vpdpbusd would move to a slow
// 32-bit multiply. BF16 weights do not
// use AVX512_BF16's vdpbf16ps: it needs bf16 activations, and these stay
// float32 (the kernels are bound by memory, not by the convert).
namespace {

#define APE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

APE_AVX512 inline __m512 LoadF32x16(const uint8_t* row, int64_t i) {
  return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + i);
}
APE_AVX512 inline __m512 LoadF16x16(const uint8_t* row, int64_t i) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * i)));
}
APE_AVX512 inline __m512 LoadBf16x16(const uint8_t* row, int64_t i) {
  const __m512i u32 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * i)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u32, 16));
}

// As DotFloatRows, 32 elements per step for each row.
template <int R, int T, int kElemBytes, typename Load16, typename Load1>
APE_AVX512 inline void DotFloatRows512(const uint8_t* w, size_t row_bytes, const uint8_t* act, size_t act_stride,
                                       int64_t n, float* y, size_t y_stride, Load16 load16, Load1 load1) {
  const float* x[T];  // read with unaligned loads only
  for (int j = 0; j < T; ++j) x[j] = reinterpret_cast<const float*>(act + j * act_stride);
  __m512 acc0[R][T], acc1[R][T];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < T; ++j) acc0[r][j] = acc1[r][j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + r * row_bytes;
      PrefetchLines(row + R * row_bytes + i * kElemBytes, 32 * kElemBytes);
      const __m512 w0 = load16(row, i), w1 = load16(row, i + 16);
      for (int j = 0; j < T; ++j) {
        acc0[r][j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[j] + i), acc0[r][j]);
        acc1[r][j] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[j] + i + 16), acc1[r][j]);
      }
    }
  }
  for (; i + 16 <= n; i += 16) {
    for (int r = 0; r < R; ++r) {
      const __m512 w0 = load16(w + r * row_bytes, i);
      for (int j = 0; j < T; ++j) acc0[r][j] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[j] + i), acc0[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < T; ++j) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r][j], acc1[r][j]));
      for (int64_t k = i; k < n; ++k) s = std::fma(load1(w + r * row_bytes, k), LoadF32x1(act + j * act_stride, k), s);
      y[j * y_stride + r] = s;
    }
  }
}

template <int R, int T>
APE_AVX512 void DotF32Avx512(APE_KERNEL_ARGS) {
  DotFloatRows512<R, T, 4>(APE_KERNEL_PASS, LoadF32x16, LoadF32x1);
}
template <int R, int T>
APE_AVX512 void DotF16Avx512(APE_KERNEL_ARGS) {
  DotFloatRows512<R, T, 2>(APE_KERNEL_PASS, LoadF16x16, LoadF16x1);
}
template <int R, int T>
APE_AVX512 void DotBf16Avx512(APE_KERNEL_ARGS) {
  DotFloatRows512<R, T, 2>(APE_KERNEL_PASS, LoadBf16x16, LoadBf16x1);
}

#undef APE_AVX512

}  // namespace

// ---------------------------------------------------------------------------
// 8. Dispatch
// ---------------------------------------------------------------------------
namespace {

// Computes R rows against T tokens (see DotFloatRows); grids are indexed
// [R - 1][T - 1], R and T in 1..4.
using RowsKernel = void (*)(APE_KERNEL_ARGS);
using KernelGrid = RowsKernel[4][4];
// A whole DotRowsBatch (DotRows: n_tokens = 1) for types whose kernels
// tile rows and tokens themselves: the pair kernels of Q8_0, Q4_0, Q5_0 and
// Q5_1 (PairsBatch; kVnni where the CPU has AVX512-VNNI), or null.
using BatchKernel = void (*)(const uint8_t* w, size_t row_bytes, int rows, const uint8_t* act, size_t act_stride,
                             int n_tokens, int64_t n, float* y, size_t y_stride);

template <bool kVnni>
BatchKernel PairsBatchOf(GgmlType t) {
  switch (t) {
    case GgmlType::kQ8_0: return PairsBatch<Q8_0Pairs<kVnni>>;
    case GgmlType::kQ4_0: return PairsBatch<Q4_0Pairs<kVnni>>;
    case GgmlType::kQ5_0: return PairsBatch<Q5_0Pairs<kVnni>>;
    case GgmlType::kQ5_1: return PairsBatch<Q5_1Pairs<kVnni>>;
    default: return nullptr;
  }
}

struct KernelSet {
  const char* isa;
  KernelGrid f32, f16, bf16, q4_k, q5_k, q6_k;
  // One row against T = 1..8 tokens ([T - 1]), for the token groups of
  // Q4_K/Q5_K/Q6_K decode batches and prefill.
  RowsKernel q4_k_tokens[8], q5_k_tokens[8], q6_k_tokens[8];

  const RowsKernel* TokensFor(GgmlType t) const {
    return t == GgmlType::kQ4_K ? q4_k_tokens : t == GgmlType::kQ5_K ? q5_k_tokens : q6_k_tokens;
  }

  const KernelGrid& For(GgmlType t) const {
    switch (t) {
      case GgmlType::kF32: return f32;
      case GgmlType::kF16: return f16;
      case GgmlType::kBF16: return bf16;
      case GgmlType::kQ4_K: return q4_k;
      case GgmlType::kQ5_K: return q5_k;
      case GgmlType::kQ6_K: return q6_k;
      default: std::abort();  // callers check IsWeightType
    }
  }
};

#define APE_ROW(k, R) \
  { k<R, 1>, k<R, 2>, k<R, 3>, k<R, 4> }
#define APE_GRID(k) \
  { APE_ROW(k, 1), APE_ROW(k, 2), APE_ROW(k, 3), APE_ROW(k, 4) }
#define APE_TOKENS(k) \
  { k<1, 1>, k<1, 2>, k<1, 3>, k<1, 4>, k<1, 5>, k<1, 6>, k<1, 7>, k<1, 8> }

constexpr KernelSet kAvx2 = {"avx2",
                             APE_GRID(DotF32Avx2),
                             APE_GRID(DotF16Avx2),
                             APE_GRID(DotBf16Avx2),
                             APE_GRID(DotQ4KAvx2),
                             APE_GRID(DotQ5KAvx2),
                             APE_GRID(DotQ6KAvx2),
                             APE_TOKENS(DotQ4KAvx2),
                             APE_TOKENS(DotQ5KAvx2),
                             APE_TOKENS(DotQ6KAvx2)};

constexpr KernelSet kAvx512 = {"avx512-vnni",           APE_GRID(DotF32Avx512), APE_GRID(DotF16Avx512),
                               APE_GRID(DotBf16Avx512), APE_GRID(DotQ4KAvx2),   APE_GRID(DotQ5KAvx2),
                               APE_GRID(DotQ6KAvx2),    APE_TOKENS(DotQ4KAvx2), APE_TOKENS(DotQ5KAvx2),
                               APE_TOKENS(DotQ6KAvx2)};

#undef APE_TOKENS
#undef APE_GRID
#undef APE_ROW

bool HasAvx512Vnni() {
  __builtin_cpu_init();  // in case this runs before libgcc's constructor
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

bool IsKQuant(GgmlType t) { return t == GgmlType::kQ4_K || t == GgmlType::kQ5_K || t == GgmlType::kQ6_K; }

const KernelSet* DetectKernels() { return HasAvx512Vnni() ? &kAvx512 : &kAvx2; }

const KernelSet*& ActiveKernels() {
  static const KernelSet* active = DetectKernels();
  return active;
}

// The pair kernels with vpdpbusd under the AVX-512 kernel set (which needs
// AVX512-VNNI and VL), with maddubs otherwise.
BatchKernel PairsBatchFor(GgmlType t) {
  return ActiveKernels() == &kAvx512 ? PairsBatchOf<true>(t) : PairsBatchOf<false>(t);
}

}  // namespace

// One token. K-quant rows go one at a time (one sequential stream, as
// PairsTile: faster from memory here than 4 rows side by side), and so do
// rows shorter than kShortRowBytes; the other grid kernels take 4 rows at a
// time. Rows of under 2 KB (Qwen2.5-0.5B's 896 columns in F16/BF16: 1792
// bytes) read 4 side by side streamed at 59-70% of one thread's read
// bandwidth, one at a time at 88-103% (bench_kernels, 3 alternations);
// longer rows (F32 ones of 3584 bytes, F16 ones of 9728) did as well or
// better 4 at a time. Either way each (row, token) result is the same chain
// of operations (DotFloatRows), so the choice changes no output bit.
constexpr size_t kShortRowBytes = 2048;

void DotRows(GgmlType t, const uint8_t* w, size_t row_bytes, int rows, const uint8_t* act, int64_t n, float* y) {
  if (BatchKernel batch = PairsBatchFor(t)) return batch(w, row_bytes, rows, act, 0, 1, n, y, 0);
  const KernelGrid& kernel = ActiveKernels()->For(t);
  if (IsKQuant(t) || row_bytes < kShortRowBytes) {
    for (int r = 0; r < rows; ++r) kernel[0][0](w + r * row_bytes, row_bytes, act, 0, n, y + r, 0);
    return;
  }
  int r = 0;
  for (; r + 4 <= rows; r += 4) kernel[3][0](w + r * row_bytes, row_bytes, act, 0, n, y + r, 0);
  if (r < rows) kernel[rows - r - 1][0](w + r * row_bytes, row_bytes, act, 0, n, y + r, 0);
}

// Kernels with a BatchKernel (the Q8_0/Q4_0/Q5_0/Q5_1 pairs: PairsBatch)
// tile rows and tokens themselves; K-quants run token groups of up to 8
// (below), F16/BF16 rows are converted to float32 first. F32 runs each row
// against groups of 4 tokens. A decode batch (activations that fit in L2)
// takes a row through all its token groups while it is in L1; a prefill
// takes chunks of about 64 KiB of rows through one token group after
// another (the chunk stays in L2, a group's activations in L1). Either way
// memory is read once.
void DotRowsBatch(GgmlType t, const uint8_t* w, size_t row_bytes, int rows, const uint8_t* act, size_t act_stride,
                  int n_tokens, int64_t n, float* y, size_t y_stride) {
  if (n_tokens <= 0 || rows <= 0) return;
  if (BatchKernel batch = PairsBatchFor(t)) return batch(w, row_bytes, rows, act, act_stride, n_tokens, n, y, y_stride);
  if (n_tokens == 1) return DotRows(t, w, row_bytes, rows, act, n, y);
  if (IsKQuant(t)) {
    // A row at a time against token groups of up to 8 (split evenly), in
    // chunks of rows that stay in L2: the unpacking of a block (nibbles,
    // 6-bit scales) is shared by twice as many tokens as the grid's 4, which
    // measured 10-30% faster for batches of 8 and prefill.
    const RowsKernel* kernel = ActiveKernels()->TokensFor(t);
    const int groups = (n_tokens + 7) / 8, group = (n_tokens + groups - 1) / groups;
    const int chunk = static_cast<int>(std::max<size_t>(4, (256 << 10) / std::max<size_t>(row_bytes, 1)));
    for (int r0 = 0; r0 < rows; r0 += chunk) {
      const int r1 = std::min(rows, r0 + chunk);
      for (int j = 0; j < n_tokens; j += group) {
        const int tokens = std::min(group, n_tokens - j);
        for (int r = r0; r < r1; ++r)
          kernel[tokens - 1](w + r * row_bytes, row_bytes, act + j * act_stride, act_stride, n, y + j * y_stride + r,
                             y_stride);
      }
    }
    return;
  }
  if (t == GgmlType::kF16 || t == GgmlType::kBF16) {
    // Each row converted to float32 once (exactly: every float16 and
    // bfloat16 is a float32) into a buffer that stays in L1, then the F32
    // kernels run every token group over it. The float16 kernels would
    // convert each weight again for every group of 4 tokens, and the
    // conversions, not memory, bound them. Each (row, token) result is what
    // the float16 kernel computes (DotFloatRows: the same values in the same
    // operations and order), so rows stay bit-identical to one-token decode
    // (DotRows above).
    const KernelGrid& f32 = ActiveKernels()->For(GgmlType::kF32);
    const size_t f32_row = static_cast<size_t>(n) * sizeof(float);
    thread_local std::vector<float> buf;
    if (buf.size() < static_cast<size_t>(n)) buf.resize(n);
    const uint8_t* bw = reinterpret_cast<const uint8_t*>(buf.data());
    for (int r = 0; r < rows; ++r) {
      const uint8_t* row = w + r * row_bytes;
      PrefetchLines(row + row_bytes, row_bytes);
      int64_t i = 0;
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(buf.data() + i, t == GgmlType::kF16 ? LoadF16x8(row, i) : LoadBf16x8(row, i));
      for (; i < n; ++i) buf[i] = t == GgmlType::kF16 ? LoadF16x1(row, i) : LoadBf16x1(row, i);
      for (int j = 0; j < n_tokens; j += 4) {
        const int tokens = std::min(4, n_tokens - j);
        f32[0][tokens - 1](bw, f32_row, act + j * act_stride, act_stride, n, y + j * y_stride + r, y_stride);
      }
    }
    return;
  }
  const KernelGrid& kernel = ActiveKernels()->For(t);
  constexpr int kGroup = 4;
  auto run = [&](int r, int j) {
    const int tokens = std::min(kGroup, n_tokens - j);
    kernel[0][tokens - 1](w + r * row_bytes, row_bytes, act + j * act_stride, act_stride, n, y + j * y_stride + r,
                          y_stride);
  };
  if (static_cast<size_t>(n_tokens) * act_stride <= (256 << 10)) {
    // A decode batch: its activations fit in L2, so each block of rows goes
    // through every token group while it is in L1, and the weights stream
    // from memory once, without pause, under the arithmetic.
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < n_tokens; j += kGroup) run(r, j);
    return;
  }
  const int chunk = static_cast<int>(std::max<size_t>(4, (64 << 10) / std::max<size_t>(row_bytes, 1)));
  for (int r0 = 0; r0 < rows; r0 += chunk) {
    const int r1 = std::min(rows, r0 + chunk);
    for (int j = 0; j < n_tokens; j += kGroup) {
      for (int r = r0; r < r1; ++r) run(r, j);
    }
  }
}

const char* KernelIsa() { return ActiveKernels()->isa; }

bool ForceKernelIsaForTesting(const char* isa) {
  const std::string_view want = isa == nullptr ? "" : isa;
  if (want.empty()) {
    ActiveKernels() = DetectKernels();
    return true;
  }
  if (want == kAvx2.isa) {
    ActiveKernels() = &kAvx2;
    return true;
  }
  if (want == kAvx512.isa && HasAvx512Vnni()) {
    ActiveKernels() = &kAvx512;
    return true;
  }
  return false;
}

}  // namespace ape
