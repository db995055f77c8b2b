// Adaptive Parallel Encoding attention (docs/APE.md, "The attention").
#ifndef APESERVE_COMMON_ENGINE_APE_ATTENTION_H_
#define APESERVE_COMMON_ENGINE_APE_ATTENTION_H_

#include <limits>

#include "common/engine/kv_cache.h"

namespace ape {

// Which cache slots form the pooled context block C, and APE's T and S.
// An empty range (begin == end) is ordinary causal attention; T = S = 1 is
// plain parallel encoding over the range.
struct ApeParams {
  int context_begin = 0;    // first slot of block C
  int context_end = 0;      // one past the last slot of block C
  float temperature = 1.f;  // T: divides context logits only
  float scale = 1.f;        // S: the context LSE is multiplied by S*T
};

// Multi-head APE attention for `n` query rows at slots first_slot..+n-1 of
// `cache` (their K/V already written and rotated). q and out are
// [n][n_heads][head_dim]. Row i sees slots [0, first_slot + i]: slots in the
// context range form block C, the rest (prefix, query, generated) block O.
// Computed as matrix products: the rows and query heads of one KV head are
// stacked, keys go by tiles. Runs on ComputeThreads() threads over (KV heads,
// row tile, key chunk) tasks; a decode row splits its keys into chunks. A
// single row (n = 1, head_dim a multiple of 8) takes a kernel of its own,
// vectorized along head_dim, reading float16 K/V in place.
void ApeAttention(const float* q, int n, int first_slot, const KvCache& cache, int layer, int n_heads, int n_kv_heads,
                  int head_dim, const ApeParams& ape, float* out);

// How ApeAttention blocks the work. The defaults suit head_dim 64-128 with
// AVX2; tests pass small values to reach every path on small caches.
struct ApeKernelOptions {
  int key_tile = 128;        // keys per tile (shared out among a decode task's KV heads)
  int target_lanes = 224;    // (query row, head) pairs per task, rounded to whole rows
  int min_chunk_keys = 512;  // split-K: a key chunk is never smaller than this
  // A single row (decode) through the kernel vectorized along head_dim
  // (ape_attention.cc, "Decode"); false sends it through the matrix-product
  // kernels like a block of rows (for comparison in tests and benchmarks).
  bool decode_kernel = true;
  // Lane blocks in AVX-512 registers where the CPU has AVX512F (16 lanes per
  // instruction; results bit-identical to AVX2's); false keeps AVX2.
  bool avx512 = true;
};

// Whether this CPU runs the AVX-512 lane blocks (ApeKernelOptions::avx512).
bool CpuHasAvx512();

// ApeAttention with explicit blocking (same result up to rounding).
void ApeAttention(const float* q, int n, int first_slot, const KvCache& cache, int layer, int n_heads, int n_kv_heads,
                  int head_dim, const ApeParams& ape, float* out, const ApeKernelOptions& options);

// ---- Reference kernel: one (row, head) at a time, for tests and benchmarks.

// Running softmax state over a set of keys, flash-attention style:
//   m = max_j s_j,  l = sum_j exp(s_j - m),  acc = sum_j exp(s_j - m) v_j
// so that log Z = m + log l and the normalised output is acc / l.
struct AttentionState {
  float m = -std::numeric_limits<float>::infinity();
  float l = 0.f;
  float acc[kMaxHeadDim];  // head_dim <= kMaxHeadDim: model loading refuses more
};

// Adds keys/values of slots [begin, end) to `st`, with logits
// s_j = (q . k_j) * logit_scale. `kv_head_offset` selects the KV head.
void AccumulateBlock(const float* q, const KvCache& cache, int layer, int kv_head_offset, int head_dim, int begin,
                     int end, float logit_scale, AttentionState* st);

// Same contract as ApeAttention, one task per (row, head), keys one at a
// time: the plain form of APE.md section 3 that ApeAttention is tested against.
void ApeAttentionReference(const float* q, int n, int first_slot, const KvCache& cache, int layer, int n_heads,
                           int n_kv_heads, int head_dim, const ApeParams& ape, float* out);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_APE_ATTENTION_H_
