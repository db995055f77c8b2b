#include "common/engine/quantize_model.h"

#include <cstdio>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/engine/gguf_writer.h"
#include "common/engine/quant.h"
#include "common/engine/status_macros.h"
#include "common/engine/threading.h"

namespace ape {
namespace {

// general.file_type values (llama.cpp's llama_ftype) for a pure file of a type.
int FileType(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return 0;
    case GgmlType::kF16: return 1;
    case GgmlType::kQ4_0: return 2;
    case GgmlType::kQ8_0: return 7;
    case GgmlType::kQ5_0: return 8;
    case GgmlType::kQ5_1: return 9;
    case GgmlType::kQ5_K: return 17;  // Q5_K_M
    case GgmlType::kQ4_K: return 15;  // llama-quantize's "Q4_K" is Q4_K_M
    case GgmlType::kQ6_K: return 18;
    case GgmlType::kBF16: return 32;
    default: return 0;
  }
}

bool IsMatrixWeight(const GgufTensor& t) {
  return t.dims.size() == 2 && absl::EndsWith(t.name, ".weight") && !absl::StrContains(t.name, "_norm");
}

uint64_t BlockOf(GgmlType t) { return static_cast<uint64_t>(GgmlBlockElements(static_cast<uint32_t>(t))); }

// The type tensor `t` gets, and why when it is not `target` (Qwen2.5-0.5B's
// 896 columns are not whole K-quant super-blocks).
GgmlType TypeFor(const GgufTensor& t, GgmlType target, std::string* why) {
  const auto source = static_cast<GgmlType>(t.type);
  if (!IsMatrixWeight(t)) return source;
  const uint64_t cols = t.dims[0];
  const std::optional<GgmlType> type = MatrixTypeFor(target, cols);
  if (type != target) {
    *why = absl::StrCat("rows of ", cols, " are not a multiple of ", GgmlTypeName(static_cast<uint32_t>(target)),
                        "'s block of ", BlockOf(target));
  }
  return type.value_or(source);
}

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};

}  // namespace

std::optional<GgmlType> MatrixTypeFor(GgmlType target, uint64_t cols) {
  if (cols % BlockOf(target) == 0) return target;
  GgmlType fallback;
  switch (target) {
    case GgmlType::kQ4_K: fallback = GgmlType::kQ5_0; break;
    case GgmlType::kQ5_K: fallback = GgmlType::kQ5_1; break;
    case GgmlType::kQ6_K: fallback = GgmlType::kQ8_0; break;
    default: return std::nullopt;
  }
  return cols % BlockOf(fallback) == 0 ? fallback : GgmlType::kF16;
}

absl::StatusOr<GgmlType> ParseQuantizeType(const std::string& name) {
  for (GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kQ5_0,
                     GgmlType::kQ5_1, GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K}) {
    if (name == GgmlTypeName(static_cast<uint32_t>(t))) return t;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown target type '", name,
                                                 "'; one of F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K"));
}

absl::StatusOr<QuantizeResult> QuantizeGguf(const GgufFile& in, GgmlType type, const std::string& out_path,
                                            const std::function<void(int, int, const std::string&)>& progress) {
  QuantizeResult result;
  // Every tensor must be readable (a known type with data) before we start.
  std::vector<GgmlType> out_types;
  for (const GgufTensor& t : in.tensors()) {
    if (t.data.empty() || !IsWeightType(static_cast<GgmlType>(t.type))) {
      return absl::UnimplementedError(absl::StrCat(in.what(), ": tensor ", t.name, " has type ", GgmlTypeName(t.type),
                                                   ", which this tool cannot read"));
    }
    std::string why;
    out_types.push_back(TypeFor(t, type, &why));
    if (!why.empty()) {
      result.fallbacks.push_back(
          absl::StrCat(t.name, ": ", GgmlTypeName(static_cast<uint32_t>(out_types.back())), " (", why, ")"));
    }
  }

  GgufWriter w(in.Has("general.alignment") ? static_cast<uint64_t>(*in.GetInt("general.alignment")) : 32);
  for (const auto& [key, value] : in.metadata()) w.Set(key, value);
  GgufValue file_type;
  file_type.type = GgufType::kUint32;
  file_type.i = FileType(type);
  w.Set("general.file_type", file_type);
  GgufValue version;  // written by llama-quantize whatever the type
  version.type = GgufType::kUint32;
  version.i = 2;  // GGML_QNT_VERSION: the block layouts of quant.h
  w.Set("general.quantization_version", version);
  for (size_t i = 0; i < in.tensors().size(); ++i) {
    const GgufTensor& t = in.tensors()[i];
    w.AddTensor(t.name, t.dims, out_types[i]);
  }

  std::unique_ptr<std::FILE, FileCloser> out(std::fopen(out_path.c_str(), "wb"));
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot create ", out_path));
  RETURN_IF_ERROR(w.WriteHeader(out.get()));
  std::vector<uint8_t> converted;
  for (size_t i = 0; i < in.tensors().size(); ++i) {
    const GgufTensor& t = in.tensors()[i];
    const GgmlType from = static_cast<GgmlType>(t.type), to = out_types[i];
    ++result.tensors_by_type[GgmlTypeName(static_cast<uint32_t>(to))];
    if (from == to) {
      RETURN_IF_ERROR(w.WriteTensorData(out.get(), t.data));
    } else {
      // Row by row: source -> float32 -> target, rows split across threads.
      const int64_t cols = static_cast<int64_t>(t.dims[0]);
      const int64_t rows = static_cast<int64_t>(t.num_elements) / cols;
      const size_t in_row = GgmlRowBytes(t.type, cols), out_row = GgmlRowBytes(static_cast<uint32_t>(to), cols);
      converted.resize(rows * out_row);
      ParallelFor(rows, /*dynamic=*/false, [&](int64_t r) {
        thread_local std::vector<float> row;
        row.resize(cols);
        DequantizeRow(from, t.data.data() + r * in_row, row.data(), cols);
        QuantizeRow(to, row.data(), converted.data() + r * out_row, cols);
      });
      RETURN_IF_ERROR(w.WriteTensorData(out.get(), converted));
    }
    if (progress) progress(static_cast<int>(i + 1), static_cast<int>(in.tensors().size()), t.name);
  }
  const long size = std::ftell(out.get());
  if (std::fclose(out.release()) != 0) return absl::InternalError(absl::StrCat("closing ", out_path, " failed"));
  result.out_bytes = size > 0 ? static_cast<uint64_t>(size) : 0;
  return result;
}

}  // namespace ape
