// RespReader on byte streams cut at every place: it must give the same
// lines and bulk bytes however the source splits them, and reject what is
// not RESP.
#include "common/store/resp_reader.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>

namespace ape::redis {
namespace {

// A source giving `bytes` in pieces of at most `piece` bytes.
RespReader::Source PiecesOf(const std::string& bytes, size_t piece) {
  auto at = std::make_shared<size_t>(0);
  return [&bytes, piece, at](char* dest, size_t n) -> absl::StatusOr<size_t> {
    const size_t k = std::min({n, piece, bytes.size() - *at});
    std::copy_n(bytes.data() + *at, k, dest);
    *at += k;
    return k;
  };
}

TEST(RespReaderTest, LinesAndBulkStringsWhateverTheCuts) {
  std::string payload(100000, '\0');
  std::mt19937 rng(3);
  for (auto& c : payload) c = static_cast<char>(rng());
  const std::string stream = "*2\r\n$1\r\n0\r\n$" + std::to_string(payload.size()) + "\r\n" + payload +
                             "\r\n-WRONGTYPE Operation\r\n*0\r\n";
  for (size_t piece : {1, 2, 3, 7, 100, 4096, 1 << 20}) {
    for (size_t buffer : {32, 64, 65536}) {  // >= the longest line
      SCOPED_TRACE(testing::Message() << "piece " << piece << " buffer " << buffer);
      RespReader rd(PiecesOf(stream, piece), buffer);
      auto line = rd.Line();
      ASSERT_TRUE(line.ok()) << line.status();
      EXPECT_EQ(*line, "*2");
      EXPECT_EQ(*RespReader::Length(*line, 10), 2);
      line = rd.Line();
      ASSERT_TRUE(line.ok());
      EXPECT_EQ(*line, "$1");
      char zero;
      ASSERT_TRUE(rd.Exact(&zero, 1).ok());
      EXPECT_EQ(zero, '0');
      ASSERT_TRUE(rd.Crlf().ok());
      line = rd.Line();
      ASSERT_TRUE(line.ok());
      auto len = RespReader::Length(*line, RespReader::kMaxBulkBytes);
      ASSERT_TRUE(len.ok());
      ASSERT_EQ(*len, static_cast<int64_t>(payload.size()));
      std::string got(*len, 'x');
      ASSERT_TRUE(rd.Exact(got.data(), got.size()).ok());
      EXPECT_EQ(got, payload);
      ASSERT_TRUE(rd.Crlf().ok());
      line = rd.Line();
      ASSERT_TRUE(line.ok());
      EXPECT_EQ(*line, "-WRONGTYPE Operation");
      EXPECT_TRUE(rd.SkipReply().ok());  // *0
      EXPECT_EQ(rd.bytes_read(), stream.size());
      EXPECT_EQ(rd.Line().status().code(), absl::StatusCode::kUnavailable);  // end of stream
    }
  }
}

TEST(RespReaderTest, SkipsWholeRepliesOfEveryType) {
  const std::string stream = "*3\r\n$3\r\nabc\r\n*2\r\n:1\r\n$-1\r\n+OK\r\n$5\r\nhello\r\n:42\r\n";
  for (size_t piece : {1, 5, 1000}) {
    RespReader rd(PiecesOf(stream, piece), 16);
    ASSERT_TRUE(rd.SkipReply().ok());
    ASSERT_TRUE(rd.SkipReply().ok());
    auto line = rd.Line();
    ASSERT_TRUE(line.ok());
    EXPECT_EQ(*line, ":42");
  }
}

TEST(RespReaderTest, RejectsWhatIsNotResp) {
  for (const std::string bad : {"$abc\r\n", "$-2\r\n", "*1\n", "?what\r\n", "$5\r\nhelloXY"}) {
    SCOPED_TRACE(bad);
    RespReader rd(PiecesOf(bad, 2), 64);
    absl::Status s = rd.SkipReply();
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  }
  // Too long a length for a bulk string; too long a line for the buffer.
  EXPECT_FALSE(RespReader::Length("$99999999999", RespReader::kMaxBulkBytes).ok());
  const std::string long_line = std::string(100, '+') + "\r\n";
  RespReader rd(PiecesOf(long_line, 7), 16);
  EXPECT_EQ(rd.Line().status().code(), absl::StatusCode::kDataLoss);
  // A stream that ends inside a bulk string.
  const std::string cut = "$10\r\nabc";
  RespReader rd2(PiecesOf(cut, 3), 16);
  EXPECT_EQ(rd2.SkipReply().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace ape::redis
