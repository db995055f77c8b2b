// y[out] = W[out][in] x[in]: the decode hot spot. Decode is bound by reading
// the weights once per token, so this kernel streams four rows at a time
// with AVX2 FMA and splits rows across the OpenMP team. (OpenBLAS 0.3.21's
// sgemv reached about a quarter of this machine's read bandwidth.)
#ifndef APESERVE_COMMON_ENGINE_MATVEC_H_
#define APESERVE_COMMON_ENGINE_MATVEC_H_

namespace ape {

void MatVec(const float* w, const float* x, float* y, int out, int in);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_MATVEC_H_
