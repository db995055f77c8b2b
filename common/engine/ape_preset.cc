#include "common/engine/ape_preset.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "common/engine/mapped_file.h"

namespace ape {

absl::StatusOr<ApePreset> LoadApePreset(const std::string& path) {
  auto text = ReadFileToString(path);
  if (!text.ok()) return text.status();
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  ApePreset p;
  p.source = path;
  auto get = [&](const char* k, float* out) -> absl::Status {
    if (!j.contains(k)) return absl::OkStatus();
    if (!j[k].is_number()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", k, " is not a number"));
    *out = j[k].get<float>();
    if (!(*out >= kMinApeParam && *out <= kMaxApeParam)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": ", k, " must be in [", kMinApeParam, ", ", kMaxApeParam, "]"));
    }
    return absl::OkStatus();
  };
  if (auto s = get("temperature", &p.temperature); !s.ok()) return s;
  if (auto s = get("scale", &p.scale); !s.ok()) return s;
  return p;
}

std::pair<float, float> ApePreset::For(int /*contexts*/, int64_t /*context_tokens*/) const {
  return {temperature, scale};
}

absl::StatusOr<ApePreset> PresetForModel(const std::string& model_path) {
  const std::string path = model_path + ".ape.json";
  if (!std::filesystem::exists(path)) return ApePreset{};
  return LoadApePreset(path);
}

}  // namespace ape
