// Model loading: both formats, fingerprints, and broken files.
#include "common/engine/model.h"

#include <gtest/gtest.h>

#include "tests/gguf_writer.h"
#include "tests/test_util.h"

namespace ape {
namespace {

using ::ape::testing::GgufWriter;
using ::ape::testing::ReadAll;
using ::ape::testing::TempFile;
using ::ape::testing::TestData;

TEST(ModelTest, LoadsStories260K) {
  auto m = Model::Load(TestData("stories260K.bin"), TestData("tok512.bin"));
  ASSERT_TRUE(m.ok()) << m.status();
  const ModelConfig& c = (*m)->config();
  EXPECT_EQ(c.dim, 64);
  EXPECT_EQ(c.hidden_dim, 172);
  EXPECT_EQ(c.n_layers, 5);
  EXPECT_EQ(c.n_heads, 8);
  EXPECT_EQ(c.n_kv_heads, 4);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_TRUE(c.tied_output);
  EXPECT_EQ((*m)->fingerprint().size(), 32u);
  // Stable: loading again gives the same fingerprint.
  auto again = Model::Load(TestData("stories260K.bin"), TestData("tok512.bin"));
  EXPECT_EQ((*m)->fingerprint(), (*again)->fingerprint());
}

TEST(ModelTest, FingerprintCoversWeightsAndTokenizer) {
  std::string bytes = ReadAll(TestData("stories260K.bin"));
  auto base = Model::Load(TestData("stories260K.bin"), TestData("tok512.bin"));
  bytes[bytes.size() / 2] ^= 1;  // one weight bit
  TempFile changed(bytes);
  auto m2 = Model::Load(changed.path(), TestData("tok512.bin"));
  ASSERT_TRUE(m2.ok());
  EXPECT_NE((*base)->fingerprint(), (*m2)->fingerprint());
  std::string tok = ReadAll(TestData("tok512.bin"));
  tok[tok.size() - 1] ^= 1;  // one byte of the last piece
  TempFile tok_changed(tok);
  auto m3 = Model::Load(TestData("stories260K.bin"), tok_changed.path());
  ASSERT_TRUE(m3.ok());
  EXPECT_NE((*base)->fingerprint(), (*m3)->fingerprint());
}

TEST(ModelTest, LoadsGgufFixture) {
  auto m = Model::Load(TestData("format-fixtures/llama-2-tiny-random.gguf"));
  ASSERT_TRUE(m.ok()) << m.status();
  const ModelConfig& c = (*m)->config();
  EXPECT_EQ(c.dim, 8);
  EXPECT_EQ(c.n_layers, 1);
  EXPECT_EQ(c.hidden_dim, 32);
  EXPECT_EQ(c.n_heads, 2);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.rope_dim, 4);
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.context_length, 4096);
  EXPECT_EQ((*m)->tokenizer().vocab_size(), 32000);
  EXPECT_NE((*m)->weight_types().find("F16"), std::string::npos);
}

TEST(ModelTest, TruncatedFilesFailNamingTheFile) {
  for (const char* name : {"stories260K.bin", "format-fixtures/llama-2-tiny-random.gguf"}) {
    std::string bytes = ReadAll(TestData(name));
    for (size_t cut : {size_t{0}, size_t{10}, size_t{27}, size_t{29}, bytes.size() / 3, bytes.size() - 1}) {
      TempFile f(bytes.substr(0, cut));
      auto m = Model::Load(f.path(), TestData("tok512.bin"));
      ASSERT_FALSE(m.ok()) << name << " cut " << cut;
      EXPECT_NE(m.status().message().find(f.path()), std::string::npos) << m.status();
    }
  }
}

TEST(ModelTest, CorruptHeadersFailCleanly) {
  std::string bytes = ReadAll(TestData("stories260K.bin"));
  const int32_t bad_values[] = {0, -1, 7, 1 << 30};
  for (int field = 0; field < 7; ++field) {
    for (int32_t v : bad_values) {
      std::string b = bytes;
      std::memcpy(&b[field * 4], &v, 4);
      TempFile f(b);
      auto m = Model::Load(f.path(), TestData("tok512.bin"));
      if (m.ok()) continue;  // a few values still describe a consistent file
      EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << m.status();
    }
  }
  auto missing = Model::Load("/nonexistent/model.gguf");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  auto no_tok = Model::Load(TestData("stories260K.bin"));
  EXPECT_NE(no_tok.status().message().find("tokenizer"), std::string::npos);
}

// A crafted GGUF whose tensors have an unsupported type and dimensions that
// fit the (large) declared shape must be refused before anything is sized
// from those dimensions (it used to abort with std::bad_alloc).
TEST(ModelTest, UnsupportedHugeTensorsAreRefusedBeforeAllocating) {
  constexpr uint32_t kQ4K = 12;  // a GGML type the engine does not read
  for (bool rope_freqs : {false, true}) {
    GgufWriter w;
    w.KvStr("general.architecture", "llama");
    w.KvU32("llama.embedding_length", 1 << 16);
    w.KvU32("llama.feed_forward_length", 1 << 16);
    w.KvU32("llama.block_count", 1);
    w.KvU32("llama.attention.head_count", 256);
    w.Tensor("token_embd.weight", {uint64_t{1} << 16, uint64_t{1} << 22}, kQ4K, "");
    if (rope_freqs) w.Tensor("rope_freqs.weight", {uint64_t{1} << 39}, kQ4K, "");
    TempFile f(w.Finish(), ".gguf");
    auto m = Model::Load(f.path());
    ASSERT_FALSE(m.ok());
    EXPECT_NE(m.status().message().find(rope_freqs ? "rope_freqs" : "token_embd"), std::string::npos) << m.status();
  }
}

TEST(ModelTest, HeadsLargerThanTheKernelSupportsAreRefused) {
  GgufWriter w;
  w.KvStr("general.architecture", "llama");
  w.KvU32("llama.embedding_length", 512);
  w.KvU32("llama.feed_forward_length", 64);
  w.KvU32("llama.block_count", 1);
  w.KvU32("llama.attention.head_count", 1);  // head_dim 512 > kMaxHeadDim
  w.TensorF32("token_embd.weight", {512, 4}, std::vector<float>(512 * 4));
  TempFile f(w.Finish(), ".gguf");
  auto m = Model::Load(f.path());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnimplemented) << m.status();
  EXPECT_NE(m.status().message().find("head_dim 512"), std::string::npos) << m.status();
}

}  // namespace
}  // namespace ape
