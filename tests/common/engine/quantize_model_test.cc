// QuantizeGguf against llama.cpp's quantizer: the fixtures of
// tests/data/families/models/ in F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K, Q5_0, Q5_1 and Q5_K were
// made from the F32 files by `llama-quantize --pure` (tests/data/README.md).
// Quantizing the same F32 files here must give the same tensors, byte for
// byte, and the same metadata but for what the tool itself stamps.
#include "common/engine/quantize_model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "common/engine/gguf.h"
#include "common/engine/gguf_writer.h"
#include "common/engine/model.h"
#include "common/engine/quant.h"
#include "common/engine/transformer.h"
#include "tests/test_util.h"

namespace ape {
namespace {

using ::ape::testing::ReadAll;
using ::ape::testing::TempFile;
using ::ape::testing::TestData;

std::span<const uint8_t> Bytes(const std::string& s) { return {reinterpret_cast<const uint8_t*>(s.data()), s.size()}; }

TEST(QuantizeModelTest, SameTensorsAsLlamaQuantize) {
  for (const char* arch : {"qwen2", "qwen3", "llama31"}) {
    const std::string f32_path = TestData(std::string("families/models/tiny-random-") + arch + "-F32.gguf");
    const std::string f32_bytes = ReadAll(f32_path);
    auto f32 = GgufFile::Parse(Bytes(f32_bytes), f32_path);
    ASSERT_TRUE(f32.ok()) << f32.status();
    for (const char* type_name : {"F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K"}) {
      SCOPED_TRACE(std::string(arch) + " " + type_name);
      auto type = ParseQuantizeType(type_name);
      ASSERT_TRUE(type.ok()) << type.status();
      TempFile out("", ".gguf");
      auto result = QuantizeGguf(*f32, *type, out.path());
      ASSERT_TRUE(result.ok()) << result.status();
      EXPECT_TRUE(result->fallbacks.empty());

      const std::string ours_bytes = ReadAll(out.path());
      EXPECT_EQ(result->out_bytes, ours_bytes.size());
      auto ours = GgufFile::Parse(Bytes(ours_bytes), "ours");
      ASSERT_TRUE(ours.ok()) << ours.status();
      const std::string theirs_path =
          TestData(std::string("families/models/tiny-random-") + arch + "-" + type_name + ".gguf");
      const std::string theirs_bytes = ReadAll(theirs_path);
      auto theirs = GgufFile::Parse(Bytes(theirs_bytes), theirs_path);
      ASSERT_TRUE(theirs.ok()) << theirs.status();

      // (llama-quantize writes the tensors in another order: match by name.)
      ASSERT_EQ(ours->tensors().size(), theirs->tensors().size());
      for (const GgufTensor& a : ours->tensors()) {
        auto found = theirs->FindTensor(a.name);
        ASSERT_TRUE(found.ok()) << found.status();
        const GgufTensor& b = **found;
        EXPECT_EQ(a.dims, b.dims) << a.name;
        EXPECT_EQ(GgmlTypeName(a.type), std::string(GgmlTypeName(b.type))) << a.name;
        ASSERT_EQ(a.data.size(), b.data.size()) << a.name;
        size_t differing = 0;
        for (size_t j = 0; j < a.data.size(); ++j) differing += a.data[j] != b.data[j];
        EXPECT_EQ(differing, 0u) << a.name << ": " << differing << " of " << a.data.size() << " bytes differ";
      }
      // Metadata: the same keys and values, file type included.
      EXPECT_EQ(*ours->GetInt("general.file_type"), *theirs->GetInt("general.file_type"));
      for (const auto& [key, value] : theirs->metadata()) {
        ASSERT_TRUE(ours->Has(key)) << key;
        const GgufValue& v = ours->metadata().at(key);
        EXPECT_EQ(static_cast<int>(v.type), static_cast<int>(value.type)) << key;
        EXPECT_EQ(v.i, value.i) << key;
        EXPECT_EQ(v.str, value.str) << key;
        EXPECT_EQ(v.array.size(), value.array.size()) << key;
      }
      // And the engine loads it.
      auto model = Model::Load(out.path());
      ASSERT_TRUE(model.ok()) << model.status();
      EXPECT_NE((*model)->weight_types().find(std::string(type_name) + " x"), std::string::npos);
    }
  }
}

// A GGUF of float32 matrices (no model around them) with the given row
// lengths, named as layer weights; values from a fixed formula.
std::string MatricesGguf(const std::vector<uint64_t>& cols, int rows) {
  GgufWriter w;
  std::vector<std::vector<float>> data;
  for (size_t i = 0; i < cols.size(); ++i) {
    w.AddTensor("blk." + std::to_string(i) + ".ffn_up.weight", {cols[i], static_cast<uint64_t>(rows)}, GgmlType::kF32);
    std::vector<float> v(cols[i] * rows);
    for (size_t j = 0; j < v.size(); ++j) v[j] = std::sin(0.37 * j + i) * (1 + j % 7);
    data.push_back(std::move(v));
  }
  TempFile file("", ".gguf");
  std::FILE* f = std::fopen(file.path().c_str(), "wb");
  EXPECT_TRUE(w.WriteHeader(f).ok());
  for (const auto& v : data)
    EXPECT_TRUE(w.WriteTensorData(f, {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(float)}).ok());
  std::fclose(f);
  return ReadAll(file.path());
}

// Rows that are not whole super-blocks take llama.cpp's fallback
// (llama_tensor_get_type): Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, F16 when even 32
// does not divide them; the data is that type's quantizer's, row by row.
TEST(QuantizeModelTest, KQuantFallbacksAreLlamaCpps) {
  const std::string in_bytes = MatricesGguf({512, 96, 48}, 3);
  auto in = GgufFile::Parse(Bytes(in_bytes), "matrices");
  ASSERT_TRUE(in.ok()) << in.status();
  struct Case {
    GgmlType target;
    std::vector<GgmlType> want;
  };
  for (const Case& c : {Case{GgmlType::kQ4_K, {GgmlType::kQ4_K, GgmlType::kQ5_0, GgmlType::kF16}},
                        Case{GgmlType::kQ5_K, {GgmlType::kQ5_K, GgmlType::kQ5_1, GgmlType::kF16}},
                        Case{GgmlType::kQ6_K, {GgmlType::kQ6_K, GgmlType::kQ8_0, GgmlType::kF16}},
                        Case{GgmlType::kQ5_0, {GgmlType::kQ5_0, GgmlType::kQ5_0, GgmlType::kF32}}}) {
    SCOPED_TRACE(GgmlTypeName(static_cast<uint32_t>(c.target)));
    TempFile out("", ".gguf");
    auto result = QuantizeGguf(*in, c.target, out.path());
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->fallbacks.size(), static_cast<size_t>(std::count_if(c.want.begin(), c.want.end(),
                                                                          [&](GgmlType t) { return t != c.target; })));
    const std::string out_bytes = ReadAll(out.path());
    auto got = GgufFile::Parse(Bytes(out_bytes), "out");
    ASSERT_TRUE(got.ok()) << got.status();
    for (size_t i = 0; i < c.want.size(); ++i) {
      const GgufTensor& src = in->tensors()[i];
      const GgufTensor& dst = got->tensors()[i];
      ASSERT_EQ(GgmlTypeName(dst.type), std::string(GgmlTypeName(static_cast<uint32_t>(c.want[i])))) << dst.name;
      const int64_t n = static_cast<int64_t>(src.dims[0]);
      const size_t row_bytes = GgmlRowBytes(dst.type, n);
      std::vector<uint8_t> row(row_bytes);
      for (int r = 0; r < 3; ++r) {
        QuantizeRow(c.want[i], reinterpret_cast<const float*>(src.data.data()) + r * n, row.data(), n);
        EXPECT_EQ(0, std::memcmp(row.data(), dst.data.data() + r * row_bytes, row_bytes)) << dst.name << " row " << r;
      }
    }
  }
}

// Models in the types llama.cpp's fixtures here do not cover (Q5_0 and Q5_1,
// which Q4_K_M / Q5_K_M files hold where rows are 896 long, and Q5_K) load
// and compute what their weights, expanded to float32, compute: the only
// difference is the 8-bit rounding of the activations (the tolerance is
// families_test's for the quantized types).
class FiveBitModelTest : public ::testing::TestWithParam<GgmlType> {};

TEST_P(FiveBitModelTest, MatchesItsFloatExpansion) {
  const GgmlType type = GetParam();
  const std::string name = GgmlTypeName(static_cast<uint32_t>(type));
  const std::string f32_path = TestData("families/models/tiny-random-qwen2-F32.gguf");
  const std::string f32_bytes = ReadAll(f32_path);
  auto f32 = GgufFile::Parse(Bytes(f32_bytes), f32_path);
  ASSERT_TRUE(f32.ok()) << f32.status();
  TempFile q5("", ".gguf"), expanded("", ".gguf");
  ASSERT_TRUE(QuantizeGguf(*f32, type, q5.path()).ok());
  const std::string q5_bytes = ReadAll(q5.path());
  auto q5_file = GgufFile::Parse(Bytes(q5_bytes), "q5");
  ASSERT_TRUE(q5_file.ok()) << q5_file.status();
  ASSERT_TRUE(QuantizeGguf(*q5_file, GgmlType::kF32, expanded.path()).ok());
  auto quant = Model::Load(q5.path());
  auto floats = Model::Load(expanded.path());
  ASSERT_TRUE(quant.ok()) << quant.status();
  ASSERT_TRUE(floats.ok()) << floats.status();
  EXPECT_NE((*quant)->weight_types().find(name + " x"), std::string::npos) << (*quant)->weight_types();
  EXPECT_EQ((*floats)->weight_types().find(name), std::string::npos) << (*floats)->weight_types();

  const ModelConfig& c = (*quant)->config();
  std::vector<int32_t> tokens, positions;
  for (int i = 0; i < 24; ++i) {
    tokens.push_back((i * 131 + 7) % c.vocab_size);
    positions.push_back(i);
  }
  auto logits = [&](const Model& m) {
    Transformer tf(m, 32);
    KvCache cache(m.config(), 32);
    std::vector<float> out(tokens.size() * c.vocab_size);
    tf.Forward(tokens, positions, cache, ApeParams{}, out.data(), /*all_logits=*/true);
    return out;
  };
  const std::vector<float> a = logits(**quant), b = logits(**floats);
  double max_diff = 0, max_abs = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(a[i] - b[i])));
    max_abs = std::max(max_abs, static_cast<double>(std::fabs(b[i])));
  }
  std::printf("%s model vs its float expansion: max |logit difference| %.4g (max |logit| %.4g)\n", name.c_str(),
              max_diff, max_abs);
  EXPECT_GT(max_abs, 0.1);
  EXPECT_LE(max_diff, 3e-2 * std::max(1.0, max_abs));
}

INSTANTIATE_TEST_SUITE_P(Types, FiveBitModelTest, ::testing::Values(GgmlType::kQ5_0, GgmlType::kQ5_1, GgmlType::kQ5_K),
                         [](const auto& info) { return std::string(GgmlTypeName(static_cast<uint32_t>(info.param))); });

TEST(QuantizeModelTest, RefusesWhatItCannotDo) {
  EXPECT_EQ(ParseQuantizeType("Q3_K").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseQuantizeType("q4_k").status().code(), absl::StatusCode::kInvalidArgument);
  const std::string f32_bytes = ReadAll(TestData("families/models/tiny-random-qwen2-F32.gguf"));
  auto f32 = GgufFile::Parse(Bytes(f32_bytes), "qwen2");
  ASSERT_TRUE(f32.ok());
  auto r = QuantizeGguf(*f32, GgmlType::kQ4_K, "/nonexistent-dir/out.gguf");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << r.status();
}

}  // namespace
}  // namespace ape
