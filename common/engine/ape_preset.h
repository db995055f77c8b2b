// Per-model APE defaults (T and S), written by the calibration tool
// (bench/quality/calibrate.py) and read by ape-decoder when a request gives
// none. JSON:
//   {"temperature": 0.8, "scale": 0.9, "source": "..."}
// Other keys are recorded by the calibration (its grid, its data) and ignored here.
#ifndef APESERVE_COMMON_ENGINE_APE_PRESET_H_
#define APESERVE_COMMON_ENGINE_APE_PRESET_H_

#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/statusor.h"

namespace ape {

// APE T and S (a request's, or a preset's) are in [kMinApeParam,
// kMaxApeParam]: T near 0 scales context logits without bound (1e-45 gives
// NaN), and calibration (bench/quality) searches 0.1..1.0.
inline constexpr float kMinApeParam = 0.05f;
inline constexpr float kMaxApeParam = 2.f;

struct ApePreset {
  float temperature = 0.9f;  // the reference library's defaults
  float scale = 0.9f;
  std::string source = "default";

  // T and S for a request with `contexts` contexts holding `context_tokens`
  // tokens in all. (Today: the fixed values above, whatever the request.)
  std::pair<float, float> For(int contexts, int64_t context_tokens) const;
};

// INVALID_ARGUMENT for a file that is not such an object or holds values
// outside [kMinApeParam, kMaxApeParam]; NOT_FOUND when it does not exist.
absl::StatusOr<ApePreset> LoadApePreset(const std::string& path);
// "<model path>.ape.json" when it exists, the defaults when it does not, and
// the error when it exists but cannot be used (a server refuses to start on it).
absl::StatusOr<ApePreset> PresetForModel(const std::string& model_path);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_APE_PRESET_H_
