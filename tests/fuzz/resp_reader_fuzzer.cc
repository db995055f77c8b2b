// libFuzzer target: a Redis reply stream as the decoder reads it for KV
// entries (common/store/resp_reader.h), cut into pieces of every size: the
// reader must give errors, never read past a buffer or loop. The first byte
// picks the piece size and the read buffer, the rest is the stream, read as
// a sequence of whole replies (SkipReply), and once more as headers and
// bulk bodies taken into a caller's buffer (what RedisStore::Read does).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/store/resp_reader.h"

namespace {

ape::redis::RespReader::Source Pieces(const uint8_t* data, size_t size, size_t piece) {
  auto at = std::make_shared<size_t>(0);
  return [=](char* dest, size_t n) -> absl::StatusOr<size_t> {
    const size_t k = std::min({n, piece, size - *at});
    std::copy_n(data + *at, k, dest);
    *at += k;
    return k;
  };
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const size_t piece = 1 + (data[0] & 15) * 37;
  const size_t buffer = 16 << (data[0] >> 6);
  ++data;
  --size;
  {
    ape::redis::RespReader rd(Pieces(data, size, piece), buffer);
    while (rd.SkipReply().ok()) {
    }
  }
  ape::redis::RespReader rd(Pieces(data, size, piece), buffer);
  std::vector<char> body;
  for (int replies = 0; replies < 64; ++replies) {
    auto line = rd.Line();
    if (!line.ok() || line->empty()) break;
    if ((*line)[0] != '$') continue;
    auto len = ape::redis::RespReader::Length(*line, 1 << 20);  // the fuzzer's memory, not Redis's limit
    if (!len.ok()) break;
    if (*len < 0) continue;
    body.resize(*len);
    if (!rd.Exact(body.data(), body.size()).ok() || !rd.Crlf().ok()) break;
  }
  return 0;
}
