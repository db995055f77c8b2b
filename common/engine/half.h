// IEEE float16 and bfloat16 <-> float32 conversions. float16 uses the
// compiler's _Float16 (F16C instructions with -march=x86-64-v3): round to
// nearest even, infinities and NaN kept.
#ifndef APESERVE_COMMON_ENGINE_HALF_H_
#define APESERVE_COMMON_ENGINE_HALF_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace ape {

inline float HalfToFloat(uint16_t h) {
  _Float16 f;
  std::memcpy(&f, &h, 2);
  return static_cast<float>(f);
}

inline uint16_t FloatToHalf(float x) {
  _Float16 f = static_cast<_Float16>(x);
  uint16_t h;
  std::memcpy(&h, &f, 2);
  return h;
}

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
