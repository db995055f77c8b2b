// GGUF parser: a real fixture, synthetic files with every value type and
// tensor type, and malformed bytes (truncations, bit flips, lies in counts).
#include "common/engine/gguf.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "common/engine/half.h"
#include "tests/gguf_writer.h"
#include "tests/test_util.h"

namespace ape {
namespace {

using ::ape::testing::GgufWriter;
using ::ape::testing::ReadAll;
using ::ape::testing::TestData;

std::span<const uint8_t> Bytes(const std::string& s) { return {reinterpret_cast<const uint8_t*>(s.data()), s.size()}; }

TEST(GgufTest, ParsesRealFixture) {
  std::string bytes = ReadAll(TestData("format-fixtures/llama-2-tiny-random.gguf"));
  auto g = GgufFile::Parse(Bytes(bytes), "fixture");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->version(), 3u);
  EXPECT_EQ(*g->GetString("general.architecture"), "llama");
  EXPECT_EQ(*g->GetInt("llama.embedding_length"), 8);
  EXPECT_EQ(*g->GetInt("llama.block_count"), 1);
  EXPECT_EQ(*g->GetInt("llama.attention.head_count"), 2);
  EXPECT_EQ(g->GetStringArray("tokenizer.ggml.tokens")->size(), 32000u);
  auto emb = g->FindTensor("token_embd.weight");
  ASSERT_TRUE(emb.ok());
  EXPECT_EQ((*emb)->dims, (std::vector<uint64_t>{8, 32000}));
  EXPECT_EQ((*emb)->data.size(), 8u * 32000 * 2);  // F16
  EXPECT_FALSE(g->FindTensor("no.such.tensor").ok());
  EXPECT_EQ(g->GetInt("general.architecture").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(GgufTest, EveryValueTypeAndTensorType) {
  GgufWriter w;
  std::string s;
  GgufWriter::Put<uint8_t>(s, 200);
  w.KvRaw("u8", 0, s);
  s.clear();
  GgufWriter::Put<int8_t>(s, -5);
  w.KvRaw("i8", 1, s);
  s.clear();
  GgufWriter::Put<uint16_t>(s, 60000);
  w.KvRaw("u16", 2, s);
  s.clear();
  GgufWriter::Put<int16_t>(s, -30000);
  w.KvRaw("i16", 3, s);
  s.clear();
  w.KvU32("u32", 4000000000u);
  GgufWriter::Put<int32_t>(s, -7);
  w.KvRaw("i32", 5, s);
  s.clear();
  w.KvF32("f32", 0.25f);
  w.KvBool("bool", true);
  w.KvStr("str", "hello");
  GgufWriter::Put<uint64_t>(s, 1ull << 40);
  w.KvRaw("u64", 10, s);
  s.clear();
  GgufWriter::Put<int64_t>(s, -(1ll << 40));
  w.KvRaw("i64", 11, s);
  s.clear();
  GgufWriter::Put<double>(s, 1.5);
  w.KvRaw("f64", 12, s);
  s.clear();
  // An array of arrays of u8.
  GgufWriter::Put<uint32_t>(s, 9);
  GgufWriter::Put<uint64_t>(s, 2);
  for (int a = 0; a < 2; ++a) {
    GgufWriter::Put<uint32_t>(s, 0);
    GgufWriter::Put<uint64_t>(s, 3);
    s += "abc";
  }
  w.KvRaw("nested", 9, s);
  s.clear();
  w.KvU32("general.alignment", 64);

  // Tensors: values chosen exactly representable in every type.
  std::vector<float> vals(64);
  for (int i = 0; i < 64; ++i) vals[i] = (i - 32) * 0.5f;
  w.TensorF32("f32", {64}, vals);
  std::string f16, bf16, q8;
  for (float v : vals) {
    GgufWriter::Put<uint16_t>(f16, FloatToHalf(v));
    uint32_t u;
    std::memcpy(&u, &v, 4);
    GgufWriter::Put<uint16_t>(bf16, u >> 16);
  }
  for (int b = 0; b < 2; ++b) {  // Q8_0: scale 0.5, q = v / 0.5
    GgufWriter::Put<uint16_t>(q8, FloatToHalf(0.5f));
    for (int j = 0; j < 32; ++j) GgufWriter::Put<int8_t>(q8, static_cast<int8_t>(vals[b * 32 + j] / 0.5f));
  }
  w.Tensor("f16", {32, 2}, 1, f16);
  w.Tensor("bf16", {64}, 30, bf16);
  w.Tensor("q8", {64}, 8, q8);
  w.Tensor("q41", {32}, 3, std::string(20, '\0'));  // Q4_1: a type this project does not read
  std::string file = w.Finish(64);

  auto g = GgufFile::Parse(Bytes(file), "synthetic");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(*g->GetInt("u8"), 200);
  EXPECT_EQ(*g->GetInt("i8"), -5);
  EXPECT_EQ(*g->GetInt("u16"), 60000);
  EXPECT_EQ(*g->GetInt("i16"), -30000);
  EXPECT_EQ(*g->GetInt("u32"), 4000000000ll);
  EXPECT_EQ(*g->GetInt("i32"), -7);
  EXPECT_EQ(*g->GetFloat("f32"), 0.25);
  EXPECT_TRUE(*g->GetBool("bool"));
  EXPECT_EQ(*g->GetString("str"), "hello");
  EXPECT_EQ(*g->GetInt("u64"), 1ll << 40);
  EXPECT_EQ(*g->GetInt("i64"), -(1ll << 40));
  EXPECT_EQ(*g->GetFloat("f64"), 1.5);
  const GgufValue& nested = g->metadata().at("nested");
  ASSERT_EQ(nested.array.size(), 2u);
  EXPECT_EQ(nested.array[1].array.size(), 3u);
  EXPECT_EQ(nested.array[1].array[2].i, 'c');
  for (const char* name : {"f32", "f16", "bf16", "q8"}) {
    const GgufTensor* t = *g->FindTensor(name);
    EXPECT_EQ(t->offset % 64, 0u);
    std::vector<float> out(t->num_elements);
    ASSERT_TRUE(DequantizeTensor(*t, out.data()).ok()) << name;
    EXPECT_EQ(out, vals) << name;
  }
  std::vector<float> out(32);
  auto st = DequantizeTensor(**g->FindTensor("q41"), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("Q4_1"), std::string::npos) << st;
}

TEST(GgufTest, RejectsBadHeaders) {
  std::string ok = GgufWriter().Finish();
  EXPECT_TRUE(GgufFile::Parse(Bytes(ok), "empty").ok());
  std::string bad_magic = ok;
  bad_magic[0] = 'X';
  EXPECT_NE(GgufFile::Parse(Bytes(bad_magic), "f").status().message().find("magic"), std::string::npos);
  std::string v1 = ok;
  v1[4] = 1;
  EXPECT_EQ(GgufFile::Parse(Bytes(v1), "f").status().code(), absl::StatusCode::kUnimplemented);
  // A kv count far beyond the file must not allocate or loop.
  std::string huge = ok;
  std::memset(&huge[16], 0x7f, 8);
  EXPECT_EQ(GgufFile::Parse(Bytes(huge), "f").status().code(), absl::StatusCode::kInvalidArgument);
  // A string length that lies.
  GgufWriter w;
  w.KvStr("k", "value");
  std::string lie = w.Finish();
  std::memset(&lie[24], 0xff, 8);
  EXPECT_FALSE(GgufFile::Parse(Bytes(lie), "f").ok());
}

TEST(GgufTest, EveryTruncationOfTheFixtureFailsCleanly) {
  std::string bytes = ReadAll(TestData("format-fixtures/llama-2-tiny-random.gguf"));
  auto full = GgufFile::Parse(Bytes(bytes), "fixture");
  ASSERT_TRUE(full.ok());
  size_t data_start = bytes.size() - full->data_section().size();
  // Every cut inside the header region in steps, then some in the data.
  for (size_t cut = 0; cut < bytes.size(); cut += (cut < data_start ? 331 : 4099)) {
    std::string part = bytes.substr(0, cut);  // own allocation: ASan sees overreads
    auto g = GgufFile::Parse(Bytes(part), "cut");
    EXPECT_FALSE(g.ok()) << "cut at " << cut;
  }
}

TEST(GgufTest, BitFlipsNeverCrash) {
  std::string bytes = ReadAll(TestData("format-fixtures/llama-2-tiny-random.gguf"));
  auto full = GgufFile::Parse(Bytes(bytes), "fixture");
  size_t data_start = bytes.size() - full->data_section().size();
  std::mt19937 rng(7);
  int failures = 0;
  for (int iter = 0; iter < 300; ++iter) {
    std::string mutated = bytes.substr(0, data_start + 4096);
    for (int f = 0; f < 3; ++f) mutated[rng() % data_start] ^= static_cast<char>(1 << (rng() % 8));
    auto g = GgufFile::Parse(Bytes(mutated), "flipped");
    if (!g.ok()) ++failures;  // either outcome is fine; crashing is not
  }
  EXPECT_GT(failures, 0);
}

}  // namespace
}  // namespace ape
