// QuantizeGguf against llama.cpp's quantizer: the fixtures of
// tests/data/families/models/ in F16, BF16, Q8_0, Q4_0, Q4_K and Q6_K were
// made from the F32 files by `llama-quantize --pure` (tests/data/README.md).
// Quantizing the same F32 files here must give the same tensors, byte for
// byte, and the same metadata but for what the tool itself stamps.
#include "common/engine/quantize_model.h"

#include <gtest/gtest.h>

#include "common/engine/gguf.h"
#include "common/engine/model.h"
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
    for (const char* type_name : {"F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K"}) {
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
