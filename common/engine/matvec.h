// y = W x for a weight matrix in its stored type: the hot spot of decode
// (one token: bound by reading the weights once) and prefill (many tokens:
// bound by arithmetic).
//
//   F32, one token      MatVec below: four rows at a time, AVX2 FMA. (OpenBLAS
//                       0.3.21's sgemv reached about a quarter of this
//                       machine's read bandwidth.)
//   F32, many tokens    OpenBLAS sgemm.
//   F16, BF16           DotRows (quant.h) against float32 activations for a
//                       few tokens; for many, bands of rows converted to
//                       float32, then sgemm.
//   Q8_0, Q4_0, Q4_K,   DotRows against the activations quantized to the
//   Q6_K                type's partner (Q8_0 or Q8_K blocks), integer dot
//                       products, for any number of tokens: what llama.cpp
//                       computes, so greedy ids agree with it even where the
//                       margins are small (tests/common/engine/families_test).
// DotRows runs on bands of rows split across the OpenMP team; each band runs
// every token, so its weights are read from memory once per call.
#ifndef APESERVE_COMMON_ENGINE_MATVEC_H_
#define APESERVE_COMMON_ENGINE_MATVEC_H_

#include "common/engine/weight_matrix.h"

namespace ape {

// y[out] = W[out][in] x[in] for float32 W.
void MatVec(const float* w, const float* x, float* y, int out, int in);

// y[t][o] = sum_i x[t][i] W[o][i] for t < n, o < w.rows, i < w.cols; rows of
// y are `ldy` floats apart.
void MatMul(const float* x, int n, const WeightMatrix& w, float* y, int ldy);

// Tokens up to which F16/BF16 products use DotRows rather than convert + sgemm.
constexpr int kDotRowsMaxTokens = 8;

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_MATVEC_H_
