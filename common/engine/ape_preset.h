// Per-model APE defaults (T and S), written by the calibration tool and read
// by ape-decoder when a request gives none. JSON:
//   {"temperature": 0.9, "scale": 0.9, "prefix_newlines": 0, "source": "..."}
#ifndef APESERVE_COMMON_ENGINE_APE_PRESET_H_
#define APESERVE_COMMON_ENGINE_APE_PRESET_H_

#include <string>

#include "absl/status/statusor.h"

namespace ape {

struct ApePreset {
  float temperature = 0.9f;  // the reference library's defaults
  float scale = 0.9f;
  int prefix_newlines = 0;   // "\n" tokens the calibration appended to the prefix
  std::string source = "default";
};

absl::StatusOr<ApePreset> LoadApePreset(const std::string& path);
absl::Status SaveApePreset(const ApePreset& preset, const std::string& path);
// "<model path>.ape.json" when it exists, else the defaults.
ApePreset PresetForModel(const std::string& model_path);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_APE_PRESET_H_
