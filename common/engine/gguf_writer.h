// GGUF (version 3) writer: the layout gguf.h reads. Metadata values are
// GgufValues (any of the 13 types, arrays nested); tensors are declared
// first (name, dims, type), so that the header with every tensor's offset
// can be written before the data, which then streams tensor by tensor.
//
//   header | kv pairs | tensor infos | pad to alignment | tensor 0 | pad | tensor 1 | ...
#ifndef APESERVE_COMMON_ENGINE_GGUF_WRITER_H_
#define APESERVE_COMMON_ENGINE_GGUF_WRITER_H_

#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "common/engine/gguf.h"

namespace ape {

class GgufWriter {
 public:
  explicit GgufWriter(uint64_t alignment = 32) : alignment_(alignment) {}

  // Adds or replaces a key (keys keep the order they were first set in).
  void Set(const std::string& key, GgufValue value);
  // Declares the next tensor; its data must be GgmlRowBytes(type, elements) bytes.
  void AddTensor(std::string name, std::vector<uint64_t> dims, GgmlType type);

  // Writes the header and tensor directory to `out` (a new file).
  absl::Status WriteHeader(std::FILE* out);
  // Writes the data of the next declared tensor, with the padding before it.
  absl::Status WriteTensorData(std::FILE* out, std::span<const uint8_t> data);

 private:
  struct TensorInfo {
    std::string name;
    std::vector<uint64_t> dims;
    GgmlType type;
    uint64_t offset;  // within the data section
    uint64_t bytes;
  };
  uint64_t alignment_;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<TensorInfo> tensors_;
  uint64_t data_bytes_ = 0;  // declared so far, padded
  size_t next_tensor_ = 0;
  uint64_t written_ = 0;  // bytes of the data section written
};

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_GGUF_WRITER_H_
