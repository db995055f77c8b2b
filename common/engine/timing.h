// Milliseconds on the steady clock, for timings in logs and responses.
#ifndef APESERVE_COMMON_ENGINE_TIMING_H_
#define APESERVE_COMMON_ENGINE_TIMING_H_

#include <chrono>

namespace ape {

inline double MsBetween(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
inline double MsSince(std::chrono::steady_clock::time_point t) {
  return MsBetween(t, std::chrono::steady_clock::now());
}

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_TIMING_H_
