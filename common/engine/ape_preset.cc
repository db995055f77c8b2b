#include "common/engine/ape_preset.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "common/engine/mapped_file.h"

namespace ape {
namespace {

absl::Status Invalid(const std::string& name, const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(name, ": ", field, " ", what));
}

// A T or S: a JSON number in [kMinApeParam, kMaxApeParam].
absl::Status ReadParam(const nlohmann::json& v, const std::string& name, const std::string& field, float* out) {
  if (!v.is_number()) return Invalid(name, field, "is not a number");
  const double d = v.get<double>();
  if (!(d >= kMinApeParam && d <= kMaxApeParam)) {
    return Invalid(name, field, absl::StrCat("is ", d, ", must be in [", kMinApeParam, ", ", kMaxApeParam, "]"));
  }
  *out = static_cast<float>(d);
  return absl::OkStatus();
}

absl::Status ReadTable(const nlohmann::json& j, const std::string& name, ApePreset* p) {
  if (!j.contains("by")) return Invalid(name, "by", "is missing (version 2 needs \"contexts\" or \"context_tokens\")");
  const nlohmann::json& by = j["by"];
  if (by == "contexts") {
    p->by = ApePresetKey::kContexts;
  } else if (by == "context_tokens") {
    p->by = ApePresetKey::kContextTokens;
  } else {
    return Invalid(name, "by", absl::StrCat("is ", by.dump(), ", must be \"contexts\" or \"context_tokens\""));
  }
  const char* key = ApePresetKeyName(p->by);
  if (!j.contains("table")) return Invalid(name, "table", "is missing (version 2 needs one)");
  const nlohmann::json& table = j["table"];
  if (!table.is_array() || table.empty()) return Invalid(name, "table", "must be a non-empty array of rows");
  if (table.size() > static_cast<size_t>(kMaxApePresetRows)) {
    return Invalid(name, "table", absl::StrCat("has ", table.size(), " rows, at most ", kMaxApePresetRows));
  }
  for (size_t i = 0; i < table.size(); ++i) {
    const nlohmann::json& row = table[i];
    const std::string at = absl::StrCat("table[", i, "]");
    if (!row.is_object()) return Invalid(name, at, "is not an object");
    for (const auto& [k, v] : row.items()) {
      if (k != key && k != "temperature" && k != "scale") {
        return Invalid(name, absl::StrCat(at, ".", k),
                       absl::StrCat("is not a row field (rows hold \"", key, "\", \"temperature\", \"scale\")"));
      }
    }
    for (const char* f : {key, "temperature", "scale"}) {
      if (!row.contains(f)) return Invalid(name, absl::StrCat(at, ".", f), "is missing");
    }
    ApePresetRow r;
    const nlohmann::json& k = row[key];
    // Integers only: a key is a count (is_number_integer is false for 2.0).
    // nlohmann stores a non-negative integer as unsigned, a negative one as
    // signed; 2^40 tokens is far beyond any request.
    const bool count = k.is_number_unsigned() && k.get<uint64_t>() >= 1 && k.get<uint64_t>() <= (uint64_t{1} << 40);
    if (!count) {
      return Invalid(name, absl::StrCat(at, ".", key),
                     absl::StrCat("is ", k.dump(), ", must be an integer in [1, 2^40]"));
    }
    r.at = static_cast<int64_t>(k.get<uint64_t>());
    if (!p->table.empty() && r.at <= p->table.back().at) {
      return Invalid(name, absl::StrCat(at, ".", key),
                     absl::StrCat("is ", r.at, ", not above the previous row's ", p->table.back().at,
                                  " (rows must be sorted by ", key, ", strictly increasing)"));
    }
    if (auto s = ReadParam(row["temperature"], name, at + ".temperature", &r.temperature); !s.ok()) return s;
    if (auto s = ReadParam(row["scale"], name, at + ".scale", &r.scale); !s.ok()) return s;
    p->table.push_back(r);
  }
  return absl::OkStatus();
}

}  // namespace

const char* ApePresetKeyName(ApePresetKey key) {
  return key == ApePresetKey::kContexts ? "contexts" : "context_tokens";
}

absl::StatusOr<ApePreset> ParseApePreset(const std::string& text, const std::string& name) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(absl::StrCat(name, ": not a JSON object"));
  ApePreset p;
  p.source = name;
  if (j.contains("version")) {
    const nlohmann::json& v = j["version"];
    if (!v.is_number_integer() || (v.get<int64_t>() != 1 && v.get<int64_t>() != 2)) {
      return Invalid(name, "version", absl::StrCat("is ", v.dump(), ", this decoder reads versions 1 and 2"));
    }
    p.version = static_cast<int>(v.get<int64_t>());
  }
  // Version 1 may leave out either value (the default applies); version 2
  // states its fallback, so a file never silently mixes in the defaults.
  for (const char* f : {"temperature", "scale"}) {
    if (!j.contains(f)) {
      if (p.version == 2) return Invalid(name, f, "is missing (version 2 states its fixed fallback)");
      continue;
    }
    if (auto s = ReadParam(j[f], name, f, f[0] == 't' ? &p.temperature : &p.scale); !s.ok()) return s;
  }
  if (p.version == 1) {
    // A table in a file without "version": 2 would be ignored; say so instead.
    for (const char* f : {"table", "by"}) {
      if (j.contains(f)) return Invalid(name, f, "needs \"version\": 2 (a version-1 preset is one fixed T and S)");
    }
    return p;
  }
  if (auto s = ReadTable(j, name, &p); !s.ok()) return s;
  return p;
}

absl::StatusOr<ApePreset> LoadApePreset(const std::string& path) {
  auto text = ReadFileToString(path);
  if (!text.ok()) return text.status();
  return ParseApePreset(*text, path);
}

std::pair<float, float> ApePreset::For(int contexts, int64_t context_tokens) const {
  const int64_t x = by == ApePresetKey::kContexts ? contexts : context_tokens;
  if (table.empty() || x <= 0) return {temperature, scale};
  // One context keyed by its tokens takes the first row whatever its
  // length: the row fitted for the fewest documents (with one context APE at
  // T = S = 1 is sequential encoding exactly, which a calibration's first
  // row gives), not a row fitted for several short ones.
  if (by == ApePresetKey::kContextTokens && contexts == 1) return {table.front().temperature, table.front().scale};
  if (x <= table.front().at) return {table.front().temperature, table.front().scale};
  if (x >= table.back().at) return {table.back().temperature, table.back().scale};
  // The first row above x; the row before it is at or below x.
  const auto hi =
      std::upper_bound(table.begin(), table.end(), x, [](int64_t v, const ApePresetRow& r) { return v < r.at; });
  const auto lo = hi - 1;
  // Linear in log2: the rows a calibration writes double (2, 4, 8, ...), and
  // the effect of a context count is about its log (the log-sum-exp of the
  // pooled contexts grows with log N).
  const double f = (std::log2(static_cast<double>(x)) - std::log2(static_cast<double>(lo->at))) /
                   (std::log2(static_cast<double>(hi->at)) - std::log2(static_cast<double>(lo->at)));
  const auto lerp = [f](float a, float b) { return static_cast<float>(a + f * (static_cast<double>(b) - a)); };
  return {lerp(lo->temperature, hi->temperature), lerp(lo->scale, hi->scale)};
}

absl::StatusOr<ApePreset> PresetForModel(const std::string& model_path) {
  const std::string path = model_path + ".ape.json";
  if (!std::filesystem::exists(path)) return ApePreset{};
  return LoadApePreset(path);
}

}  // namespace ape
