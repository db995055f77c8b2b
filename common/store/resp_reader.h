// Reads Redis replies (RESP2) from a byte stream, for the one reply whose
// size matters: a KV entry's chunks (HGETALL). hiredis reads a socket 16 KiB
// at a time into a growing buffer, copies each bulk string into a reply
// object, and the caller copies it once more; for the hundreds of MB a long
// request loads, those copies and the page faults of fresh buffers cost
// about as much as Redis itself. Here a bulk string's header is read into a
// small buffer, and its bytes go from the stream straight into memory the
// caller chose.
//
// The replies parsed (what HGETALL answers):
//   *<n>\r\n             an array of n elements; *0 or *-1: no such key
//   $<len>\r\n<bytes>\r\n a bulk string; $-1: nil
//   -<message>\r\n       an error (WRONGTYPE, OOM, ...)
//   +<text>\r\n, :<int>\r\n simple string and integer (skipped as elements)
// Anything else, or a length out of range, is a protocol error: the stream is
// then out of sync and must be dropped.
#ifndef APESERVE_COMMON_STORE_RESP_READER_H_
#define APESERVE_COMMON_STORE_RESP_READER_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ape::redis {

class RespReader {
 public:
  // Reads up to `n` bytes into `dest`: > 0 bytes read, 0 at end of stream,
  // or a status (UNAVAILABLE: timeout, reset...). Blocks until some bytes
  // are there.
  using Source = std::function<absl::StatusOr<size_t>(char* dest, size_t n)>;
  // Largest bulk string accepted (Redis's own proto-max-bulk-len is 512 MB
  // by default and can be raised; an entry is split into chunks below it).
  static constexpr int64_t kMaxBulkBytes = int64_t{4} << 30;

  explicit RespReader(Source source, size_t buffer_bytes = 64 << 10);

  // One line, without its \r\n; valid until the next call.
  absl::StatusOr<absl::string_view> Line();
  // The length in a "$<len>" or "*<n>" header line (after its type byte);
  // -1 for nil. DATA_LOSS when it is not a number in [-1, max].
  static absl::StatusOr<int64_t> Length(absl::string_view line, int64_t max);
  // Exactly `n` bytes into `dest`: what is buffered, then straight from the
  // source.
  absl::Status Exact(char* dest, size_t n);
  // The \r\n that ends a bulk string.
  absl::Status Crlf();
  // Reads and drops one whole reply (arrays recursively, up to depth 8).
  absl::Status SkipReply(int depth = 0);

  // Bytes taken from the source so far.
  uint64_t bytes_read() const { return bytes_read_; }

 private:
  absl::Status Fill();  // reads more into buf_[end_..]

  Source source_;
  std::vector<char> buf_;
  size_t pos_ = 0, end_ = 0;  // buffered bytes not yet taken: buf_[pos_, end_)
  uint64_t bytes_read_ = 0;
};

// A Source reading a socket (blocking, with the socket's own receive timeout:
// hiredis sets SO_RCVTIMEO). `what` names the server in errors.
RespReader::Source SocketSource(int fd, std::string what);

}  // namespace ape::redis

#endif  // APESERVE_COMMON_STORE_RESP_READER_H_
