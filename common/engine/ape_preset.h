// Per-model APE defaults (T and S), written by the calibration tool
// (bench/quality/calibrate.py) and read by ape-decoder when a request gives
// none. The file is "<model>.ape.json", in one of two versions:
//
// Version 1 (no "version" field, or "version": 1): one T and S for every
// request.
//   {"temperature": 0.8, "scale": 0.9, "source": "..."}
//
// Version 2: T and S as a function of the request, from a table keyed by the
// number of contexts ("by": "contexts") or by their cached tokens in all
// ("by": "context_tokens"). Between two rows T and S are each interpolated
// linearly in log2(key); below the first row the first row applies, above
// the last row the last (clamped). "temperature" and "scale" are the fixed
// fallback: used for a key of 0 (a request without contexts, where T and S
// change nothing), and what a version-1 reader sees.
//   {"version": 2, "temperature": 0.8, "scale": 0.9, "by": "contexts",
//    "table": [{"contexts": 1, "temperature": 1.0, "scale": 1.0},
//              {"contexts": 8, "temperature": 0.8, "scale": 0.9}, ...],
//    "source": "..."}
// Rows hold exactly the key field, "temperature" and "scale"; keys are
// integers >= 1, strictly increasing. Other top-level keys ("source",
// "interpolation", ...) are recorded by the calibration and ignored here.
#ifndef APESERVE_COMMON_ENGINE_APE_PRESET_H_
#define APESERVE_COMMON_ENGINE_APE_PRESET_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace ape {

// APE T and S (a request's, or a preset's) are in [kMinApeParam,
// kMaxApeParam]: T near 0 scales context logits without bound (1e-45 gives
// NaN), and calibration (bench/quality) searches 0.3..1.4.
inline constexpr float kMinApeParam = 0.05f;
inline constexpr float kMaxApeParam = 2.f;
// Rows a version-2 table may hold (a calibration writes about ten).
inline constexpr int kMaxApePresetRows = 64;

// What a version-2 table is keyed by.
enum class ApePresetKey { kContexts, kContextTokens };

struct ApePresetRow {
  int64_t at = 0;  // contexts, or cached context tokens (>= 1)
  float temperature = 0.f;
  float scale = 0.f;
};

struct ApePreset {
  int version = 1;
  float temperature = 0.9f;  // the reference library's defaults; in
  float scale = 0.9f;        // version 2, the fallback for a key of 0
  ApePresetKey by = ApePresetKey::kContexts;
  std::vector<ApePresetRow> table;  // version 2: sorted by `at`, non-empty
  std::string source = "default";

  // T and S for a request with `contexts` contexts holding `context_tokens`
  // tokens in all: the fixed values (version 1, or a key <= 0), else the
  // table interpolated at the key (see the file comment); keyed by tokens,
  // one context takes the first row whatever its length.
  std::pair<float, float> For(int contexts, int64_t context_tokens) const;
};

// "contexts" / "context_tokens": the field name of the key in the file.
const char* ApePresetKeyName(ApePresetKey key);

// INVALID_ARGUMENT, naming the file and the field, for a file that is not
// such an object: values outside [kMinApeParam, kMaxApeParam], a version
// other than 1 or 2, a table in a version-1 file, a version-2 file without
// "by", "table", "temperature" or "scale", a row with a missing, extra or
// non-integer key, or keys not strictly increasing. NOT_FOUND when the file
// does not exist.
absl::StatusOr<ApePreset> LoadApePreset(const std::string& path);
// The same checks on JSON text; `name` stands for the file in messages.
absl::StatusOr<ApePreset> ParseApePreset(const std::string& text, const std::string& name);
// "<model path>.ape.json" when it exists, the defaults when it does not, and
// the error when it exists but cannot be used (a server refuses to start on it).
absl::StatusOr<ApePreset> PresetForModel(const std::string& model_path);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_APE_PRESET_H_
