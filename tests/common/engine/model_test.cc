// Model loading: both formats, fingerprints, and broken files.
#include "common/engine/model.h"

#include <gtest/gtest.h>

#include "common/engine/gguf.h"
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
  EXPECT_EQ((*m)->tokenizer_model(), "llama");
  EXPECT_EQ((*m)->chat_template(), "");
  // Pinned: Llama fingerprints (and so every cached KV entry) must not change
  // when the loader learns new architectures.
  EXPECT_EQ((*m)->CanonicalConfig(),
            "arch=llama dim=8 hidden=32 layers=1 heads=2 kv_heads=2 head_dim=4 vocab=32000 "
            "rope_dim=4 rope_base=10000 eps=9.99999975e-06 tied=0 factors=");
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
  constexpr uint32_t kQ4_1 = 3;  // a GGML type the engine does not read
  for (bool rope_freqs : {false, true}) {
    GgufWriter w;
    w.KvStr("general.architecture", "llama");
    w.KvU32("llama.embedding_length", 1 << 16);
    w.KvU32("llama.feed_forward_length", 1 << 16);
    w.KvU32("llama.block_count", 1);
    w.KvU32("llama.attention.head_count", 256);
    w.Tensor("token_embd.weight", {uint64_t{1} << 16, uint64_t{1} << 22}, kQ4_1, "");
    if (rope_freqs) w.Tensor("rope_freqs.weight", {uint64_t{1} << 39}, kQ4_1, "");
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

// A one-layer GGUF of `arch` (dim 8, 2 heads of 4, 1 KV head, FFN 16, vocab
// 8) holding every tensor that architecture needs but `skip`, all 0.01.
// Callers may add keys and tensors before Finish().
GgufWriter TinyGguf(const std::string& arch, const std::string& skip = "") {
  GgufWriter w;
  w.KvStr("general.architecture", arch);
  w.KvU32(arch + ".embedding_length", 8);
  w.KvU32(arch + ".feed_forward_length", 16);
  w.KvU32(arch + ".block_count", 1);
  w.KvU32(arch + ".attention.head_count", 2);
  w.KvU32(arch + ".attention.head_count_kv", 1);
  auto t = [&](const std::string& name, std::vector<uint64_t> dims) {
    if (name == skip) return;
    uint64_t n = 1;
    for (uint64_t d : dims) n *= d;
    w.TensorF32(name, dims, std::vector<float>(n, 0.01f));
  };
  t("token_embd.weight", {8, 8});
  t("blk.0.attn_norm.weight", {8});
  t("blk.0.attn_q.weight", {8, 8});
  t("blk.0.attn_k.weight", {8, 4});
  t("blk.0.attn_v.weight", {8, 4});
  if (arch == "qwen2") {
    t("blk.0.attn_q.bias", {8});
    t("blk.0.attn_k.bias", {4});
    t("blk.0.attn_v.bias", {4});
  }
  if (arch == "qwen3") {
    t("blk.0.attn_q_norm.weight", {4});
    t("blk.0.attn_k_norm.weight", {4});
  }
  t("blk.0.attn_output.weight", {8, 8});
  t("blk.0.ffn_norm.weight", {8});
  t("blk.0.ffn_gate.weight", {8, 16});
  t("blk.0.ffn_up.weight", {8, 16});
  t("blk.0.ffn_down.weight", {16, 8});
  t("output_norm.weight", {8});
  return w;
}

// Config and weights of GGUF `bytes` (which must outlive the result).
absl::StatusOr<GgufModelParts> Parts(const std::string& bytes) {
  auto g = GgufFile::Parse({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}, "tiny.gguf");
  if (!g.ok()) return g.status();
  return LoadGgufModelParts(*g);
}

TEST(ModelTest, EachArchitectureGetsItsAttentionParts) {
  for (const char* arch : {"llama", "qwen2", "qwen3"}) {
    const std::string bytes = TinyGguf(arch).Finish();
    auto p = Parts(bytes);
    ASSERT_TRUE(p.ok()) << arch << ": " << p.status();
    const ModelConfig& c = p->config;
    EXPECT_EQ(c.architecture, arch);
    EXPECT_EQ(c.rope_style, std::string(arch) == "llama" ? RopeStyle::kInterleaved : RopeStyle::kNeox);
    EXPECT_EQ(c.qkv_bias, std::string(arch) == "qwen2");
    EXPECT_EQ(c.qk_norm, std::string(arch) == "qwen3");
    EXPECT_EQ(c.head_dim, 4);
    EXPECT_EQ(c.rope_base, 10000.f);  // llama.cpp's default when the key is absent
    EXPECT_TRUE(c.tied_output);
    EXPECT_EQ(p->weights.layers[0].bv.size(), c.qkv_bias ? 4u : 0u);
    EXPECT_EQ(p->weights.layers[0].q_norm.size(), c.qk_norm ? 4u : 0u);
    // Parameters: embedding 64, per layer 2*8 norms + 64+32+32+64 attention
    // + 3*128 FFN, final norm 8; biases 16 (qwen2), head norms 8 (qwen3).
    EXPECT_EQ(c.num_params(), 64 + 16 + 192 + 384 + 8 + (c.qkv_bias ? 16 : 0) + (c.qk_norm ? 8 : 0));
  }
}

TEST(ModelTest, RopeScalingFollowsLlamaCpp) {
  struct Case {
    const char* type;  // "" = key absent (llama.cpp then assumes "linear")
    const char* factor_key;
    float factor, want_scale;
  };
  for (const Case& k : {Case{"", "rope.scaling.factor", 4.f, 0.25f}, Case{"linear", "rope.scaling.factor", 2.f, 0.5f},
                        Case{"none", "rope.scaling.factor", 4.f, 1.f}, Case{"", "rope.scale_linear", 8.f, 0.125f},
                        Case{"linear", "rope.scaling.factor", 0.f, 1.f}}) {
    GgufWriter w = TinyGguf("llama");
    if (*k.type) w.KvStr("llama.rope.scaling.type", k.type);
    w.KvF32(std::string("llama.") + k.factor_key, k.factor);
    const std::string bytes = w.Finish();
    auto p = Parts(bytes);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->config.rope_freq_scale, k.want_scale) << k.type << " " << k.factor_key << " " << k.factor;
  }
}

// What the engine cannot compute is refused by name, never dropped.
TEST(ModelTest, UnsupportedFeaturesAreRefusedByName) {
  struct Case {
    std::string bytes;
    absl::StatusCode code;
    std::string needle;
  };
  auto with = [](GgufWriter w, auto add) {
    add(w);
    return w.Finish();
  };
  const Case cases[] = {
      {TinyGguf("gemma").Finish(), absl::StatusCode::kUnimplemented, "architecture 'gemma'"},
      {with(TinyGguf("qwen2"), [](GgufWriter& w) { w.KvStr("qwen2.rope.scaling.type", "yarn"); }),
       absl::StatusCode::kUnimplemented, "rope scaling type 'yarn'"},
      {with(TinyGguf("llama"), [](GgufWriter& w) { w.KvF32("llama.rope.scaling.attn_factor", 1.5f); }),
       absl::StatusCode::kUnimplemented, "attn_factor"},
      {with(TinyGguf("llama"), [](GgufWriter& w) { w.KvU32("llama.expert_count", 8); }),
       absl::StatusCode::kUnimplemented, "expert_count"},
      {with(TinyGguf("qwen3"), [](GgufWriter& w) { w.KvU32("qwen3.attention.value_length", 8); }),
       absl::StatusCode::kUnimplemented, "value head size 8"},
      {with(TinyGguf("qwen3"), [](GgufWriter& w) { w.TensorF32("blk.0.attn_q.bias", {8}, std::vector<float>(8)); }),
       absl::StatusCode::kUnimplemented, "tensor blk.0.attn_q.bias is not used"},
      {with(TinyGguf("llama"), [](GgufWriter& w) { w.KvU32("llama.vocab_size", 9); }),
       absl::StatusCode::kInvalidArgument, "llama.vocab_size = 9"},
      {TinyGguf("qwen2", "blk.0.attn_k.bias").Finish(), absl::StatusCode::kNotFound, "blk.0.attn_k.bias"},
      {TinyGguf("qwen3", "blk.0.attn_k_norm.weight").Finish(), absl::StatusCode::kNotFound, "attn_k_norm"},
  };
  for (const Case& c : cases) {
    auto p = Parts(c.bytes);
    ASSERT_FALSE(p.ok()) << c.needle;
    EXPECT_EQ(p.status().code(), c.code) << p.status();
    EXPECT_NE(p.status().message().find(c.needle), std::string::npos) << p.status();
    EXPECT_NE(p.status().message().find("tiny.gguf"), std::string::npos) << p.status();
  }
}

}  // namespace
}  // namespace ape
