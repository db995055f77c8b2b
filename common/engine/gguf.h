// GGUF (versions 2 and 3) reader. Parses a byte span: the header, every
// metadata key/value (all 13 value types, arrays nested), the tensor
// directory and the aligned data section. Nothing is copied but metadata;
// tensor data stays a view into the span (normally an mmap'd file).
//
// Layout (little-endian), from the GGUF spec:
//   u32 magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
//   kv_count x { string key | u32 value_type | value }
//   tensor_count x { string name | u32 n_dims | u64 dims[n_dims] | u32 ggml_type
//                    | u64 offset (relative to the data section) }
//   padding to `general.alignment` (default 32) | data section
//   string = u64 length | bytes (no terminator)
//   array  = u32 element_type | u64 count | elements
// dims[0] is the fastest-varying (row length): a matrix [rows][cols] is
// stored as dims = {cols, rows}.
#ifndef APESERVE_COMMON_ENGINE_GGUF_H_
#define APESERVE_COMMON_ENGINE_GGUF_H_

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ape {

enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

struct GgufValue {
  GgufType type = GgufType::kUint8;
  // Scalars: integers and bool in `i` (uint64 values above INT64_MAX are
  // rejected at parse time), floats in `f`, strings in `str`.
  int64_t i = 0;
  double f = 0;
  std::string str;
  // Arrays: element type and elements.
  GgufType array_type = GgufType::kUint8;
  std::vector<GgufValue> array;
};

// GGML tensor types this project knows the block layout of (the numbers
// are GGML's; common/engine/quant.h describes each layout). Others are
// listed by name only, and their tensors carry no data.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};
// Elements per block and bytes per block of a type; 0 for unknown types.
int GgmlBlockElements(uint32_t type);
int GgmlBlockBytes(uint32_t type);
// Bytes of a row (or tensor) of n elements; 0 if the type is unknown or n
// is not a whole number of blocks.
uint64_t GgmlRowBytes(uint32_t type, uint64_t n);
const char* GgmlTypeName(uint32_t type);

struct GgufTensor {
  std::string name;
  std::vector<uint64_t> dims;  // dims[0] fastest varying
  uint32_t type = 0;           // a GgmlType value (checked at load)
  uint64_t offset = 0;         // relative to the data section
  uint64_t num_elements = 0;
  std::span<const uint8_t> data;  // exactly the tensor's bytes
};

class GgufFile {
 public:
  // Parses `bytes`; `what` (normally the path) names the file in errors.
  // Any truncation, bad count, unknown type, misaligned or out-of-range
  // tensor is INVALID_ARGUMENT; an unsupported version is UNIMPLEMENTED.
  static absl::StatusOr<GgufFile> Parse(std::span<const uint8_t> bytes, std::string what);

  uint32_t version() const { return version_; }
  const std::string& what() const { return what_; }
  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  // Bytes of the data section (everything after the directory and padding).
  std::span<const uint8_t> data_section() const { return data_section_; }

  bool Has(const std::string& key) const { return metadata_.count(key) > 0; }
  absl::StatusOr<int64_t> GetInt(const std::string& key) const;
  absl::StatusOr<double> GetFloat(const std::string& key) const;
  absl::StatusOr<bool> GetBool(const std::string& key) const;
  absl::StatusOr<std::string> GetString(const std::string& key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(const std::string& key) const;
  absl::StatusOr<std::vector<float>> GetFloatArray(const std::string& key) const;
  absl::StatusOr<std::vector<int32_t>> GetIntArray(const std::string& key) const;

  // Looks up a tensor by name; NOT_FOUND if absent.
  absl::StatusOr<const GgufTensor*> FindTensor(const std::string& name) const;

 private:
  absl::StatusOr<const GgufValue*> Get(const std::string& key) const;

  std::string what_;
  uint32_t version_ = 0;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> tensor_index_;
  std::span<const uint8_t> data_section_;
};

// Converts a tensor of a weight type (quant.h: F32, F16, BF16, Q8_0, Q4_0,
// Q4_K, Q6_K) to float32 into `out` (num_elements floats). UNIMPLEMENTED for
// other types.
absl::Status DequantizeTensor(const GgufTensor& tensor, float* out);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_GGUF_H_
