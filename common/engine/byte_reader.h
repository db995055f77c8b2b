// Bounds-checked little-endian reads from a byte span. Every parser of
// untrusted bytes (GGUF, llama2.c checkpoints, tokenizer files, KV blocks)
// reads through this, so a truncated input is an error, never an overread.
#ifndef APESERVE_COMMON_ENGINE_BYTE_READER_H_
#define APESERVE_COMMON_ENGINE_BYTE_READER_H_

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ape {

class ByteReader {
 public:
  // `what` names the input in error messages (e.g. a file path).
  ByteReader(std::span<const uint8_t> bytes, std::string what) : bytes_(bytes), what_(std::move(what)) {}

  size_t offset() const { return offset_; }
  size_t remaining() const { return bytes_.size() - offset_; }
  const std::string& what() const { return what_; }

  // Reads a trivially copyable little-endian value (this project runs on
  // little-endian hosts only; see CMakeLists.txt).
  template <typename T>
  absl::Status Read(T* out, absl::string_view field) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (remaining() < sizeof(T)) return Truncated(field, sizeof(T));
    std::memcpy(out, bytes_.data() + offset_, sizeof(T));
    offset_ += sizeof(T);
    return absl::OkStatus();
  }

  // Returns a view of the next `n` bytes and advances past them.
  absl::Status ReadSpan(size_t n, std::span<const uint8_t>* out, absl::string_view field) {
    if (remaining() < n) return Truncated(field, n);
    *out = bytes_.subspan(offset_, n);
    offset_ += n;
    return absl::OkStatus();
  }

  absl::Status ReadString(size_t n, std::string* out, absl::string_view field) {
    std::span<const uint8_t> s;
    absl::Status st = ReadSpan(n, &s, field);
    if (!st.ok()) return st;
    out->assign(reinterpret_cast<const char*>(s.data()), s.size());
    return absl::OkStatus();
  }

  absl::Status Seek(size_t offset, absl::string_view field) {
    if (offset > bytes_.size()) return Truncated(field, offset - bytes_.size());
    offset_ = offset;
    return absl::OkStatus();
  }

  absl::Status Error(absl::string_view message) const {
    return absl::InvalidArgumentError(absl::StrCat(what_, ": ", message, " (at byte ", offset_, ")"));
  }

 private:
  absl::Status Truncated(absl::string_view field, size_t need) const {
    return absl::InvalidArgumentError(absl::StrCat(what_, ": truncated while reading ", field, " (need ", need,
                                                   " bytes at offset ", offset_, ", ", remaining(), " left)"));
  }

  std::span<const uint8_t> bytes_;
  std::string what_;
  size_t offset_ = 0;
};

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_BYTE_READER_H_
