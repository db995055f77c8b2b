// y = W x for a weight matrix in its stored type: the hot spot of decode
// (one token, or a batch of a few streams' tokens: bound by reading the
// weights once) and prefill (many tokens: bound by arithmetic).
//
//   up to kDecodeBatchMax tokens, every type
//                       DotRowsBatch (quant.h): bands of rows split across
//                       the compute threads, every band running all tokens,
//                       so the weights are read from memory once per call;
//                       each output element is computed by the same
//                       operations in the same order whatever the number of
//                       tokens, so row t of y is bit-identical for any n <=
//                       kDecodeBatchMax (a stream decoded in a batch gets
//                       what it gets alone). Float weights take float32
//                       activations; Q8_0/Q4_0 take Q8_0 blocks and
//                       Q4_K/Q6_K Q8_K blocks, with integer dot products:
//                       what llama.cpp computes, so greedy ids agree with it
//                       even where the margins are small
//                       (tests/common/engine/families_test).
//   more tokens (prefill)
//     F16               FloatGemm (quant.h): tiles of 4 rows x 3 tokens
//                       that convert the weights in registers, on bands of
//                       rows split across the compute threads: 1.2-1.3x
//                       OpenBLAS on float32-converted bands at 256 tokens,
//                       1.6-3.5x at 17-64 (bench_kernels' float prefill
//                       table, bench/results/engine.md).
//     F32, BF16         the same up to kFloatGemmMaxTokens (F32 1.0-1.4x
//                       OpenBLAS at 17-48 tokens, BF16 1.05-1.8x: at a few
//                       tokens OpenBLAS spends as long packing the weights
//                       as multiplying); above, OpenBLAS sgemm (one thread)
//                       on bands of rows, BF16 ones converted to float32
//                       first, as fast or a little faster there (FloatGemm
//                       ran at 0.90-1.06x its speed at 256 tokens). Unless
//                       OpenBLAS runs generic kernels on this CPU
//                       (BlasHasCpuKernels): then FloatGemm at every size.
//     Q8_0 ... Q6_K     DotRowsBatch, as for a few tokens: integer dot
//                       products (see bench/results/engine.md for why not
//                       dequantize + sgemm).
#ifndef APESERVE_COMMON_ENGINE_MATVEC_H_
#define APESERVE_COMMON_ENGINE_MATVEC_H_

#include "common/engine/weight_matrix.h"

namespace ape {

// Largest token count of a decode batch: MatMul's rows are independent of
// n up to here.
constexpr int kDecodeBatchMax = 16;

// Largest token count for which F32 and BF16 weights take FloatGemm, not
// OpenBLAS.
constexpr int kFloatGemmMaxTokens = 48;

// Whether OpenBLAS picked kernels written for this CPU's vector units. It
// picks by CPU model when it loads, and takes a model newer than itself for
// an old one: Debian's 0.3.21 runs an Emerald Rapids Xeon (AVX-512) on its
// Prescott (SSE3) kernels, at a third of FloatGemm's speed (measured:
// bench/results/engine.md). Known AVX2/AVX-512 cores: Haswell, Zen,
// SkylakeX, Cooperlake, SapphireRapids.
bool BlasHasCpuKernels();

// y[t][o] = sum_i x[t][i] W[o][i] for t < n, o < w.rows, i < w.cols; rows of
// y are `ldy` floats apart.
void MatMul(const float* x, int n, const WeightMatrix& w, float* y, int ldy);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_MATVEC_H_
