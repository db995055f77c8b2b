// IEEE float16 and bfloat16 <-> float32 conversions. float16 uses the F16C
// instructions (-march=x86-64-v3) through their intrinsics, not the
// compiler's _Float16 (clang 14, which builds the fuzzers, has none): round
// to nearest even, infinities and NaN kept.
#ifndef APESERVE_COMMON_ENGINE_HALF_H_
#define APESERVE_COMMON_ENGINE_HALF_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

namespace ape {

inline float HalfToFloat(uint16_t h) { return _cvtsh_ss(h); }

inline uint16_t FloatToHalf(float x) { return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }

inline float Bf16ToFloat(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Bulk conversions; the loops vectorize.
void HalfToFloat(const uint16_t* in, float* out, size_t n);
void FloatToHalf(const float* in, uint16_t* out, size_t n);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_HALF_H_
