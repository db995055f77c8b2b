// Tokenizer against independent expectations: llama2.c encode() goldens for
// both llama2.c vocabularies, and llama.cpp's SPM token ids for the GGUF
// vocabularies (llama-spm, phi-3).
#include "common/engine/tokenizer.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_split.h"
#include "common/engine/gguf.h"
#include "common/engine/mapped_file.h"
#include "common/engine/model.h"
#include "tests/test_util.h"

namespace ape {
namespace {

using ::ape::testing::ReadAll;
using ::ape::testing::TestData;

Tokenizer LoadLlama2c(const std::string& name, int vocab) {
  auto file = MappedFile::Open(TestData(name));
  EXPECT_TRUE(file.ok()) << file.status();
  auto t = Tokenizer::FromLlama2c((*file)->bytes(), vocab, name);
  EXPECT_TRUE(t.ok()) << t.status();
  return *std::move(t);
}

TEST(TokenizerTest, Llama2cGoldenBothVocabularies) {
  auto golden = nlohmann::json::parse(ReadAll(TestData("tokenizer.golden.json")));
  const std::pair<std::string, int> vocabs[] = {{"tok512.bin", 512}, {"tokenizer.bin", 32000}};
  int checked = 0;
  for (const auto& [name, size] : vocabs) {
    Tokenizer tok = LoadLlama2c(name, size);
    for (const auto& c : golden["cases"][name]) {
      std::string text = c["text"];
      std::vector<int32_t> want = c["tokens"].get<std::vector<int32_t>>();
      EXPECT_EQ(tok.Encode(text, /*bos=*/true, /*eos=*/false), want) << name << ": " << text;
      // Decoding after BOS gives the text back (all cases are round-trippable).
      EXPECT_EQ(tok.DecodeAll(std::span(want).subspan(1), want[0]), text) << name;
      ++checked;
    }
  }
  EXPECT_GE(checked, 8);
}

void CheckGgufVocab(const std::string& stem) {
  const std::string base = TestData("vocab/" + stem);
  auto file = MappedFile::Open(base);
  ASSERT_TRUE(file.ok()) << file.status();
  auto gguf = GgufFile::Parse((*file)->bytes(), base);
  ASSERT_TRUE(gguf.ok()) << gguf.status();
  auto tok = Tokenizer::FromGguf(*gguf);
  ASSERT_TRUE(tok.ok()) << tok.status();
  // Each case is followed by "\n__ggml_vocab_test__\n"; .out has one line per case.
  std::vector<std::string> inputs = absl::StrSplit(ReadAll(base + ".inp"), "\n__ggml_vocab_test__\n");
  ASSERT_EQ(inputs.back(), "");
  inputs.pop_back();
  std::vector<std::string> outputs = absl::StrSplit(ReadAll(base + ".out"), '\n');
  ASSERT_EQ(outputs.back(), "");
  outputs.pop_back();
  ASSERT_EQ(inputs.size(), outputs.size()) << stem;
  for (size_t i = 0; i < inputs.size(); ++i) {
    std::vector<int32_t> want;
    for (absl::string_view s : absl::StrSplit(outputs[i], ' ', absl::SkipEmpty()))
      want.push_back(std::stoi(std::string(s)));
    EXPECT_EQ(tok->Encode(inputs[i], false, false), want) << stem << " case " << i << ": [" << inputs[i] << "]";
  }
}

TEST(TokenizerTest, GgufLlamaSpmMatchesLlamaCpp) { CheckGgufVocab("ggml-vocab-llama-spm.gguf"); }
TEST(TokenizerTest, GgufPhi3MatchesLlamaCpp) { CheckGgufVocab("ggml-vocab-phi-3.gguf"); }

TEST(TokenizerTest, GgufDecodeRoundTrip) {
  auto model = Model::Load(TestData("format-fixtures/llama-2-tiny-random.gguf"));
  ASSERT_TRUE(model.ok()) << model.status();
  const Tokenizer& tok = (*model)->tokenizer();
  for (std::string text : {"Hello world", "Führer of 🦙 llamas\n\tand tabs", "  two spaces"}) {
    auto ids = tok.Encode(text, true, false);
    EXPECT_EQ(tok.DecodeAll(std::span(ids).subspan(1), ids[0]), text);
  }
}

TEST(TokenizerTest, RejectsTruncatedAndOversizedFiles) {
  std::string bytes = ReadAll(TestData("tok512.bin"));
  for (size_t cut : {size_t{0}, size_t{3}, size_t{4}, size_t{100}, bytes.size() - 1}) {
    auto t = Tokenizer::FromLlama2c({reinterpret_cast<const uint8_t*>(bytes.data()), cut}, 512, "tok512.bin");
    ASSERT_FALSE(t.ok()) << cut;
    EXPECT_NE(t.status().message().find("tok512.bin"), std::string::npos) << t.status();
  }
  // The right file for a smaller vocabulary leaves trailing bytes.
  auto t = Tokenizer::FromLlama2c({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}, 300, "tok512.bin");
  EXPECT_FALSE(t.ok());
}

}  // namespace
}  // namespace ape
