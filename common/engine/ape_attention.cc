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
//
// Each of C and O is a flash-attention state per (row, head), and the two
// merge once at the end:
//
//   m = running max of the logits,  l = sum exp(s_j - m),  acc = sum exp(s_j - m) v_j
//   a = S*T * (m_C + log l_C),   b = m_O + log l_O,   M = max(a, b)
//   out = [e^(a-M) acc_C / l_C + e^(b-M) acc_O / l_O] / (e^(a-M) + e^(b-M))
//
// ApeAttention computes the states as matrix products. The query heads that
// share a KV head (a GQA group) and a tile of R query rows read the same keys:
// they are the task's "lanes", lane = row * group + head_in_group, so that
//
//   Q_g     [lanes][d]          stored transposed, Qt [d][lanes], 8 lanes per AVX2 vector
//                               (16 per AVX-512 register, where the CPU has them)
//   S       = K_tile Q_g^T      [keys][lanes], times 1/sqrt(d) (and 1/T in C)
//   m, l    online softmax of S down each lane (column), masked only on the
//           tiles of the causal diagonal; C and O keys never share a tile
//   acc    += V_tile^T P        [d][lanes]
//
// Keys go in tiles of consecutive slots, each tile copied out of the cache
// once (LoadKvTile) and used by all lanes, so a decode row reads every K/V
// once for its whole GQA group. The logits are kept in base 2 (times
// log2 e, so every exponential is a 2^x), which changes nothing but the unit
// of m: log Z = m ln 2 + ln l.
//
// Tasks are (KV heads, row tile, key chunk). A block of rows takes one KV
// head per task. A decode row (a few rows: one lane block per KV head) is
// bound by memory: its tasks take all KV heads, to read whole cache rows,
// and split the keys into chunks to keep every thread busy; the chunk that
// finishes last merges the chunks' states (the same algebra as rescaling by
// a new max) before the APE merge. A single row (decode proper) goes
// through its own kernel instead, vectorized along head_dim, with float16
// converted in registers ("Decode: one row over many keys" below).
// ApeAttentionReference is the same math one (row, head) at a time, one key
// at a time, as APE.md describes it.
#include "common/engine/ape_attention.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/engine/half.h"
#include "common/engine/threading.h"

namespace ape {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kLanes = 8;            // floats per AVX2 vector
constexpr int kMaxBlockVectors = 6;  // lanes of one lane block, in vectors (BlockVectors)
constexpr float kLog2E = 1.44269504088896341f, kLn2 = 0.693147180559945309f;

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

// 2^x on 8 lanes for x <= 0 (Cephes' exp2f polynomial on [-1/2, 1/2],
// relative error about 2e-7). Below -125, -inf included, it gives 2^-125,
// not 0: callers mask.
__attribute__((always_inline)) inline __m256 Exp2V(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-125.f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  // Times 2^n: n added to the exponent field.
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

}  // namespace

// ============================ Reference kernel ============================

namespace {

// Head `offset`.. of a K or V row of `seg` as float32: the row itself, or
// converted into `buf` (head_dim floats) when it is stored as float16 or
// int8 (kv_dim: the row's values, before an int8 row's scales).
inline const float* HeadRow(const KvSegment& seg, const uint8_t* row, int offset, int head_dim, int kv_dim,
                            float* buf) {
  if (seg.element == KvElement::kFloat32) return reinterpret_cast<const float*>(row) + offset;
  if (seg.element == KvElement::kInt8) {
    DequantizeInt8Head(row, kv_dim, offset / head_dim, head_dim, buf);
    return buf;
  }
  HalfToFloat(reinterpret_cast<const uint16_t*>(row) + offset, buf, head_dim);
  return buf;
}

}  // namespace

void AccumulateBlock(const float* q, const KvCache& cache, int layer, int kv_head_offset, int head_dim, int begin,
                     int end, float logit_scale, AttentionState* st) {
  constexpr int kTile = 64;  // keys scored per step (a stack buffer)
  float s[kTile];
  float row[kMaxHeadDim];  // a float16 row converted
  for (int t0 = begin; t0 < end; t0 += kTile) {
    const int nt = std::min(kTile, end - t0);
    // Score a tile of keys and find its maximum.
    float tile_max = kNegInf;
    cache.ForEachRun(t0, nt, [&](const KvSegment& seg, int first, int count) {
      for (int j = first - t0; j < first - t0 + count; ++j) {
        const float* k = HeadRow(seg, seg.key_row(layer, t0 + j), kv_head_offset, head_dim, cache.kv_dim, row);
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int d = 0; d < head_dim; ++d) dot += q[d] * k[d];
        s[j] = dot * logit_scale;
        tile_max = std::max(tile_max, s[j]);
      }
    });
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
    cache.ForEachRun(t0, nt, [&](const KvSegment& seg, int first, int count) {
      for (int j = first - t0; j < first - t0 + count; ++j) {
        const float* v = HeadRow(seg, seg.value_row(layer, t0 + j), kv_head_offset, head_dim, cache.kv_dim, row);
        st->l += p[j];
#pragma omp simd
        for (int d = 0; d < head_dim; ++d) st->acc[d] += p[j] * v[d];
      }
    });
  }
}

void ApeAttentionReference(const float* q, int n, int first_slot, const KvCache& cache, int layer, int n_heads,
                           int n_kv_heads, int head_dim, const ApeParams& ape, float* out) {
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

// ======================= Attention as matrix products =======================
namespace {

// ---- Reading K/V: the one place the kernel touches the cache's storage.

// 8 int8 values at p (any alignment) as floats.
inline __m256 Int8x8(const uint8_t* p) {
  int64_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(bits)));
}

// `count` keys and values of one KV head: key j of the tile is the head_dim
// floats at k + j * stride (likewise v).
struct KvTile {
  const float* k;
  const float* v;
  size_t stride;
  int count;
};

// Copies keys and values [begin, begin + count) of KV heads [g0, g0 +
// heads) into `buf` ([2][count][heads * head_dim]: the keys, then the
// values), as float32. The copy reads the cache in order, which the hardware
// prefetchers follow (the kernels' own pattern they do not), and the kernels
// then read the tile from L1/L2 as many times as they need. A tile may span
// segments (kv_cache.h): each run of slots inside one is copied from its
// rows, float16 ones converted on the way, 8 values per F16C instruction
// (_mm256_cvtph_ps), int8 ones widened and multiplied by their head's scale,
// so a float16 cache reads half the bytes of a float32 one (int8 about a
// quarter) and the kernels below see float32 either way.
KvTile LoadKvTile(const KvCache& cache, int layer, int g0, int heads, int head_dim, int begin, int count, float* buf) {
  const size_t off = static_cast<size_t>(g0) * head_dim;
  const int width = heads * head_dim;
  float* bk = buf;
  float* bv = buf + static_cast<size_t>(count) * width;
  cache.ForEachRun(begin, count, [&](const KvSegment& seg, int first, int n) {
    float* dk = bk + static_cast<size_t>(first - begin) * width;
    float* dv = bv + static_cast<size_t>(first - begin) * width;
    const uint8_t* k = seg.key_row(layer, first);
    const uint8_t* v = seg.value_row(layer, first);
    if (seg.element == KvElement::kInt8) {
      for (int j = 0; j < n; ++j) {
        for (const bool keys : {true, false}) {
          const uint8_t* row = (keys ? k : v) + j * seg.row_stride;
          float* out = (keys ? dk : dv) + static_cast<size_t>(j) * width;
          for (int hi = 0; hi < heads; ++hi) {
            DequantizeInt8Head(row, cache.kv_dim, g0 + hi, head_dim, out + static_cast<size_t>(hi) * head_dim);
          }
        }
      }
      return;
    }
    if (seg.element == KvElement::kFloat16) {
      for (int j = 0; j < n; ++j) {
        const uint16_t* kj = reinterpret_cast<const uint16_t*>(k + j * seg.row_stride) + off;
        const uint16_t* vj = reinterpret_cast<const uint16_t*>(v + j * seg.row_stride) + off;
        float* bkj = dk + static_cast<size_t>(j) * width;
        float* bvj = dv + static_cast<size_t>(j) * width;
        int d = 0;
        for (; d + kLanes <= width; d += kLanes) {
          _mm256_storeu_ps(bkj + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kj + d))));
          _mm256_storeu_ps(bvj + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vj + d))));
        }
        for (; d < width; ++d) bkj[d] = HalfToFloat(kj[d]), bvj[d] = HalfToFloat(vj[d]);
      }
      return;
    }
    for (int j = 0; j < n; ++j) {
      const float* kj = reinterpret_cast<const float*>(k + j * seg.row_stride) + off;
      const float* vj = reinterpret_cast<const float*>(v + j * seg.row_stride) + off;
      float* bkj = dk + static_cast<size_t>(j) * width;
      float* bvj = dv + static_cast<size_t>(j) * width;
      int d = 0;
      for (; d + kLanes <= width; d += kLanes) {
        _mm256_storeu_ps(bkj + d, _mm256_loadu_ps(kj + d));
        _mm256_storeu_ps(bvj + d, _mm256_loadu_ps(vj + d));
      }
      for (; d < width; ++d) bkj[d] = kj[d], bvj[d] = vj[d];
    }
  });
  return {bk, bv, static_cast<size_t>(width), count};
}

// ---- The plan: rows per tile, key chunks, and what each task is.

struct Plan {
  const float* q;
  float* out;
  const KvCache* cache;
  int n, first_slot, layer, n_heads, n_kv_heads, head_dim, group;
  int context_begin, context_end;  // block C = slots [begin, end)
  float o_scale, c_scale;          // logit scales, base 2: log2(e)/sqrt(d), log2(e)/(T sqrt(d))
  float st;                        // S*T
  int rows_per_tile, row_tiles, chunks;
  int heads_per_task;   // KV heads of a task: 1, or all when lanes are few
  int64_t tasks;        // (KV heads, row tile, key chunk) triples
  int key_tile;         // keys per tile, all of a task's KV heads together
  size_t state_floats;  // the C and O states of one task's lanes
  bool wide;            // lane blocks in AVX-512 registers (AttendTile512)
};

// A task: KV heads [g0, g0 + heads), query rows [r0, r0 + rows), chunk
// `chunk` of their keys. Each KV head has head_vectors vectors of lanes:
// lane = (KV head - g0) * 8 head_vectors + row * group + head in the group.
struct Task {
  int g0, heads, r0, rows, chunk;
  int head_lanes;    // rows * group
  int head_vectors;  // head_lanes rounded up to whole vectors
  int vectors;       // heads * head_vectors
};

inline int CeilDiv(int a, int b) { return (a + b - 1) / b; }

// Lanes per C or O state, for a task of `vectors` vectors: m[lanes],
// l[lanes], acc[lanes * head_dim].
inline size_t StateFloats(int vectors, int head_dim) { return static_cast<size_t>(vectors) * kLanes * (head_dim + 2); }

Plan MakePlan(const float* q, int n, int first_slot, const KvCache& cache, int layer, int n_heads, int n_kv_heads,
              int head_dim, const ApeParams& ape, float* out, const ApeKernelOptions& opt) {
  Plan p{};
  p.q = q;
  p.out = out;
  p.cache = &cache;
  p.n = n;
  p.first_slot = first_slot;
  p.layer = layer;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv_heads;
  p.head_dim = head_dim;
  p.group = n_heads / n_kv_heads;
  p.context_begin = ape.context_begin;
  p.context_end = ape.context_end;
  p.o_scale = kLog2E / std::sqrt(static_cast<float>(head_dim));
  p.c_scale = p.o_scale / ape.temperature;
  p.st = ape.scale * ape.temperature;
  // Rows per tile: a multiple of `unit` fills whole vectors with lanes.
  const int unit = kLanes / std::gcd(p.group, kLanes);
  p.rows_per_tile = std::min(n, unit * std::max(1, opt.target_lanes / (unit * p.group)));
  p.row_tiles = CeilDiv(n, p.rows_per_tile);
  // With one lane block per KV head (decode, a few rows) a task is bound by
  // memory: it takes every KV head, so that it reads whole cache rows (one
  // head's part of each row comes at about half the bandwidth).
  const int head_vectors = CeilDiv(p.rows_per_tile * p.group, kLanes);
  p.heads_per_task = head_vectors <= 3 ? n_kv_heads : 1;
  p.key_tile = std::max(1, opt.key_tile / p.heads_per_task);
  // Split-K when (KV heads, row tile) tasks alone cannot keep the threads busy.
  const int tasks = n_kv_heads / p.heads_per_task * p.row_tiles, wanted = 4 * ComputeThreads();
  const int keys = first_slot + n;
  p.chunks = 1;
  if (tasks < wanted)
    p.chunks = std::clamp(CeilDiv(wanted, tasks), 1, std::max(1, keys / std::max(1, opt.min_chunk_keys)));
  p.tasks = static_cast<int64_t>(tasks) * p.chunks;
  p.state_floats = 2 * StateFloats(p.heads_per_task * head_vectors, head_dim);
  p.wide = opt.avx512 && CpuHasAvx512();
  return p;
}

// Task `i`: the last row tiles (which see the most keys) come first.
inline Task TaskAt(const Plan& p, int64_t i) {
  Task t;
  t.chunk = static_cast<int>(i % p.chunks);
  const int64_t rest = i / p.chunks;
  const int head_sets = p.n_kv_heads / p.heads_per_task;
  t.heads = p.heads_per_task;
  t.g0 = static_cast<int>(rest % head_sets) * t.heads;
  const int rt = p.row_tiles - 1 - static_cast<int>(rest / head_sets);
  t.r0 = rt * p.rows_per_tile;
  t.rows = std::min(p.rows_per_tile, p.n - t.r0);
  t.head_lanes = t.rows * p.group;
  t.head_vectors = CeilDiv(t.head_lanes, kLanes);
  t.vectors = t.heads * t.head_vectors;
  return t;
}

// The running softmax states of a task's lanes for one key block (C or O).
// Lanes go in blocks of BlockVectors() vectors (ForEachBlock); the block of lanes
// [b0, b0 + w) keeps acc[d][lane] at acc[b0 * head_dim + d * w + (lane - b0)].
struct LaneStates {
  float* m;    // [lanes] running max; -inf until a key is seen
  float* l;    // [lanes] sum of exp(s_j - m)
  float* acc;  // [lanes * head_dim] sum of exp(s_j - m) v_j, per lane block
};

inline LaneStates StatesAt(float* base, int vectors) {
  const int lanes = vectors * kLanes;
  return {base, base + lanes, base + 2 * lanes};
}

inline void ResetStates(const LaneStates& s, int vectors, int head_dim) {
  const int lanes = vectors * kLanes;
  std::fill(s.m, s.m + lanes, kNegInf);
  std::fill(s.l, s.l + lanes, 0.f);
  std::fill(s.acc, s.acc + static_cast<size_t>(lanes) * head_dim, 0.f);
}

// Lane blocks are 3 vectors (24 lanes) when they can be; 4 vectors left go
// as 2 + 2, not 3 + 1 (a one-vector block runs the slowest kernels).
// Wide (AVX-512), blocks are 6, 4 or 2 vectors (3, 2 or 1 registers of
// 16 lanes), 6 when they can be; an odd count leaves 3 or 1 to the AVX2
// kernels (7 = 4 + 3, 5 = 2 + 3).
inline int BlockVectors(int vectors_left, bool wide) {
  if (!wide) return vectors_left == 4 ? 2 : std::min(vectors_left, 3);
  if (vectors_left == 8 || vectors_left == 7) return 4;
  if (vectors_left == 5) return 2;
  return vectors_left >= 6 ? 6 : vectors_left;
}

// Calls f(KV head - g0, first lane, vectors) for each lane block of a task.
template <typename F>
void ForEachBlock(const Plan& p, const Task& t, const F& f) {
  for (int hi = 0; hi < t.heads; ++hi)
    for (int v0 = 0, w = 0; v0 < t.head_vectors; v0 += w) {
      w = BlockVectors(t.head_vectors - v0, p.wide);
      f(hi, (hi * t.head_vectors + v0) * kLanes, w);
    }
}

// Calls f(lane, block's first lane, block width, row, query head) for the
// task's real lanes (not the padding of a KV head's last vector).
template <typename F>
void ForEachLane(const Plan& p, const Task& t, const F& f) {
  ForEachBlock(p, t, [&](int hi, int b0, int w) {
    const int head_first = hi * t.head_vectors * kLanes;
    for (int lane = b0; lane < std::min(b0 + w * kLanes, head_first + t.head_lanes); ++lane) {
      const int i = lane - head_first;
      f(lane, b0, w * kLanes, t.r0 + i / p.group, (t.g0 + hi) * p.group + i % p.group);
    }
  });
}

// ---- Kernels on one lane block of NV vectors (W = 8 NV lanes).
//
// The accumulators are arrays of registers; the loops over them are unrolled
// by pragma, as GCC otherwise stores every accumulator to the stack on every
// step (3x slower).

// Where the score kernel leaves a tile: s[j][lane] = score * scale, -inf
// after the lane's last visible slot when `last` is given, and each lane's
// running maximum. All in memory on purpose: held in registers across the
// kernel's loop they would push its accumulators onto the stack.
struct ScoreOut {
  float* s;             // [keys][W]
  float* max;           // [W]
  const float* scale;   // the logit scale
  const int32_t* last;  // [W] each lane's last visible slot, or nullptr
};

// S[j][lane] = sum_d K[j][d] Qt[d][lane] for MR keys from slot `slot`:
// MR x NV accumulators, K broadcast from its row, Qt one vector load per
// (d, vector); then scaled, masked and stored, and the maxima raised.
template <int MR, int NV>
inline void ScoreKeys(const float* k, size_t k_stride, const float* qt, int head_dim, int slot, const ScoreOut& out) {
  constexpr int W = NV * kLanes;
  __m256 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int d = 0; d < head_dim; ++d) {
    __m256 qv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) qv[v] = _mm256_loadu_ps(qt + d * W + v * kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m256 kb = _mm256_broadcast_ss(k + i * k_stride + d);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(kb, qv[v], acc[i][v]);
    }
  }
  const __m256 scale = _mm256_broadcast_ss(out.scale);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      __m256 x = _mm256_mul_ps(acc[i][v], scale);
      if (out.last != nullptr) {
        const __m256i last = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out.last + v * kLanes));
        const __m256i hidden = _mm256_cmpgt_epi32(_mm256_set1_epi32(slot + i), last);
        x = _mm256_blendv_ps(x, _mm256_set1_ps(kNegInf), _mm256_castsi256_ps(hidden));
      }
      _mm256_storeu_ps(out.s + i * W + v * kLanes, x);
      float* max = out.max + v * kLanes;
      _mm256_storeu_ps(max, _mm256_max_ps(_mm256_loadu_ps(max), x));
    }
}

// The last `rest` (< MR) keys of a tile, with a kernel of exactly that height.
template <int NV, int MR>
inline void ScoreRest(const float* k, size_t k_stride, int rest, const float* qt, int head_dim, int slot,
                      const ScoreOut& out) {
  if constexpr (MR > 0) {
    if (rest == MR) return ScoreKeys<MR, NV>(k, k_stride, qt, head_dim, slot, out);
    ScoreRest<NV, MR - 1>(k, k_stride, rest, qt, head_dim, slot, out);
  }
}

// S = K_tile Qt for the nt keys of a tile from slot slot0, into `out`.
template <int NV>
void ScoreTile(const KvTile& kv, const float* qt, int head_dim, int slot0, const ScoreOut& out) {
  constexpr int MR = NV == 3 ? 4 : NV == 2 ? 6 : 8;  // 12 (or 8) accumulators of 16 registers
  std::fill(out.max, out.max + NV * kLanes, kNegInf);
  int j = 0;
  for (; j + MR <= kv.count; j += MR) {
    const ScoreOut at{out.s + j * NV * kLanes, out.max, out.scale, out.last};
    ScoreKeys<MR, NV>(kv.k + j * kv.stride, kv.stride, qt, head_dim, slot0 + j, at);
  }
  const ScoreOut at{out.s + j * NV * kLanes, out.max, out.scale, out.last};
  ScoreRest<NV, MR - 1>(kv.k + j * kv.stride, kv.stride, kv.count - j, qt, head_dim, slot0 + j, at);
}

// acc[d][lane] += sum_j V[j][d] P[j][lane] for MD dims: MD x NV accumulators
// kept in registers over the whole tile.
template <int MD, int NV>
inline void AddValues(const float* v, size_t v_stride, int nt, const float* p, float* acc) {
  constexpr int W = NV * kLanes;
  __m256 a[MD][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MD; ++i)
#pragma GCC unroll 16
    for (int u = 0; u < NV; ++u) a[i][u] = _mm256_loadu_ps(acc + i * W + u * kLanes);
  for (int j = 0; j < nt; ++j) {
    __m256 pv[NV];
#pragma GCC unroll 16
    for (int u = 0; u < NV; ++u) pv[u] = _mm256_loadu_ps(p + j * W + u * kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < MD; ++i) {
      const __m256 vb = _mm256_broadcast_ss(v + j * v_stride + i);
#pragma GCC unroll 16
      for (int u = 0; u < NV; ++u) a[i][u] = _mm256_fmadd_ps(vb, pv[u], a[i][u]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MD; ++i)
#pragma GCC unroll 16
    for (int u = 0; u < NV; ++u) _mm256_storeu_ps(acc + i * W + u * kLanes, a[i][u]);
}

template <int NV, int MD>
inline void AddValuesRest(const float* v, size_t v_stride, int nt, int rest, const float* p, float* acc) {
  if constexpr (MD > 0) {
    if (rest == MD) return AddValues<MD, NV>(v, v_stride, nt, p, acc);
    AddValuesRest<NV, MD - 1>(v, v_stride, nt, rest, p, acc);
  }
}

// acc += V_tile^T P for the nt keys of a tile.
template <int NV>
void AddValueTile(const float* v, size_t v_stride, int nt, const float* p, int head_dim, float* acc) {
  constexpr int MD = NV == 3 ? 4 : NV == 2 ? 6 : 8;
  int d = 0;
  for (; d + MD <= head_dim; d += MD) AddValues<MD, NV>(v + d, v_stride, nt, p, acc + d * NV * kLanes);
  AddValuesRest<NV, MD - 1>(v + d, v_stride, nt, head_dim - d, p, acc + d * NV * kLanes);
}

// Online softmax over one scored tile, down each lane: raises m to the
// tile's maximum and rescales l and acc where it grew, then turns the scores
// into p = 2^(s - m) in place and adds them to l.
template <int NV>
void UpdateSoftmax(float* s, int nt, const float* tile_max, bool masked, float* m, float* l, float* acc, int head_dim) {
  constexpr int W = NV * kLanes;
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  // A lane that has seen no key yet keeps m = -inf; its p are all masked to
  // 0, so its exponentials are taken against 0 instead.
  __m256 m_ref[NV], alpha[NV];
  int grew = 0;
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const __m256 m_old = _mm256_loadu_ps(m + v * kLanes);
    const __m256 m_new = _mm256_max_ps(m_old, _mm256_loadu_ps(tile_max + v * kLanes));
    grew |= _mm256_movemask_ps(_mm256_cmp_ps(m_new, m_old, _CMP_GT_OQ));
    m_ref[v] = _mm256_blendv_ps(m_new, _mm256_setzero_ps(), _mm256_cmp_ps(m_new, neg_inf, _CMP_EQ_OQ));
    alpha[v] = _mm256_and_ps(Exp2V(_mm256_sub_ps(m_old, m_ref[v])), _mm256_cmp_ps(m_old, neg_inf, _CMP_NEQ_OQ));
    _mm256_storeu_ps(m + v * kLanes, m_new);
  }
  if (grew) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_ps(l + v * kLanes, _mm256_mul_ps(_mm256_loadu_ps(l + v * kLanes), alpha[v]));
    for (int d = 0; d < head_dim; ++d)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        float* a = acc + d * W + v * kLanes;
        _mm256_storeu_ps(a, _mm256_mul_ps(_mm256_loadu_ps(a), alpha[v]));
      }
  }
  __m256 sum[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) sum[v] = _mm256_setzero_ps();
  for (int j = 0; j < nt; ++j)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __m256 x = _mm256_loadu_ps(s + j * W + v * kLanes);
      __m256 p = Exp2V(_mm256_sub_ps(x, m_ref[v]));
      if (masked) p = _mm256_and_ps(p, _mm256_cmp_ps(x, neg_inf, _CMP_NEQ_OQ));
      _mm256_storeu_ps(s + j * W + v * kLanes, p);
      sum[v] = _mm256_add_ps(sum[v], p);
    }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(l + v * kLanes, _mm256_add_ps(_mm256_loadu_ps(l + v * kLanes), sum[v]));
}

// One tile of keys for one lane block: S = K Q^T, softmax, acc += V^T P.
template <int NV>
void AttendTile(const KvTile& kv, int slot0, const ScoreOut& out, const float* qt, int head_dim, float* m, float* l,
                float* acc) {
  ScoreTile<NV>(kv, qt, head_dim, slot0, out);
  UpdateSoftmax<NV>(out.s, kv.count, out.max, out.last != nullptr, m, l, acc, head_dim);
  AddValueTile<NV>(kv.v, kv.stride, kv.count, out.s, head_dim, acc);
}

// ---- The same kernels on AVX-512 registers (where the CPU has AVX512F).
//
// A lane block of NZ registers of 16 lanes is a block of 2 NZ AVX2 vectors
// in the same layout (W = 16 NZ lanes side by side), and every lane goes
// through the same operations in the same order as above: its scores are
// one FMA chain over d, its acc one FMA chain over the keys, and the
// softmax between them is UpdateSoftmax itself. So the results are the AVX2
// kernels' bit for bit; only twice the lanes go per instruction, and the 32
// registers hold taller tiles (MR keys, MD dims).

#define APE_ATTENTION_AVX512 __attribute__((target("avx512f")))

template <int MR, int NZ>
APE_ATTENTION_AVX512 inline void ScoreKeys512(const float* k, size_t k_stride, const float* qt, int head_dim, int slot,
                                              const ScoreOut& out) {
  constexpr int W = 16 * NZ;
  __m512 acc[MR][NZ];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int z = 0; z < NZ; ++z) acc[i][z] = _mm512_setzero_ps();
  for (int d = 0; d < head_dim; ++d) {
    __m512 qz[NZ];
#pragma GCC unroll 16
    for (int z = 0; z < NZ; ++z) qz[z] = _mm512_loadu_ps(qt + d * W + z * 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 kb = _mm512_set1_ps(k[i * k_stride + d]);
#pragma GCC unroll 16
      for (int z = 0; z < NZ; ++z) acc[i][z] = _mm512_fmadd_ps(kb, qz[z], acc[i][z]);
    }
  }
  const __m512 scale = _mm512_set1_ps(*out.scale);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int z = 0; z < NZ; ++z) {
      __m512 x = _mm512_mul_ps(acc[i][z], scale);
      if (out.last != nullptr) {
        const __m512i last = _mm512_loadu_si512(out.last + z * 16);
        const __mmask16 hidden = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(slot + i), last);
        x = _mm512_mask_mov_ps(x, hidden, _mm512_set1_ps(kNegInf));
      }
      _mm512_storeu_ps(out.s + i * W + z * 16, x);
      float* max = out.max + z * 16;
      // (maskz with every lane: _mm512_max_ps's undefined source trips GCC 12's -Wuninitialized)
      _mm512_storeu_ps(max, _mm512_maskz_max_ps(0xFFFF, _mm512_loadu_ps(max), x));
    }
}

template <int NZ, int MR>
APE_ATTENTION_AVX512 inline void ScoreRest512(const float* k, size_t k_stride, int rest, const float* qt, int head_dim,
                                              int slot, const ScoreOut& out) {
  if constexpr (MR > 0) {
    if (rest == MR) return ScoreKeys512<MR, NZ>(k, k_stride, qt, head_dim, slot, out);
    ScoreRest512<NZ, MR - 1>(k, k_stride, rest, qt, head_dim, slot, out);
  }
}

// Keys (scores) or dims (values) per step for NZ registers of lanes: MR x NZ
// accumulators + NZ operands + a broadcast within the 32 registers.
template <int NZ>
constexpr int kTall512 = NZ == 3 ? 8 : (NZ == 2 ? 12 : 16);

template <int NZ>
APE_ATTENTION_AVX512 void ScoreTile512(const KvTile& kv, const float* qt, int head_dim, int slot0,
                                       const ScoreOut& out) {
  constexpr int MR = kTall512<NZ>;
  std::fill(out.max, out.max + NZ * 16, kNegInf);
  int j = 0;
  for (; j + MR <= kv.count; j += MR) {
    const ScoreOut at{out.s + j * NZ * 16, out.max, out.scale, out.last};
    ScoreKeys512<MR, NZ>(kv.k + j * kv.stride, kv.stride, qt, head_dim, slot0 + j, at);
  }
  const ScoreOut at{out.s + j * NZ * 16, out.max, out.scale, out.last};
  ScoreRest512<NZ, MR - 1>(kv.k + j * kv.stride, kv.stride, kv.count - j, qt, head_dim, slot0 + j, at);
}

template <int MD, int NZ>
APE_ATTENTION_AVX512 inline void AddValues512(const float* v, size_t v_stride, int nt, const float* p, float* acc) {
  constexpr int W = 16 * NZ;
  __m512 a[MD][NZ];
#pragma GCC unroll 16
  for (int i = 0; i < MD; ++i)
#pragma GCC unroll 16
    for (int z = 0; z < NZ; ++z) a[i][z] = _mm512_loadu_ps(acc + i * W + z * 16);
  for (int j = 0; j < nt; ++j) {
    __m512 pz[NZ];
#pragma GCC unroll 16
    for (int z = 0; z < NZ; ++z) pz[z] = _mm512_loadu_ps(p + j * W + z * 16);
#pragma GCC unroll 16
    for (int i = 0; i < MD; ++i) {
      const __m512 vb = _mm512_set1_ps(v[j * v_stride + i]);
#pragma GCC unroll 16
      for (int z = 0; z < NZ; ++z) a[i][z] = _mm512_fmadd_ps(vb, pz[z], a[i][z]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MD; ++i)
#pragma GCC unroll 16
    for (int z = 0; z < NZ; ++z) _mm512_storeu_ps(acc + i * W + z * 16, a[i][z]);
}

template <int NZ, int MD>
APE_ATTENTION_AVX512 inline void AddValuesRest512(const float* v, size_t v_stride, int nt, int rest, const float* p,
                                                  float* acc) {
  if constexpr (MD > 0) {
    if (rest == MD) return AddValues512<MD, NZ>(v, v_stride, nt, p, acc);
    AddValuesRest512<NZ, MD - 1>(v, v_stride, nt, rest, p, acc);
  }
}

template <int NZ>
APE_ATTENTION_AVX512 void AddValueTile512(const float* v, size_t v_stride, int nt, const float* p, int head_dim,
                                          float* acc) {
  constexpr int MD = kTall512<NZ>;
  int d = 0;
  for (; d + MD <= head_dim; d += MD) AddValues512<MD, NZ>(v + d, v_stride, nt, p, acc + d * NZ * 16);
  AddValuesRest512<NZ, MD - 1>(v + d, v_stride, nt, head_dim - d, p, acc + d * NZ * 16);
}

// AttendTile for a lane block of NZ AVX-512 registers (2 NZ vectors).
template <int NZ>
APE_ATTENTION_AVX512 void AttendTile512(const KvTile& kv, int slot0, const ScoreOut& out, const float* qt, int head_dim,
                                        float* m, float* l, float* acc) {
  ScoreTile512<NZ>(kv, qt, head_dim, slot0, out);
  UpdateSoftmax<2 * NZ>(out.s, kv.count, out.max, out.last != nullptr, m, l, acc, head_dim);
  AddValueTile512<NZ>(kv.v, kv.stride, kv.count, out.s, head_dim, acc);
}

#undef APE_ATTENTION_AVX512

// ---- A task: pack the lanes, walk the key tiles, leave the states.

// A worker thread's buffers, grown on first use and kept.
struct Scratch {
  std::vector<float> qt;                                  // [lane block][head_dim][block width]
  std::vector<int32_t> last;                              // [lanes] last visible slot
  std::vector<float> s;                                   // [key_tile][48] scores, then p
  std::array<float, kMaxBlockVectors * kLanes> tile_max;  // [48] per lane
  std::vector<float> states;                              // C and O states when the task finalizes itself
  std::vector<float> kv;                                  // [2][key_tile][heads][head_dim] a K/V tile
  void Reserve(const Plan& p, int vectors) {
    const size_t lanes = static_cast<size_t>(vectors) * kLanes;
    if (qt.size() < lanes * p.head_dim) qt.resize(lanes * p.head_dim);
    if (last.size() < lanes) last.resize(lanes);
    const size_t s_floats = static_cast<size_t>(p.key_tile) * kMaxBlockVectors * kLanes;
    if (s.size() < s_floats) s.resize(s_floats);
    const size_t tile = 2 * static_cast<size_t>(p.key_tile) * p.heads_per_task * p.head_dim;
    if (states.size() < p.state_floats) states.resize(p.state_floats);
    if (kv.size() < tile) kv.resize(tile);
  }
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Qt per lane block (padding lanes are zero) and each lane's last slot.
void PackLanes(const Plan& p, const Task& t, float* qt, int32_t* last) {
  const int hd = p.head_dim;
  ForEachBlock(p, t, [&](int hi, int b0, int w) {
    const int head_first = hi * t.head_vectors * kLanes, width = w * kLanes;
    float* block = qt + static_cast<size_t>(b0) * hd;
    for (int lane = b0; lane < b0 + width; ++lane) {
      const int i = lane - head_first, col = lane - b0;
      last[lane] = p.first_slot + t.r0 + std::min(i, t.head_lanes - 1) / p.group;
      if (i >= t.head_lanes) {
        for (int d = 0; d < hd; ++d) block[d * width + col] = 0.f;
        continue;
      }
      const int row = t.r0 + i / p.group, h = (t.g0 + hi) * p.group + i % p.group;
      const float* qh = p.q + (static_cast<size_t>(row) * p.n_heads + h) * hd;
      for (int d = 0; d < hd; ++d) block[d * width + col] = qh[d];
    }
  });
}

// Calls f(pos, next) for the pieces of [begin, end) cut at every `cuts`
// point inside it, in order.
template <typename F>
void ForEachPiece(int begin, int end, std::initializer_list<int> cuts, const F& f) {
  for (int pos = begin, next = 0; pos < end; pos = next) {
    next = end;
    for (int cut : cuts)
      if (cut > pos && cut < next) next = cut;
    f(pos, next);
  }
}

// Keys [begin, end) of the task into the C and O states. The range is cut
// where C starts and ends and where the causal diagonal starts (after the
// first row's last slot): every piece is all C or all O, and only the
// diagonal pieces are masked.
void AttendKeys(const Plan& p, const Task& t, int begin, int end, Scratch& sc, const LaneStates& c,
                const LaneStates& o) {
  const int hd = p.head_dim, first_row_last = p.first_slot + t.r0;
  ForEachPiece(begin, end, {p.context_begin, p.context_end, first_row_last + 1}, [&](int pos, int next) {
    const bool in_c = pos >= p.context_begin && pos < p.context_end;
    const bool masked = pos > first_row_last;
    const LaneStates& st = in_c ? c : o;
    const float* scale = in_c ? &p.c_scale : &p.o_scale;
    for (int t0 = pos; t0 < next; t0 += p.key_tile) {
      const int nt = std::min(p.key_tile, next - t0);
      const KvTile kv = LoadKvTile(*p.cache, p.layer, t.g0, t.heads, hd, t0, nt, sc.kv.data());
      ForEachBlock(p, t, [&](int hi, int b0, int w) {
        const KvTile head{kv.k + hi * hd, kv.v + hi * hd, kv.stride, kv.count};
        const ScoreOut out{sc.s.data(), sc.tile_max.data(), scale, masked ? sc.last.data() + b0 : nullptr};
        const float* qt = sc.qt.data() + static_cast<size_t>(b0) * hd;
        float* acc = st.acc + static_cast<size_t>(b0) * hd;
        if (p.wide && w % 2 == 0) {
          if (w == 6) AttendTile512<3>(head, t0, out, qt, hd, st.m + b0, st.l + b0, acc);
          if (w == 4) AttendTile512<2>(head, t0, out, qt, hd, st.m + b0, st.l + b0, acc);
          if (w == 2) AttendTile512<1>(head, t0, out, qt, hd, st.m + b0, st.l + b0, acc);
          return;
        }
        if (w == 3) AttendTile<3>(head, t0, out, qt, hd, st.m + b0, st.l + b0, acc);
        if (w == 2) AttendTile<2>(head, t0, out, qt, hd, st.m + b0, st.l + b0, acc);
        if (w == 1) AttendTile<1>(head, t0, out, qt, hd, st.m + b0, st.l + b0, acc);
      });
    }
  });
}

// ---- The end of a row: merge key chunks, then the APE merge.

// Two online-softmax states (m, l, acc) of the same lanes, merged: both are
// rescaled to the larger max, acc_into = acc_into * fi + acc_from * ff (and
// l likewise). False when neither has seen a key (nothing to do).
inline bool MergeFactors(float* m_into, float* l_into, float m_from, float l_from, float* fi, float* ff) {
  const float m = std::max(*m_into, m_from);
  if (m == kNegInf) return false;
  *fi = *m_into == kNegInf ? 0.f : std::exp2(*m_into - m);
  *ff = m_from == kNegInf ? 0.f : std::exp2(m_from - m);
  *m_into = m;
  *l_into = *l_into * *fi + l_from * *ff;
  return true;
}

// out = fc * acc_C + fo * acc_O, as in APE.md, with its two degenerate
// cases; st = S*T, m in base 2.
inline void ApeFactors(float st, float m_c, float l_c, float m_o, float l_o, float* fc, float* fo) {
  if (l_c == 0.f) {  // no context block visible: ordinary attention, out = O_O
    *fc = 0.f;
    *fo = 1.f / l_o;
  } else if (l_o == 0.f) {  // no O keys visible (a row inside C): out = O_C
    *fc = 1.f / l_c;
    *fo = 0.f;
  } else {  // a = S*T * log Z_C, b = log Z_O, weights e^a and e^b
    const float a = st * (kLn2 * m_c + std::log(l_c));
    const float b = kLn2 * m_o + std::log(l_o);
    const float mx = std::max(a, b);
    const float wa = std::exp(a - mx), wb = std::exp(b - mx);
    const float norm = 1.f / (wa + wb);
    *fc = wa * norm / l_c;
    *fo = wb * norm / l_o;
  }
}

// into += from: two softmax states over disjoint keys, taken to the larger max.
void MergeStates(const Plan& p, const Task& t, const LaneStates& into, const LaneStates& from) {
  const int head_dim = p.head_dim;
  ForEachLane(p, t, [&](int lane, int b0, int width, int, int) {
    float fi, ff;
    if (!MergeFactors(&into.m[lane], &into.l[lane], from.m[lane], from.l[lane], &fi, &ff)) return;
    const size_t base = static_cast<size_t>(b0) * head_dim + (lane - b0);
    for (int d = 0; d < head_dim; ++d) {
      const size_t k = base + static_cast<size_t>(d) * width;
      into.acc[k] = into.acc[k] * fi + from.acc[k] * ff;
    }
  });
}

// out = fc * acc_C + fo * acc_O per lane (ApeFactors).
void Finalize(const Plan& p, const Task& t, const LaneStates& c, const LaneStates& o) {
  const int hd = p.head_dim;
  ForEachLane(p, t, [&](int lane, int b0, int width, int row, int h) {
    float fc, fo;
    ApeFactors(p.st, c.m[lane], c.l[lane], o.m[lane], o.l[lane], &fc, &fo);
    float* oh = p.out + (static_cast<size_t>(row) * p.n_heads + h) * hd;
    const size_t base = static_cast<size_t>(b0) * hd + (lane - b0);
    for (int d = 0; d < hd; ++d) {
      const size_t k = base + static_cast<size_t>(d) * width;
      oh[d] = fc * c.acc[k] + fo * o.acc[k];
    }
  });
}

// Split-K, in the calling thread's buffers: every chunk leaves its states in
// `states` (task i at i * state_floats), and `done` counts the finished
// chunks of each (KV heads, row tile); the chunk that finishes last merges.
struct SplitK {
  float* states;
  std::atomic<int>* done;
};

inline void TaskStates(const Plan& p, const Task& t, float* base, LaneStates* c, LaneStates* o) {
  *c = StatesAt(base, t.vectors);
  *o = StatesAt(base + StateFloats(t.vectors, p.head_dim), t.vectors);
}

// Chunk 0 of the (KV heads, row tile) whose first task is `first` takes in
// the other chunks, then its rows are finalized.
void MergeChunks(const Plan& p, int64_t first, float* states) {
  const Task t = TaskAt(p, first);
  LaneStates c, o;
  TaskStates(p, t, states + first * p.state_floats, &c, &o);
  for (int k = 1; k < p.chunks; ++k) {
    LaneStates ck, ok;
    TaskStates(p, t, states + (first + k) * p.state_floats, &ck, &ok);
    MergeStates(p, t, c, ck);
    MergeStates(p, t, o, ok);
  }
  Finalize(p, t, c, o);
}

// Task i: its keys into fresh C and O states, then the rows' outputs (or,
// split, the states for the last chunk to merge).
void RunTask(const Plan& p, int64_t i, const SplitK* split) {
  const Task t = TaskAt(p, i);
  Scratch& sc = ThreadScratch();
  sc.Reserve(p, t.vectors);
  LaneStates c, o;
  TaskStates(p, t, split != nullptr ? split->states + i * p.state_floats : sc.states.data(), &c, &o);
  ResetStates(c, t.vectors, p.head_dim);
  ResetStates(o, t.vectors, p.head_dim);
  PackLanes(p, t, sc.qt.data(), sc.last.data());
  // The task's rows see slots [0, keys); chunk `t.chunk` of them.
  const int keys = p.first_slot + t.r0 + t.rows, per = CeilDiv(keys, p.chunks);
  const int begin = std::min(keys, t.chunk * per), end = std::min(keys, begin + per);
  AttendKeys(p, t, begin, end, sc, c, o);
  if (split == nullptr) {
    Finalize(p, t, c, o);
    return;
  }
  // Release our states to, or acquire the others' as, the last chunk.
  if (split->done[i / p.chunks].fetch_add(1, std::memory_order_acq_rel) == p.chunks - 1)
    MergeChunks(p, i - t.chunk, split->states);
}

// ======================= Decode: one row over many keys =======================
//
// A decode row (n = 1) has only `group` query heads per KV head: 7 lanes of
// the matrix-product kernels' 8, one broadcast load per FMA, and their
// float16 tiles converted into a float32 scratch tile first. This path
// vectorizes along head_dim instead: every 8 elements of a K or V row are
// one vector, converted from float16 in the register the FMAs use (F16C),
// and serve several query heads of the group at once.
//
//   scores  s[h][j] = q_h . k_j: 3 keys x 4 heads of accumulators over
//           head_dim, then a horizontal-add tree per 2 keys x 2 heads. q is
//           pre-scaled by the block's logit scale (base 2): s comes out
//           scaled.
//   softmax per head along its row of the tile, online (m, l, acc).
//   values  acc[h][d] += sum_j p[h][j] v_j[d]: 4 heads x 16 dims of
//           accumulators in registers over the tile's keys.
//
// Keys go in tiles of consecutive slots, counted from the start of each
// block piece of a key chunk (never from segment boundaries), read in place
// by runs of slots inside one segment (kv_cache.h). The memory reads overlap
// the arithmetic: while a tile is scored and summed, software prefetches of
// the next tile's rows (all KV heads, every cache line) go out a few at a
// time, paced by the FMAs done (TilePrefetch); only the first tile of a
// piece is loaded up front (TouchTile). The arithmetic per key does not
// depend on the runs, so a float16 cache and a float32 cache holding the
// same values give bit-identical outputs.
//
// A chunk of keys per task, all KV heads in it (whole cache rows read once);
// the caller merges the chunks' states and applies the APE merge.

constexpr int kDecodeMaxTile = 128;                        // keys per tile at most
constexpr int kDecodeRowStride = kDecodeMaxTile + kLanes;  // s row, padded to whole vectors
constexpr int kHeadBlock = 4;                              // query heads in registers at once

inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 Load8(const int8_t* p) { return Int8x8(reinterpret_cast<const uint8_t*>(p)); }

// An int8 key's scale multiplies its scores, an int8 value's scale its
// converted vector (kv_cache.h's row layout); the float types have none.
template <typename E>
constexpr bool kScaled = std::is_same_v<E, int8_t>;

// A run of tile slots inside one segment: K/V rows of KV head 0 at k, v.
struct DecodeRun {
  const uint8_t* k;
  const uint8_t* v;
  size_t stride;     // bytes between slots
  size_t row_bytes;  // bytes of a row, all KV heads (int8: with the scales)
  int first;         // index of its first key in the tile
  int count;
  KvElement element;
};

// Prefetches of a tile's K and V rows, all KV heads, every 64-byte line,
// spread evenly over the arithmetic of the tile before it. Pace(work), after
// each kernel call, issues both rows of every slot due for the work done so
// far (slots * done / total, Bresenham-style); work counts FMA steps of
// (key, query head, 8 dims), one per score and one per value sum. Loaded
// before the arithmetic (TouchTile, the kernel's former way for every tile)
// or prefetched all at once, the reads wait on memory while the FMA units
// idle; spread out, they stream under the FMAs (bench_attention (b16): 15-25%
// less time). Called only between the register-blocked kernels, never inside
// them (a call there would spill their accumulators). Hint T0: T1 and NTA
// measured the same, front-loading the prefetches (done at half the tile) no
// better.
class TilePrefetch {
 public:
  // `slots` slots in `runs` (0: nothing to prefetch), over `total` work.
  void Start(const DecodeRun* runs, int slots, int64_t total) {
    runs_ = runs;
    slots_ = slots;
    total_ = std::max<int64_t>(1, total);
    done_ = issued_ = 0;
    run_ = slot_ = 0;
  }
  void Pace(int64_t work) {
    done_ += work;
    while (issued_ * total_ < done_ * slots_ && issued_ < slots_) Slot();
  }

 private:
  // Both rows of the next slot.
  void Slot() {
    const DecodeRun& r = runs_[run_];
    const size_t rb = r.row_bytes;
    const char* k = reinterpret_cast<const char*>(r.k + slot_ * r.stride);
    const char* v = reinterpret_cast<const char*>(r.v + slot_ * r.stride);
    for (size_t i = 0; i < rb; i += 64) {
      _mm_prefetch(k + i, _MM_HINT_T0);
      _mm_prefetch(v + i, _MM_HINT_T0);
    }
    _mm_prefetch(k + rb - 1, _MM_HINT_T0);  // a row ending in a line of its own
    _mm_prefetch(v + rb - 1, _MM_HINT_T0);
    ++issued_;
    if (++slot_ == r.count) slot_ = 0, ++run_;
  }

  const DecodeRun* runs_ = nullptr;
  int slots_ = 0, run_ = 0, slot_ = 0;  // the next slot: slot_ of runs_[run_]
  int64_t total_ = 1, done_ = 0, issued_ = 0;
};

// s[h * kDecodeRowStride + i] = q_h . k_i for KB keys (rows[i]) and HB heads
// (q_h at q + h * hd): KB x HB accumulators over head_dim, each K vector
// converted once for the HB heads, each q vector loaded once for the KB
// keys. Then one horizontal-add tree per 2 keys x 2 heads; every dot goes
// through the same adds whichever keys and heads share its tree (so
// results do not depend on how runs group the keys). KB odd: the last key
// is paired with itself, and its partner's column lands one key further
// (overwritten by that key, or padding). int8 keys: the dots are of the
// unscaled values, each key's scale (scales[i]) multiplies its results.
template <typename E, int KB, int HB>
__attribute__((always_inline)) inline void ScoreKeys(const E* const* rows, const float* scales, const float* q, int hd,
                                                     float* s) {
  __m256 a[KB][HB];
#pragma GCC unroll 16
  for (int i = 0; i < KB; ++i)
#pragma GCC unroll 16
    for (int h = 0; h < HB; ++h) a[i][h] = _mm256_setzero_ps();
  for (int d = 0; d < hd; d += kLanes) {
    __m256 x[KB];
#pragma GCC unroll 16
    for (int i = 0; i < KB; ++i) x[i] = Load8(rows[i] + d);
#pragma GCC unroll 16
    for (int h = 0; h < HB; ++h) {
      const __m256 qv = _mm256_loadu_ps(q + h * hd + d);
#pragma GCC unroll 16
      for (int i = 0; i < KB; ++i) a[i][h] = _mm256_fmadd_ps(x[i], qv, a[i][h]);
    }
  }
  // hadd(key i, key i+1) = pairwise sums of both; again with the next
  // head's; the two 128-bit halves added: [k_i.q_h, k_i+1.q_h, k_i.q_h+1, k_i+1.q_h+1].
#pragma GCC unroll 16
  for (int i = 0; i < KB; i += 2) {
    const int i1 = i + 1 < KB ? i + 1 : i;
#pragma GCC unroll 16
    for (int h = 0; h < HB; h += 2) {
      const __m256 t0 = _mm256_hadd_ps(a[i][h], a[i1][h]);
      const __m256 t1 = h + 1 < HB ? _mm256_hadd_ps(a[i][h + 1], a[i1][h + 1]) : t0;
      const __m256 u = _mm256_hadd_ps(t0, t1);
      __m128 r = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
      if constexpr (kScaled<E>) r = _mm_mul_ps(r, _mm_setr_ps(scales[i], scales[i1], scales[i], scales[i1]));
      _mm_storel_pi(reinterpret_cast<__m64*>(s + h * kDecodeRowStride + i), r);
      if (h + 1 < HB) _mm_storeh_pi(reinterpret_cast<__m64*>(s + (h + 1) * kDecodeRowStride + i), r);
    }
  }
}

// Scores of a run's keys for HB heads, into s[h][run.first + j]; the KV
// head's values start head_off elements into a row, kv_dim elements are the
// row's values (before an int8 row's scales).
template <typename E, int HB>
void ScoreRun(const DecodeRun& r, size_t head_off, int kv_dim, const float* q, int hd, float* s, TilePrefetch* pf) {
  constexpr int KB = 3;  // 3 x 4 accumulators, 3 K vectors and a q vector: 16 registers
  const int head = static_cast<int>(head_off) / hd;
  const auto row = [&](int j) { return reinterpret_cast<const E*>(r.k + j * r.stride) + head_off; };
  const auto scale = [&](int j) { return kScaled<E> ? Int8Scale(r.k + j * r.stride, kv_dim, head) : 1.f; };
  int j = 0;
  for (; j + KB <= r.count; j += KB) {
    const E* rows[KB];
    float scales[KB];
    for (int i = 0; i < KB; ++i) rows[i] = row(j + i), scales[i] = scale(j + i);
    ScoreKeys<E, KB, HB>(rows, scales, q, hd, s + r.first + j);
    pf->Pace(KB * HB * (hd / kLanes));
  }
  if (r.count - j == 2) {
    const E* rows[2] = {row(j), row(j + 1)};
    const float scales[2] = {scale(j), scale(j + 1)};
    ScoreKeys<E, 2, HB>(rows, scales, q, hd, s + r.first + j);
  } else if (r.count - j == 1) {
    const E* rows[1] = {row(j)};
    const float scales[1] = {scale(j)};
    ScoreKeys<E, 1, HB>(rows, scales, q, hd, s + r.first + j);
  }
  pf->Pace((r.count - j) * HB * (hd / kLanes));
}

// acc[h][d..] += sum_j p[h][run.first + j] v_j[d..] for HB heads and DV
// vectors of dims from d, the HB x DV accumulators in registers over the run.
// int8 values: each converted vector times its row's scale.
template <typename E, int HB, int DV>
__attribute__((always_inline)) inline void AddValuesDims(const DecodeRun& r, size_t head_off, int kv_dim,
                                                         const float* pr, int hd, int d, float* acc) {
  const int head = static_cast<int>(head_off) / hd;
  __m256 a[HB][DV];
#pragma GCC unroll 16
  for (int h = 0; h < HB; ++h)
#pragma GCC unroll 16
    for (int u = 0; u < DV; ++u) a[h][u] = _mm256_loadu_ps(acc + h * hd + d + u * kLanes);
  const uint8_t* v = r.v;
  for (int j = 0; j < r.count; ++j, v += r.stride) {
    const E* row = reinterpret_cast<const E*>(v) + head_off + d;
    __m256 x[DV];
#pragma GCC unroll 16
    for (int u = 0; u < DV; ++u) x[u] = Load8(row + u * kLanes);
    if constexpr (kScaled<E>) {
      const __m256 sc = _mm256_set1_ps(Int8Scale(v, kv_dim, head));
#pragma GCC unroll 16
      for (int u = 0; u < DV; ++u) x[u] = _mm256_mul_ps(x[u], sc);
    }
#pragma GCC unroll 16
    for (int h = 0; h < HB; ++h) {
      const __m256 pv = _mm256_broadcast_ss(pr + h * kDecodeRowStride + j);
#pragma GCC unroll 16
      for (int u = 0; u < DV; ++u) a[h][u] = _mm256_fmadd_ps(pv, x[u], a[h][u]);
    }
  }
#pragma GCC unroll 16
  for (int h = 0; h < HB; ++h)
#pragma GCC unroll 16
    for (int u = 0; u < DV; ++u) _mm256_storeu_ps(acc + h * hd + d + u * kLanes, a[h][u]);
}

template <typename E, int HB>
void AddValuesRun(const DecodeRun& r, size_t head_off, int kv_dim, const float* p, int hd, float* acc,
                  TilePrefetch* pf) {
  constexpr int DV = HB <= 2 ? 4 : 2;  // HB x DV accumulators, DV V vectors and p: at most 13 registers
  const float* pr = p + r.first;
  int d = 0;
  for (; d + DV * kLanes <= hd; d += DV * kLanes) {
    AddValuesDims<E, HB, DV>(r, head_off, kv_dim, pr, hd, d, acc);
    pf->Pace(r.count * HB * DV);
  }
  for (; d < hd; d += kLanes) {
    AddValuesDims<E, HB, 1>(r, head_off, kv_dim, pr, hd, d, acc);
    pf->Pace(r.count * HB);
  }
}

// Dispatch on the element type (f(run, element) for each run, element a
// value of the run's type) and on the head block (1..kHeadBlock).
template <typename F>
void ForEachTypedRun(const DecodeRun* runs, int n_runs, const F& f) {
  for (int i = 0; i < n_runs; ++i) {
    switch (runs[i].element) {
      case KvElement::kFloat16: f(runs[i], uint16_t{}); break;
      case KvElement::kInt8: f(runs[i], int8_t{}); break;
      case KvElement::kFloat32: f(runs[i], float{}); break;
    }
  }
}

template <typename F>
void WithHeadBlock(int hb, const F& f) {
  switch (hb) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// Online softmax over one head's row of a tile: s[0, nt) scores (padding to
// whole vectors is -inf), in place to p = 2^(s - m); m, l, acc[hd] updated.
void DecodeSoftmax(float* s, int nt, float* m, float* l, float* acc, int hd) {
  const int nv = CeilDiv(nt, kLanes);
  __m256 mx = _mm256_set1_ps(kNegInf);
  for (int i = 0; i < nv; ++i) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + i * kLanes));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float m_new = std::max(*m, _mm_cvtss_f32(h));  // finite: nt >= 1
  if (m_new > *m) {
    const float alpha = *m == kNegInf ? 0.f : std::exp2(*m - m_new);
    *l *= alpha;
    const __m256 av = _mm256_set1_ps(alpha);
    for (int d = 0; d < hd; d += kLanes) _mm256_storeu_ps(acc + d, _mm256_mul_ps(_mm256_loadu_ps(acc + d), av));
    *m = m_new;
  }
  const __m256 mv = _mm256_set1_ps(m_new), neg_inf = _mm256_set1_ps(kNegInf);
  __m256 sum = _mm256_setzero_ps();
  for (int i = 0; i < nv; ++i) {
    const __m256 x = _mm256_loadu_ps(s + i * kLanes);
    const __m256 p = _mm256_and_ps(Exp2V(_mm256_sub_ps(x, mv)), _mm256_cmp_ps(x, neg_inf, _CMP_NEQ_OQ));
    _mm256_storeu_ps(s + i * kLanes, p);
    sum = _mm256_add_ps(sum, p);
  }
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  t = _mm_add_ss(t, _mm_movehdup_ps(t));
  *l += _mm_cvtss_f32(t);
}

struct DecodePlan {
  const KvCache* cache;
  int layer, n_heads, n_kv_heads, head_dim, group;
  int keys;                        // the row sees slots [0, keys)
  int context_begin, context_end;  // block C, clipped to [0, keys)
  int tile, chunks;
  const float* q_scaled;  // [2][n_heads][head_dim]: q times the C, then the O logit scale (base 2)
  size_t state_floats;    // per chunk: [2 blocks][n_heads] m, l, then acc[2][n_heads][head_dim]
};

// A chunk's states: block b (0 = C, 1 = O), head h.
struct DecodeStates {
  float* m;    // [2][n_heads]
  float* l;    // [2][n_heads]
  float* acc;  // [2][n_heads][head_dim]
};

inline DecodeStates DecodeStatesAt(const DecodePlan& p, float* base) {
  const int h2 = 2 * p.n_heads;
  return {base, base + h2, base + 2 * h2};
}

// The runs of slots [t0, t0 + nt), each inside one segment.
int TileRuns(const DecodePlan& p, int t0, int nt, DecodeRun* runs) {
  int n = 0;
  const size_t row_bytes[3] = {KvRowBytes(KvElement::kFloat32, p.n_kv_heads, p.head_dim),
                               KvRowBytes(KvElement::kFloat16, p.n_kv_heads, p.head_dim),
                               KvRowBytes(KvElement::kInt8, p.n_kv_heads, p.head_dim)};
  p.cache->ForEachRun(t0, nt, [&](const KvSegment& seg, int first, int count) {
    runs[n++] = {seg.key_row(p.layer, first),
                 seg.value_row(p.layer, first),
                 seg.row_stride,
                 row_bytes[static_cast<int>(seg.element)],
                 first - t0,
                 count,
                 seg.element};
  });
  return n;
}

// One load from every 64-byte line of the runs' K and V rows, all KV heads:
// for the first tile of a piece, which no earlier tile prefetched. A
// sequential pass of independent loads, which the hardware streams from
// memory at full rate, leaving the tile in L1/L2 for the kernels' strided
// passes (one KV head and 8 or 16 dims at a time: left to those, the rows
// come from memory at a fraction of the bandwidth). One byte a line, and the
// row's last byte for a row that ends in a line of its own.
void TouchTile(const DecodeRun* runs, int n_runs) {
  unsigned sink = 0;
  for (int r = 0; r < n_runs; ++r) {
    const size_t rb = runs[r].row_bytes;
    for (int j = 0; j < runs[r].count; ++j) {
      const uint8_t* kj = runs[r].k + j * runs[r].stride;
      const uint8_t* vj = runs[r].v + j * runs[r].stride;
      for (size_t i = 0; i < rb; i += 64) sink |= kj[i] | vj[i];
      sink |= kj[rb - 1] | vj[rb - 1];
    }
  }
  asm volatile("" : : "r"(sink));  // keep the loads
}

// Keys [begin, end) of one block into its states (block b: 0 = C, 1 = O).
void DecodeKeys(const DecodePlan& p, int begin, int end, int b, const DecodeStates& st) {
  const int hd = p.head_dim, G = p.group;
  thread_local std::vector<float> s_buf;
  const size_t s_size = static_cast<size_t>(G) * kDecodeRowStride;
  if (s_buf.size() < s_size) s_buf.resize(s_size);
  float* s = s_buf.data();
  const int kv_dim = p.n_kv_heads * hd;  // a row's values (an int8 row's scales follow them)
  // This tile's runs and the next one's, swapped at each step.
  DecodeRun run_buf[2][kDecodeMaxTile];
  DecodeRun* runs = run_buf[0];
  DecodeRun* next = run_buf[1];
  int n_runs = TileRuns(p, begin, std::min(p.tile, end - begin), runs);
  TouchTile(runs, n_runs);
  TilePrefetch pf;
  for (int t0 = begin; t0 < end; t0 += p.tile) {
    const int nt = std::min(p.tile, end - t0), padded = CeilDiv(nt, kLanes) * kLanes;
    // The next tile's rows go out while this one's scores and values are
    // computed: 2 (score, values) x n_heads x nt x hd / 8 work steps.
    const int t1 = t0 + p.tile, nt1 = std::min(p.tile, end - t1);
    const int n_next = nt1 > 0 ? TileRuns(p, t1, nt1, next) : 0;
    pf.Start(next, std::max(0, nt1), int64_t{2} * p.n_heads * nt * (hd / kLanes));
    for (int g = 0; g < p.n_kv_heads; ++g) {
      const size_t head_off = static_cast<size_t>(g) * hd;  // elements into a row
      for (int h0 = 0; h0 < G; h0 += kHeadBlock) {
        const int hb = std::min(kHeadBlock, G - h0);
        const float* q = p.q_scaled + (static_cast<size_t>(b) * p.n_heads + g * G + h0) * hd;
        float* sh = s + h0 * kDecodeRowStride;
        WithHeadBlock(hb, [&](auto HB) {
          ForEachTypedRun(runs, n_runs, [&](const DecodeRun& r, auto e) {
            ScoreRun<decltype(e), HB()>(r, head_off, kv_dim, q, hd, sh, &pf);
          });
        });
      }
      // -inf after the tile's last key, for the softmax's whole vectors (the
      // lone-key column of a tile's last key lands at s[nt]; the previous KV
      // head left p = 0 there).
      for (int h = 0; h < G; ++h) std::fill(s + h * kDecodeRowStride + nt, s + h * kDecodeRowStride + padded, kNegInf);
      for (int h = 0; h < G; ++h) {
        const int qh = b * p.n_heads + g * G + h;
        DecodeSoftmax(s + h * kDecodeRowStride, nt, st.m + qh, st.l + qh, st.acc + static_cast<size_t>(qh) * hd, hd);
      }
      for (int h0 = 0; h0 < G; h0 += kHeadBlock) {
        const int hb = std::min(kHeadBlock, G - h0);
        float* acc = st.acc + (static_cast<size_t>(b) * p.n_heads + g * G + h0) * hd;
        WithHeadBlock(hb, [&](auto HB) {
          ForEachTypedRun(runs, n_runs, [&](const DecodeRun& r, auto e) {
            AddValuesRun<decltype(e), HB()>(r, head_off, kv_dim, s + h0 * kDecodeRowStride, hd, acc, &pf);
          });
        });
      }
    }
    std::swap(runs, next);
    n_runs = n_next;
  }
}

// Chunk `c` of the keys into its states, reset first.
void DecodeChunk(const DecodePlan& p, int c, float* base) {
  const DecodeStates st = DecodeStatesAt(p, base);
  const int h2 = 2 * p.n_heads;
  std::fill(st.m, st.m + h2, kNegInf);
  std::fill(st.l, st.l + h2, 0.f);
  std::fill(st.acc, st.acc + static_cast<size_t>(h2) * p.head_dim, 0.f);
  const int per = CeilDiv(p.keys, p.chunks);
  const int begin = std::min(p.keys, c * per), end = std::min(p.keys, begin + per);
  // Pieces that are all C or all O.
  ForEachPiece(begin, end, {p.context_begin, p.context_end}, [&](int pos, int next) {
    const bool in_c = pos >= p.context_begin && pos < p.context_end;
    DecodeKeys(p, pos, next, in_c ? 0 : 1, st);
  });
}

void DecodeAttention(const float* q, int first_slot, const KvCache& cache, int layer, int n_heads, int n_kv_heads,
                     int head_dim, const ApeParams& ape, float* out, const ApeKernelOptions& opt) {
  DecodePlan p{};
  p.cache = &cache;
  p.layer = layer;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv_heads;
  p.head_dim = head_dim;
  p.group = n_heads / n_kv_heads;
  p.keys = first_slot + 1;
  p.context_begin = std::min(ape.context_begin, p.keys);
  p.context_end = std::min(ape.context_end, p.keys);
  // key_tile counts keys x KV heads, as in the matrix-product path.
  p.tile = std::clamp(opt.key_tile / std::max(1, n_kv_heads), 1, kDecodeMaxTile);
  const int wanted = 4 * ComputeThreads();
  p.chunks = std::clamp(wanted, 1, std::max(1, p.keys / std::max(1, opt.min_chunk_keys)));
  const size_t q_floats = static_cast<size_t>(n_heads) * head_dim;
  p.state_floats = 2 * static_cast<size_t>(n_heads) * (2 + head_dim);

  // The caller's buffers: scaled q, then every chunk's states.
  thread_local std::vector<float> buf;
  const size_t need = 2 * q_floats + p.chunks * p.state_floats;
  if (buf.size() < need) buf.resize(need);
  const float o_scale = kLog2E / std::sqrt(static_cast<float>(head_dim));
  const float c_scale = o_scale / ape.temperature;
  for (size_t i = 0; i < q_floats; ++i) {
    buf[i] = q[i] * c_scale;
    buf[q_floats + i] = q[i] * o_scale;
  }
  p.q_scaled = buf.data();
  float* states = buf.data() + 2 * q_floats;
  ParallelFor(p.chunks, /*dynamic=*/true,
              [&](int64_t c) { DecodeChunk(p, static_cast<int>(c), states + c * p.state_floats); });

  // Chunk 0 takes in the others, block by block and head by head.
  const int hd = head_dim;
  const DecodeStates into = DecodeStatesAt(p, states);
  for (int c = 1; c < p.chunks; ++c) {
    const DecodeStates from = DecodeStatesAt(p, states + c * p.state_floats);
    for (int i = 0; i < 2 * n_heads; ++i) {
      float fi, ff;
      if (!MergeFactors(&into.m[i], &into.l[i], from.m[i], from.l[i], &fi, &ff)) continue;
      float* a = into.acc + static_cast<size_t>(i) * hd;
      const float* f = from.acc + static_cast<size_t>(i) * hd;
      for (int d = 0; d < hd; ++d) a[d] = a[d] * fi + f[d] * ff;
    }
  }
  // The APE merge per head (ApeFactors, as Finalize).
  const float st = ape.scale * ape.temperature;
  for (int h = 0; h < n_heads; ++h) {
    const int ci = h, oi = n_heads + h;
    float fc, fo;
    ApeFactors(st, into.m[ci], into.l[ci], into.m[oi], into.l[oi], &fc, &fo);
    const float* ac = into.acc + static_cast<size_t>(ci) * hd;
    const float* ao = into.acc + static_cast<size_t>(oi) * hd;
    for (int d = 0; d < hd; ++d) out[static_cast<size_t>(h) * hd + d] = fc * ac[d] + fo * ao[d];
  }
}

}  // namespace

bool CpuHasAvx512() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return has;
}

void ApeAttention(const float* q, int n, int first_slot, const KvCache& cache, int layer, int n_heads, int n_kv_heads,
                  int head_dim, const ApeParams& ape, float* out, const ApeKernelOptions& options) {
  if (n <= 0) return;
  if (n == 1 && options.decode_kernel && head_dim % kLanes == 0 && n_heads % n_kv_heads == 0)
    return DecodeAttention(q, first_slot, cache, layer, n_heads, n_kv_heads, head_dim, ape, out, options);
  const Plan p = MakePlan(q, n, first_slot, cache, layer, n_heads, n_kv_heads, head_dim, ape, out, options);
  if (p.chunks == 1) {
    ParallelFor(p.tasks, /*dynamic=*/true, [&](int64_t i) { RunTask(p, i, nullptr); });
    return;
  }
  // Split-K: the chunks' states and counters, kept by the calling thread.
  thread_local std::vector<float> states;
  thread_local std::unique_ptr<std::atomic<int>[]> done;
  thread_local int64_t done_size = 0;
  const int64_t rows_tasks = p.tasks / p.chunks;
  if (states.size() < p.tasks * p.state_floats) states.resize(p.tasks * p.state_floats);
  if (done_size < rows_tasks) done.reset(new std::atomic<int>[done_size = rows_tasks]);
  for (int64_t i = 0; i < rows_tasks; ++i) done[i].store(0, std::memory_order_relaxed);
  const SplitK split{states.data(), done.get()};
  ParallelFor(p.tasks, /*dynamic=*/true, [&](int64_t i) { RunTask(p, i, &split); });
}

void ApeAttention(const float* q, int n, int first_slot, const KvCache& cache, int layer, int n_heads, int n_kv_heads,
                  int head_dim, const ApeParams& ape, float* out) {
  ApeAttention(q, n, first_slot, cache, layer, n_heads, n_kv_heads, head_dim, ape, out, ApeKernelOptions{});
}

}  // namespace ape
