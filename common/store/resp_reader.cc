#include "common/store/resp_reader.h"

#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/engine/status_macros.h"

namespace ape::redis {

RespReader::RespReader(Source source, size_t buffer_bytes) : source_(std::move(source)), buf_(buffer_bytes) {}

absl::Status RespReader::Fill() {
  if (pos_ == end_) {
    pos_ = end_ = 0;
  } else if (end_ == buf_.size()) {  // make room: move what is left to the front
    std::memmove(buf_.data(), buf_.data() + pos_, end_ - pos_);
    end_ -= pos_;
    pos_ = 0;
  }
  if (end_ == buf_.size()) return absl::DataLossError("redis reply: a line longer than the read buffer");
  ASSIGN_OR_RETURN(size_t n, source_(buf_.data() + end_, buf_.size() - end_));
  if (n == 0) return absl::UnavailableError("redis closed the connection in the middle of a reply");
  end_ += n;
  bytes_read_ += n;
  return absl::OkStatus();
}

absl::StatusOr<absl::string_view> RespReader::Line() {
  size_t scanned = pos_;
  for (;;) {
    const void* nl = std::memchr(buf_.data() + scanned, '\n', end_ - scanned);
    if (nl != nullptr) {
      const size_t at = static_cast<const char*>(nl) - buf_.data();
      if (at == pos_ || buf_[at - 1] != '\r') return absl::DataLossError("redis reply: a line not ended by \\r\\n");
      absl::string_view line(buf_.data() + pos_, at - 1 - pos_);
      pos_ = at + 1;
      return line;
    }
    const size_t scanned_from_pos = end_ - pos_;  // no \n up to end_
    RETURN_IF_ERROR(Fill());                      // may move the bytes to the front
    scanned = pos_ + scanned_from_pos;
  }
}

absl::StatusOr<int64_t> RespReader::Length(absl::string_view line, int64_t max) {
  int64_t n;
  if (line.size() < 2 || !absl::SimpleAtoi(line.substr(1), &n) || n < -1 || n > max) {
    return absl::DataLossError(absl::StrCat("redis reply: bad length in '", line.substr(0, 32), "'"));
  }
  return n;
}

absl::Status RespReader::Exact(char* dest, size_t n) {
  const size_t buffered = std::min(n, end_ - pos_);
  std::memcpy(dest, buf_.data() + pos_, buffered);
  pos_ += buffered;
  for (size_t done = buffered; done < n;) {
    ASSIGN_OR_RETURN(size_t got, source_(dest + done, n - done));
    if (got == 0) return absl::UnavailableError("redis closed the connection in the middle of a reply");
    done += got;
    bytes_read_ += got;
  }
  return absl::OkStatus();
}

absl::Status RespReader::Crlf() {
  char crlf[2];
  RETURN_IF_ERROR(Exact(crlf, 2));
  if (crlf[0] != '\r' || crlf[1] != '\n') return absl::DataLossError("redis reply: a bulk string not ended by \\r\\n");
  return absl::OkStatus();
}

absl::Status RespReader::SkipReply(int depth) {
  if (depth > 8) return absl::DataLossError("redis reply: arrays nested too deep");
  ASSIGN_OR_RETURN(absl::string_view line, Line());
  if (line.empty()) return absl::DataLossError("redis reply: an empty line");
  switch (line[0]) {
    case '+':
    case '-':
    case ':': return absl::OkStatus();
    case '$': {
      ASSIGN_OR_RETURN(int64_t len, Length(line, kMaxBulkBytes));
      if (len < 0) return absl::OkStatus();
      // Through the buffer, a buffer's worth at a time.
      for (int64_t left = len; left > 0;) {
        if (pos_ == end_) RETURN_IF_ERROR(Fill());
        const size_t take = std::min<size_t>(left, end_ - pos_);
        pos_ += take;
        left -= take;
      }
      return Crlf();
    }
    case '*': {
      ASSIGN_OR_RETURN(int64_t n, Length(line, int64_t{1} << 32));
      for (int64_t i = 0; i < n; ++i) RETURN_IF_ERROR(SkipReply(depth + 1));
      return absl::OkStatus();
    }
    default:
      return absl::DataLossError(absl::StrCat("redis reply: unknown type byte '", line.substr(0, 1), "'"));
  }
}

RespReader::Source SocketSource(int fd, std::string what) {
  return [fd, what = std::move(what)](char* dest, size_t n) -> absl::StatusOr<size_t> {
    for (;;) {
      const ssize_t got = ::recv(fd, dest, n, 0);
      if (got >= 0) return static_cast<size_t>(got);
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        return absl::UnavailableError(absl::StrCat("redis ", what, ": timed out reading a reply"));
      }
      return absl::UnavailableError(absl::StrCat("redis ", what, ": ", std::strerror(errno)));
    }
  };
}

}  // namespace ape::redis
