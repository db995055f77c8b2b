// A read-only memory-mapped file. Model files can be many GB: we map them and
// hand parsers a byte span; pages are read by the OS as tensors are touched.
#ifndef APESERVE_COMMON_ENGINE_MAPPED_FILE_H_
#define APESERVE_COMMON_ENGINE_MAPPED_FILE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/statusor.h"

namespace ape {

class MappedFile {
 public:
  // Maps `path` read-only. NOT_FOUND / PERMISSION_DENIED / INTERNAL on failure.
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size) : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const uint8_t* data_;
  size_t size_;
};

// Reads a whole (small) file into a string.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_MAPPED_FILE_H_
