#include "common/engine/half.h"

#include <immintrin.h>

#include <cstring>

namespace ape {

// F16C converts 8 values per instruction; cache loads convert whole
// contexts (hundreds of MB) through here, and F16 weight rows
// (DequantizeRow). Every read is unaligned-safe (loadu, memcpy), as a row of
// a file need not be 2-byte aligned.
void HalfToFloat(const uint16_t* in, float* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  }
  for (; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, in + i, sizeof h);
    out[i] = HalfToFloat(h);
  }
}

void FloatToHalf(const float* in, uint16_t* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) out[i] = FloatToHalf(in[i]);
}

}  // namespace ape
