#include "common/engine/gguf_writer.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/engine/status_macros.h"

namespace ape {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" little-endian

template <typename T>
void Put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(v));
}

void PutString(std::string& out, const std::string& s) {
  Put<uint64_t>(out, s.size());
  out += s;
}

// The value's payload (without its type tag), as gguf.cc reads it.
void PutValue(std::string& out, const GgufValue& v) {
  switch (v.type) {
    case GgufType::kUint8: Put<uint8_t>(out, static_cast<uint8_t>(v.i)); break;
    case GgufType::kInt8: Put<int8_t>(out, static_cast<int8_t>(v.i)); break;
    case GgufType::kUint16: Put<uint16_t>(out, static_cast<uint16_t>(v.i)); break;
    case GgufType::kInt16: Put<int16_t>(out, static_cast<int16_t>(v.i)); break;
    case GgufType::kUint32: Put<uint32_t>(out, static_cast<uint32_t>(v.i)); break;
    case GgufType::kInt32: Put<int32_t>(out, static_cast<int32_t>(v.i)); break;
    case GgufType::kFloat32: Put<float>(out, static_cast<float>(v.f)); break;
    case GgufType::kBool: Put<uint8_t>(out, v.i ? 1 : 0); break;
    case GgufType::kString: PutString(out, v.str); break;
    case GgufType::kUint64: Put<uint64_t>(out, static_cast<uint64_t>(v.i)); break;
    case GgufType::kInt64: Put<int64_t>(out, v.i); break;
    case GgufType::kFloat64: Put<double>(out, v.f); break;
    case GgufType::kArray:
      Put<uint32_t>(out, static_cast<uint32_t>(v.array_type));
      Put<uint64_t>(out, v.array.size());
      for (const GgufValue& e : v.array) PutValue(out, e);
      break;
  }
}

absl::Status WriteAll(std::FILE* out, const void* data, size_t n) {
  if (n > 0 && std::fwrite(data, 1, n, out) != n) {
    return absl::InternalError(absl::StrCat("writing the GGUF file failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace

void GgufWriter::Set(const std::string& key, GgufValue value) {
  for (auto& [k, v] : kv_) {
    if (k == key) {
      v = std::move(value);
      return;
    }
  }
  kv_.emplace_back(key, std::move(value));
}

void GgufWriter::AddTensor(std::string name, std::vector<uint64_t> dims, GgmlType type) {
  uint64_t n = 1;
  for (uint64_t d : dims) n *= d;
  const uint64_t bytes = GgmlRowBytes(static_cast<uint32_t>(type), n);
  tensors_.push_back({std::move(name), std::move(dims), type, data_bytes_, bytes});
  data_bytes_ += (bytes + alignment_ - 1) / alignment_ * alignment_;
}

absl::Status GgufWriter::WriteHeader(std::FILE* out) {
  std::string h;
  Put<uint32_t>(h, kGgufMagic);
  Put<uint32_t>(h, 3);
  Put<uint64_t>(h, tensors_.size());
  Put<uint64_t>(h, kv_.size());
  for (const auto& [key, value] : kv_) {
    PutString(h, key);
    Put<uint32_t>(h, static_cast<uint32_t>(value.type));
    PutValue(h, value);
  }
  for (const TensorInfo& t : tensors_) {
    PutString(h, t.name);
    Put<uint32_t>(h, static_cast<uint32_t>(t.dims.size()));
    for (uint64_t d : t.dims) Put<uint64_t>(h, d);
    Put<uint32_t>(h, static_cast<uint32_t>(t.type));
    Put<uint64_t>(h, t.offset);
  }
  h.resize((h.size() + alignment_ - 1) / alignment_ * alignment_, '\0');
  return WriteAll(out, h.data(), h.size());
}

absl::Status GgufWriter::WriteTensorData(std::FILE* out, std::span<const uint8_t> data) {
  if (next_tensor_ >= tensors_.size()) return absl::InternalError("more tensor data than declared tensors");
  const TensorInfo& t = tensors_[next_tensor_++];
  if (data.size() != t.bytes) {
    return absl::InternalError(absl::StrCat("tensor ", t.name, ": ", data.size(), " bytes, expected ", t.bytes));
  }
  static const char kZeros[256] = {};
  while (written_ < t.offset) {
    const size_t pad = std::min<uint64_t>(sizeof(kZeros), t.offset - written_);
    RETURN_IF_ERROR(WriteAll(out, kZeros, pad));
    written_ += pad;
  }
  RETURN_IF_ERROR(WriteAll(out, data.data(), data.size()));
  written_ += data.size();
  return absl::OkStatus();
}

}  // namespace ape
