#include "common/engine/gguf.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/engine/byte_reader.h"
#include "common/engine/half.h"
#include "common/engine/quant.h"
#include "common/engine/status_macros.h"

namespace ape {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" little-endian
constexpr uint64_t kDefaultAlignment = 32;
constexpr int kMaxArrayDepth = 4;
constexpr uint32_t kMaxDims = 4;

absl::Status ReadGgufString(ByteReader& r, std::string* out, absl::string_view field) {
  uint64_t len;
  RETURN_IF_ERROR(r.Read(&len, field));
  if (len > r.remaining()) { return r.Error(absl::StrCat(field, ": string length ", len, " exceeds the file")); }
  return r.ReadString(static_cast<size_t>(len), out, field);
}

size_t ScalarSize(GgufType t) {
  switch (t) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kBool: return 1;
    case GgufType::kUint16:
    case GgufType::kInt16: return 2;
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kFloat32: return 4;
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kFloat64: return 8;
    case GgufType::kString: return 8;  // at least the length field
    case GgufType::kArray: return 12;  // at least type + count
  }
  return 0;
}

absl::Status ReadValue(ByteReader& r, GgufType type, GgufValue* v, int depth, const std::string& key) {
  v->type = type;
  switch (type) {
    case GgufType::kUint8: {
      uint8_t x;
      RETURN_IF_ERROR(r.Read(&x, key));
      v->i = x;
      break;
    }
    case GgufType::kInt8: {
      int8_t x;
      RETURN_IF_ERROR(r.Read(&x, key));
      v->i = x;
      break;
    }
    case GgufType::kUint16: {
      uint16_t x;
      RETURN_IF_ERROR(r.Read(&x, key));
      v->i = x;
      break;
    }
    case GgufType::kInt16: {
      int16_t x;
      RETURN_IF_ERROR(r.Read(&x, key));
      v->i = x;
      break;
    }
    case GgufType::kUint32: {
      uint32_t x;
      RETURN_IF_ERROR(r.Read(&x, key));
      v->i = x;
      break;
    }
    case GgufType::kInt32: {
      int32_t x;
      RETURN_IF_ERROR(r.Read(&x, key));
      v->i = x;
      break;
    }
    case GgufType::kInt64: {
      int64_t x;
      RETURN_IF_ERROR(r.Read(&x, key));
      v->i = x;
      break;
    }
    case GgufType::kUint64: {
      uint64_t x;
      RETURN_IF_ERROR(r.Read(&x, key));
      if (x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return r.Error(absl::StrCat("metadata ", key, ": uint64 value too large"));
      }
      v->i = static_cast<int64_t>(x);
      break;
    }
    case GgufType::kBool: {
      uint8_t x;
      RETURN_IF_ERROR(r.Read(&x, key));
      if (x > 1) return r.Error(absl::StrCat("metadata ", key, ": bool byte is ", x));
      v->i = x;
      break;
    }
    case GgufType::kFloat32: {
      float x;
      RETURN_IF_ERROR(r.Read(&x, key));
      v->f = x;
      break;
    }
    case GgufType::kFloat64: {
      double x;
      RETURN_IF_ERROR(r.Read(&x, key));
      v->f = x;
      break;
    }
    case GgufType::kString: RETURN_IF_ERROR(ReadGgufString(r, &v->str, key)); break;
    case GgufType::kArray: {
      if (depth >= kMaxArrayDepth) return r.Error(absl::StrCat("metadata ", key, ": arrays nested too deep"));
      uint32_t elem;
      uint64_t count;
      RETURN_IF_ERROR(r.Read(&elem, key));
      RETURN_IF_ERROR(r.Read(&count, key));
      if (elem > static_cast<uint32_t>(GgufType::kFloat64)) {
        return r.Error(absl::StrCat("metadata ", key, ": unknown array element type ", elem));
      }
      GgufType et = static_cast<GgufType>(elem);
      if (count > r.remaining() / ScalarSize(et)) {
        return r.Error(absl::StrCat("metadata ", key, ": array of ", count, " elements exceeds the file"));
      }
      v->array_type = et;
      v->array.resize(static_cast<size_t>(count));
      for (auto& e : v->array) RETURN_IF_ERROR(ReadValue(r, et, &e, depth + 1, key));
      break;
    }
    default: return r.Error(absl::StrCat("metadata ", key, ": unknown value type ", static_cast<uint32_t>(type)));
  }
  return absl::OkStatus();
}

bool IsNumeric(GgufType t) { return t != GgufType::kString && t != GgufType::kArray; }

}  // namespace

int GgmlBlockElements(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
    case GgmlType::kF16:
    case GgmlType::kBF16: return 1;
    case GgmlType::kQ4_0:
    case GgmlType::kQ5_0:
    case GgmlType::kQ5_1:
    case GgmlType::kQ8_0: return 32;
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
    case GgmlType::kQ6_K:
    case GgmlType::kQ8_K: return 256;
  }
  return 0;
}

int GgmlBlockBytes(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32: return 4;
    case GgmlType::kF16:
    case GgmlType::kBF16: return 2;
    case GgmlType::kQ4_0: return 2 + 16;                 // f16 d, 32 nibbles
    case GgmlType::kQ5_0: return 2 + 4 + 16;             // f16 d, 32 high bits, 32 nibbles
    case GgmlType::kQ5_1: return 2 + 2 + 4 + 16;         // f16 d, f16 m, 32 high bits, 32 nibbles
    case GgmlType::kQ8_0: return 2 + 32;                 // f16 d, 32 int8
    case GgmlType::kQ4_K: return 2 + 2 + 12 + 128;       // d, dmin, scales, nibbles
    case GgmlType::kQ5_K: return 2 + 2 + 12 + 32 + 128;  // + 256 high bits
    case GgmlType::kQ6_K: return 128 + 64 + 16 + 2;      // ql, qh, scales, d
    case GgmlType::kQ8_K: return 4 + 256 + 2 * 16;       // f32 d, int8, bsums
  }
  return 0;
}

uint64_t GgmlRowBytes(uint32_t type, uint64_t n) {
  const uint64_t be = GgmlBlockElements(type);
  if (be == 0 || n % be != 0) return 0;
  return n / be * GgmlBlockBytes(type);
}

const char* GgmlTypeName(uint32_t type) {
  static const char* kNames[] = {"F32",     "F16",    "Q4_0",    "Q4_1",  "Q4_2",   "Q4_3",  "Q5_0",  "Q5_1",
                                 "Q8_0",    "Q8_1",   "Q2_K",    "Q3_K",  "Q4_K",   "Q5_K",  "Q6_K",  "Q8_K",
                                 "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
                                 "I8",      "I16",    "I32",     "I64",   "F64",    "IQ1_M", "BF16"};
  return type < sizeof(kNames) / sizeof(kNames[0]) ? kNames[type] : "unknown";
}

absl::StatusOr<GgufFile> GgufFile::Parse(std::span<const uint8_t> bytes, std::string what) {
  ByteReader r(bytes, what);
  GgufFile f;
  f.what_ = what;
  uint32_t magic;
  RETURN_IF_ERROR(r.Read(&magic, "magic"));
  if (magic != kGgufMagic) return r.Error("not a GGUF file (bad magic)");
  RETURN_IF_ERROR(r.Read(&f.version_, "version"));
  if (f.version_ != 2 && f.version_ != 3) {
    return absl::UnimplementedError(
        absl::StrCat(what, ": GGUF version ", f.version_, " is not supported (only 2 and 3)"));
  }
  uint64_t tensor_count, kv_count;
  RETURN_IF_ERROR(r.Read(&tensor_count, "tensor_count"));
  RETURN_IF_ERROR(r.Read(&kv_count, "metadata_kv_count"));
  // Every kv takes >= 12 bytes and every tensor info >= 24: bound counts by size.
  if (kv_count > r.remaining() / 12) return r.Error(absl::StrCat("metadata count ", kv_count, " exceeds the file"));
  if (tensor_count > r.remaining() / 24)
    return r.Error(absl::StrCat("tensor count ", tensor_count, " exceeds the file"));

  for (uint64_t k = 0; k < kv_count; ++k) {
    std::string key;
    uint32_t type;
    RETURN_IF_ERROR(ReadGgufString(r, &key, "metadata key"));
    RETURN_IF_ERROR(r.Read(&type, "metadata value type"));
    if (type > static_cast<uint32_t>(GgufType::kFloat64)) {
      return r.Error(absl::StrCat("metadata ", key, ": unknown value type ", type));
    }
    GgufValue v;
    RETURN_IF_ERROR(ReadValue(r, static_cast<GgufType>(type), &v, 0, key));
    if (!f.metadata_.emplace(key, std::move(v)).second) {
      return r.Error(absl::StrCat("duplicate metadata key ", key));
    }
  }

  uint64_t alignment = kDefaultAlignment;
  if (f.Has("general.alignment")) {
    ASSIGN_OR_RETURN(int64_t a, f.GetInt("general.alignment"));
    if (a <= 0 || (a & (a - 1)) != 0 || a > (1 << 20)) {
      return r.Error(absl::StrCat("general.alignment ", a, " is not a power of two"));
    }
    alignment = static_cast<uint64_t>(a);
  }

  f.tensors_.resize(static_cast<size_t>(tensor_count));
  for (auto& t : f.tensors_) {
    RETURN_IF_ERROR(ReadGgufString(r, &t.name, "tensor name"));
    uint32_t n_dims;
    RETURN_IF_ERROR(r.Read(&n_dims, "tensor n_dims"));
    if (n_dims == 0 || n_dims > kMaxDims) {
      return r.Error(absl::StrCat("tensor ", t.name, " has ", n_dims, " dimensions"));
    }
    t.dims.resize(n_dims);
    t.num_elements = 1;
    for (auto& d : t.dims) {
      RETURN_IF_ERROR(r.Read(&d, "tensor dim"));
      if (d == 0 || d > (uint64_t{1} << 40) || t.num_elements > (uint64_t{1} << 40) / d) {
        return r.Error(absl::StrCat("tensor ", t.name, " has an invalid dimension ", d));
      }
      t.num_elements *= d;
    }
    RETURN_IF_ERROR(r.Read(&t.type, "tensor type"));
    RETURN_IF_ERROR(r.Read(&t.offset, "tensor offset"));
    if (t.offset % alignment != 0) {
      return r.Error(absl::StrCat("tensor ", t.name, " offset ", t.offset, " is not aligned to ", alignment));
    }
    if (!f.tensor_index_.emplace(t.name, &t - f.tensors_.data()).second) {
      return r.Error(absl::StrCat("duplicate tensor ", t.name));
    }
  }

  uint64_t data_start = (r.offset() + alignment - 1) / alignment * alignment;
  if (data_start > bytes.size()) {
    if (tensor_count > 0) return r.Error("truncated before the tensor data section");
    data_start = bytes.size();
  }
  f.data_section_ = bytes.subspan(data_start);
  for (auto& t : f.tensors_) {
    if (GgmlBlockElements(t.type) == 0) {
      // Unknown type: keep the entry so callers can name it, but give it no
      // data; the model loader reports the type.
      continue;
    }
    // Blocks never straddle rows: the row length is a whole number of blocks.
    const uint64_t row = t.dims.empty() ? 1 : t.dims[0];
    if (row % GgmlBlockElements(t.type) != 0) {
      return r.Error(absl::StrCat("tensor ", t.name, " of type ", GgmlTypeName(t.type), " has rows of ", row,
                                  " elements, not a multiple of its block size ", GgmlBlockElements(t.type)));
    }
    const uint64_t nbytes = GgmlRowBytes(t.type, t.num_elements);
    if (t.offset > f.data_section_.size() || nbytes > f.data_section_.size() - t.offset) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": tensor ", t.name, " (", nbytes, " bytes at data offset ",
                                                     t.offset,
                                                     ") extends past the end of the file; the file is truncated"));
    }
    t.data = f.data_section_.subspan(t.offset, nbytes);
  }
  return f;
}

absl::StatusOr<const GgufValue*> GgufFile::Get(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) { return absl::NotFoundError(absl::StrCat(what_, ": metadata key ", key, " is missing")); }
  return &it->second;
}

absl::StatusOr<int64_t> GgufFile::GetInt(const std::string& key) const {
  ASSIGN_OR_RETURN(const GgufValue* v, Get(key));
  if (!IsNumeric(v->type) || v->type == GgufType::kFloat32 || v->type == GgufType::kFloat64) {
    return absl::InvalidArgumentError(absl::StrCat(what_, ": metadata ", key, " is not an integer"));
  }
  return v->i;
}

absl::StatusOr<double> GgufFile::GetFloat(const std::string& key) const {
  ASSIGN_OR_RETURN(const GgufValue* v, Get(key));
  if (v->type == GgufType::kFloat32 || v->type == GgufType::kFloat64) return v->f;
  if (IsNumeric(v->type)) return static_cast<double>(v->i);
  return absl::InvalidArgumentError(absl::StrCat(what_, ": metadata ", key, " is not a number"));
}

absl::StatusOr<bool> GgufFile::GetBool(const std::string& key) const {
  ASSIGN_OR_RETURN(const GgufValue* v, Get(key));
  if (v->type != GgufType::kBool) {
    return absl::InvalidArgumentError(absl::StrCat(what_, ": metadata ", key, " is not a bool"));
  }
  return v->i != 0;
}

absl::StatusOr<std::string> GgufFile::GetString(const std::string& key) const {
  ASSIGN_OR_RETURN(const GgufValue* v, Get(key));
  if (v->type != GgufType::kString) {
    return absl::InvalidArgumentError(absl::StrCat(what_, ": metadata ", key, " is not a string"));
  }
  return v->str;
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(const std::string& key) const {
  ASSIGN_OR_RETURN(const GgufValue* v, Get(key));
  if (v->type != GgufType::kArray || v->array_type != GgufType::kString) {
    return absl::InvalidArgumentError(absl::StrCat(what_, ": metadata ", key, " is not a string array"));
  }
  std::vector<std::string> out;
  out.reserve(v->array.size());
  for (const auto& e : v->array) out.push_back(e.str);
  return out;
}

absl::StatusOr<std::vector<float>> GgufFile::GetFloatArray(const std::string& key) const {
  ASSIGN_OR_RETURN(const GgufValue* v, Get(key));
  if (v->type != GgufType::kArray || (v->array_type != GgufType::kFloat32 && v->array_type != GgufType::kFloat64)) {
    return absl::InvalidArgumentError(absl::StrCat(what_, ": metadata ", key, " is not a float array"));
  }
  std::vector<float> out;
  out.reserve(v->array.size());
  for (const auto& e : v->array) out.push_back(static_cast<float>(e.f));
  return out;
}

absl::StatusOr<std::vector<int32_t>> GgufFile::GetIntArray(const std::string& key) const {
  ASSIGN_OR_RETURN(const GgufValue* v, Get(key));
  if (v->type != GgufType::kArray || !IsNumeric(v->array_type) || v->array_type == GgufType::kFloat32 ||
      v->array_type == GgufType::kFloat64) {
    return absl::InvalidArgumentError(absl::StrCat(what_, ": metadata ", key, " is not an integer array"));
  }
  std::vector<int32_t> out;
  out.reserve(v->array.size());
  for (const auto& e : v->array) out.push_back(static_cast<int32_t>(e.i));
  return out;
}

absl::StatusOr<const GgufTensor*> GgufFile::FindTensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  if (it == tensor_index_.end()) { return absl::NotFoundError(absl::StrCat(what_, ": tensor ", name, " is missing")); }
  return &tensors_[it->second];
}

absl::Status DequantizeTensor(const GgufTensor& t, float* out) {
  if (t.data.empty() || !IsWeightType(static_cast<GgmlType>(t.type))) {
    return absl::UnimplementedError(
        absl::StrCat("tensor ", t.name, " has type ", GgmlTypeName(t.type), " (", t.type, "), which is not supported"));
  }
  DequantizeRow(static_cast<GgmlType>(t.type), t.data.data(), out, static_cast<int64_t>(t.num_elements));
  return absl::OkStatus();
}

}  // namespace ape
