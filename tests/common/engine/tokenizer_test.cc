// Tokenizer against independent expectations: llama2.c encode() goldens for
// both llama2.c vocabularies; llama.cpp's test vectors (test-tokenizer-0's
// .inp/.out) for every GGUF vocabulary, SentencePiece (llama-spm, phi-3) and
// byte-level BPE (Llama 3, Qwen2, GPT-2, StarCoder, Falcon, DeepSeek-Coder);
// llama-tokenize's ids with special tokens parsed; transformers.js's ids for
// strings of our own; merges and pre-tokenizer splits worked out by hand; and
// decode(encode(s)) == s.
#include "common/engine/tokenizer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "absl/strings/str_split.h"
#include "common/engine/bpe_pretokenizer.h"
#include "common/engine/gguf.h"
#include "common/engine/mapped_file.h"
#include "common/engine/model.h"
#include "tests/gguf_writer.h"
#include "tests/test_util.h"

namespace ape {
namespace {

using ::ape::testing::GgufWriter;
using ::ape::testing::ReadAll;
using ::ape::testing::TestData;

constexpr char kLlama3[] = "families/vocab/ggml-vocab-llama-bpe.gguf";
constexpr char kQwen2[] = "families/vocab/ggml-vocab-qwen2.gguf";

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

// Each vocabulary once per process: the large ones take a while to load.
const Tokenizer& Vocab(const std::string& path) {
  static auto* cache = new std::map<std::string, Tokenizer>();
  auto it = cache->find(path);
  if (it == cache->end()) {
    auto tok = Tokenizer::FromGgufFile(TestData(path));
    EXPECT_TRUE(tok.ok()) << tok.status();
    it = cache->emplace(path, tok.ok() ? *std::move(tok) : Tokenizer()).first;
  }
  return it->second;
}

// llama.cpp's test vectors: `.inp` holds the strings, each followed by
// "\n__ggml_vocab_test__\n"; `.out` one line of ids per string (no BOS).
std::vector<std::pair<std::string, std::vector<int32_t>>> ReadVectors(const std::string& path) {
  std::vector<std::string> inputs = absl::StrSplit(ReadAll(TestData(path) + ".inp"), "\n__ggml_vocab_test__\n");
  EXPECT_EQ(inputs.back(), "");
  inputs.pop_back();
  std::vector<std::string> outputs = absl::StrSplit(ReadAll(TestData(path) + ".out"), '\n');
  EXPECT_EQ(outputs.back(), "");
  outputs.pop_back();
  EXPECT_EQ(inputs.size(), outputs.size()) << path;
  std::vector<std::pair<std::string, std::vector<int32_t>>> cases;
  for (size_t i = 0; i < std::min(inputs.size(), outputs.size()); ++i) {
    std::vector<int32_t> want;
    for (absl::string_view s : absl::StrSplit(outputs[i], ' ', absl::SkipEmpty()))
      want.push_back(std::stoi(std::string(s)));
    cases.push_back({inputs[i], want});
  }
  return cases;
}

// Every vector of `path` must match; prints the count.
void CheckVectors(const std::string& path, size_t expected_cases) {
  const Tokenizer& tok = Vocab(path);
  const auto cases = ReadVectors(path);
  size_t passed = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& [text, want] = cases[i];
    const std::vector<int32_t> got = tok.Encode(text, /*bos=*/false, /*eos=*/false);
    EXPECT_EQ(got, want) << path << " case " << i << ": [" << text << "]";
    passed += got == want;
  }
  EXPECT_EQ(cases.size(), expected_cases) << path;
  std::printf("%s: %zu/%zu vectors\n", path.c_str(), passed, cases.size());
}

TEST(TokenizerTest, GgufLlamaSpmMatchesLlamaCpp) { CheckVectors("vocab/ggml-vocab-llama-spm.gguf", 46); }
TEST(TokenizerTest, GgufPhi3MatchesLlamaCpp) { CheckVectors("vocab/ggml-vocab-phi-3.gguf", 46); }
TEST(TokenizerTest, Gpt2MatchesLlamaCpp) { CheckVectors("vocab/ggml-vocab-gpt-2.gguf", 46); }
TEST(TokenizerTest, StarcoderMatchesLlamaCpp) { CheckVectors("vocab/ggml-vocab-starcoder.gguf", 46); }
TEST(TokenizerTest, FalconMatchesLlamaCpp) { CheckVectors("vocab/ggml-vocab-falcon.gguf", 46); }
TEST(TokenizerTest, DeepseekCoderMatchesLlamaCpp) { CheckVectors("vocab/ggml-vocab-deepseek-coder.gguf", 46); }
TEST(TokenizerTest, Llama3MatchesLlamaCpp) { CheckVectors(kLlama3, 46); }
TEST(TokenizerTest, Qwen2MatchesLlamaCpp) { CheckVectors(kQwen2, 46); }

// Strings of our own (many scripts, code, emoji, odd spaces) against a second,
// independent implementation: transformers.js with the same tokenizer.json.
TEST(TokenizerTest, OwnStringsMatchTransformersJs) {
  auto golden = nlohmann::json::parse(ReadAll(TestData("families/vocab/oracle-strings.golden.json")));
  const Tokenizer& llama = Vocab(kLlama3);
  const Tokenizer& qwen = Vocab(kQwen2);
  int checked = 0;
  for (const auto& c : golden["cases"]) {
    const std::string text = c["text"];
    EXPECT_EQ(llama.Encode(text, false, false), c["llama-bpe"].get<std::vector<int32_t>>()) << text;
    EXPECT_EQ(qwen.Encode(text, false, false), c["qwen2"].get<std::vector<int32_t>>()) << text;
    EXPECT_EQ(qwen.DecodeAll(qwen.Encode(text, false, false)), text);
    ++checked;
  }
  EXPECT_EQ(checked, 40);
}

// llama-tokenize's ids (parse_special = true, BOS as the vocabulary says) for
// chat-formatted text, in both real byte-level vocabularies.
TEST(TokenizerTest, SpecialParsingMatchesLlamaCpp) {
  auto golden = nlohmann::json::parse(ReadAll(TestData("families/vocab/special-parsing.golden.json")));
  int checked = 0;
  for (const auto& c : golden["cases"]) {
    const Tokenizer& tok = Vocab("families/" + c["vocab"].get<std::string>());
    const std::string text = c["text"];
    EXPECT_EQ(tok.Encode(text, tok.add_bos(), /*eos=*/false, /*parse_special=*/true),
              c["ids"].get<std::vector<int32_t>>())
        << c["vocab"] << ": " << text;
    ++checked;
  }
  EXPECT_EQ(checked, 6);
}

// Without parse_special, control-token text is plain text. The golden's
// strings that name another family's tokens are plain text in both modes,
// which gives independent ids for "<|...|>" written as text.
TEST(TokenizerTest, ControlTokensAreTextUnlessAsked) {
  auto golden = nlohmann::json::parse(ReadAll(TestData("families/vocab/special-parsing.golden.json")));
  const auto& llama_case = golden["cases"][2];  // "<|im_start|>..." in Llama 3
  const auto& qwen_case = golden["cases"][5];   // "<|start_header_id|>..." in Qwen
  for (const auto* c : {&llama_case, &qwen_case}) {
    const Tokenizer& tok = Vocab("families/" + (*c)["vocab"].get<std::string>());
    EXPECT_EQ(tok.Encode((*c)["text"].get<std::string>(), tok.add_bos(), false, /*parse_special=*/false),
              (*c)["ids"].get<std::vector<int32_t>>());
  }
  // The Qwen chat text: no control ids without parse_special, but the
  // user-defined <think> tokens still match (as in llama.cpp and HF).
  const Tokenizer& qwen = Vocab(kQwen2);
  const std::string chat = golden["cases"][4]["text"];
  std::vector<int32_t> plain = qwen.Encode(chat, false, false, /*parse_special=*/false);
  for (int32_t id : plain) EXPECT_NE(qwen.kind(id), Tokenizer::Kind::kControl) << id;
  EXPECT_NE(std::find(plain.begin(), plain.end(), 151667), plain.end());  // <think>
  EXPECT_EQ(qwen.DecodeAll(plain), chat);
  // Llama 3's own header tokens, written as text.
  const Tokenizer& llama = Vocab(kLlama3);
  const std::string header = "<|start_header_id|>user<|end_header_id|><|eot_id|>";
  plain = llama.Encode(header, false, false, /*parse_special=*/false);
  for (int32_t id : plain) EXPECT_LT(id, 128000) << id;
  EXPECT_EQ(llama.DecodeAll(plain), header);
}

// The sets llama.cpp prints for these files (families/README.md), and add_bos.
TEST(TokenizerTest, EndOfGenerationAndBos) {
  const Tokenizer& llama = Vocab(kLlama3);
  EXPECT_EQ(llama.end_of_generation_ids(), (std::vector<int32_t>{128001, 128009}));
  EXPECT_TRUE(llama.IsEndOfGeneration(128009));  // <|eot_id|>
  EXPECT_FALSE(llama.IsEndOfGeneration(128000));
  EXPECT_TRUE(llama.add_bos());  // no add_bos key: llama.cpp's default for pre llama-bpe
  const Tokenizer& qwen = Vocab(kQwen2);
  EXPECT_EQ(qwen.end_of_generation_ids(), (std::vector<int32_t>{128247, 151643, 151645, 151662, 151663, 151664}));
  EXPECT_FALSE(qwen.add_bos());  // tokenizer.ggml.add_bos_token = false
  EXPECT_EQ(qwen.pre(), "qwen2");
  EXPECT_EQ(Vocab("vocab/ggml-vocab-llama-spm.gguf").end_of_generation_ids(), (std::vector<int32_t>{2}));
}

// decode(encode(s)) == s, byte for byte, for every test string, odd bytes
// and long runs included, in every byte-level vocabulary. Three vocabularies
// cannot hold every byte, as in HF: StarCoder and Falcon have no token for
// 0xFE and 0xFF (never in UTF-8), Falcon none for 0x0B, and DeepSeek-Coder
// has "þ"/"ÿ" only as user-defined tokens (which decode as UTF-8 text); they
// get the valid UTF-8 strings without 0x0B.
TEST(TokenizerTest, ByteLevelRoundTrip) {
  std::vector<std::string> texts = {
      "\t\r\n \r\n",
      std::string("nul\0byte", 8),
      "nel\xc2\x85 nbsp\xc2\xa0| ff\x0c",
      std::string(5000, ' ') + "x" + std::string(3000, '\n'),
      std::string(4000, 'a'),
      std::string(3000, '7'),
      "日本語のテキスト، العربية, ελληνικά, 한국어 🦙🦙 e\xcc\x81",
      "<|im_start|><|eot_id|></s><think>",
  };
  for (const auto& [text, ids] : ReadVectors(kLlama3)) texts.push_back(text);
  std::vector<std::string> any_bytes = {"\xff\xfe not UTF-8 \xc3", "\xe2\x82 truncated", "\xed\xa0\x80 surrogate",
                                        "\xf4\x90\x80\x80 too big", "vt\x0b"};
  const std::pair<const char*, bool> vocabs[] = {{kLlama3, true},
                                                 {kQwen2, true},
                                                 {"vocab/ggml-vocab-gpt-2.gguf", true},
                                                 {"vocab/ggml-vocab-starcoder.gguf", false},
                                                 {"vocab/ggml-vocab-falcon.gguf", false},
                                                 {"vocab/ggml-vocab-deepseek-coder.gguf", false}};
  for (const auto& [path, all_bytes] : vocabs) {
    const Tokenizer& tok = Vocab(path);
    for (const auto* set : {&texts, &any_bytes}) {
      if (set == &any_bytes && !all_bytes) continue;
      for (const std::string& text : *set) {
        EXPECT_EQ(tok.DecodeAll(tok.Encode(text, false, false)), text) << path << ": [" << text.substr(0, 80) << "]";
      }
    }
  }
  // Random bytes (mostly not UTF-8) and random mixes of odd characters.
  std::mt19937 rng(12);
  const std::vector<std::string> parts = {"a", " ",  "\n",   "\t",           "7",        "'s",
                                          "é", "日", "🦙", "\xe2\x80\x8b", "\xc2\x85", "<|"};
  for (int i = 0; i < 200; ++i) {
    std::string text;
    for (int j = rng() % 40; j > 0; --j)
      text += i % 2 ? std::string(1, static_cast<char>(rng())) : parts[rng() % parts.size()];
    for (const char* path : {kLlama3, kQwen2}) {
      EXPECT_EQ(Vocab(path).DecodeAll(Vocab(path).Encode(text, false, false)), text) << path << " random " << i;
    }
  }
  // The gap, as llama.cpp has it: a byte without a token is dropped.
  const Tokenizer& falcon = Vocab("vocab/ggml-vocab-falcon.gguf");
  EXPECT_EQ(falcon.DecodeAll(falcon.Encode("a\x0b", false, false)), "a");
}

// The tiny models' 512-token vocabulary (families/models, made by
// llama.cpp): the goldens' prompt ids (parse_special = false) and
// llama-tokenize's ids (parse_special = true, ends in the eos text).
TEST(TokenizerTest, TinyFamilyVocabulariesMatchLlamaCpp) {
  for (const char* name : {"tiny-random-qwen2-F32", "tiny-random-qwen3-F32", "tiny-random-llama31-F32"}) {
    const std::string model = TestData(std::string("families/models/") + name + ".gguf");
    if (!std::ifstream(model)) GTEST_SKIP() << model << " is not in tests/data";
    auto tok = Tokenizer::FromGgufFile(model);
    ASSERT_TRUE(tok.ok()) << tok.status();
    auto golden = nlohmann::json::parse(ReadAll(TestData(std::string("families/goldens/") + name + ".gguf.json")));
    EXPECT_EQ(tok->add_bos(), golden["add_bos"].get<bool>()) << name;
    for (const auto& c : golden["cases"]) {
      EXPECT_EQ(tok->Encode(c["text"].get<std::string>(), tok->add_bos(), false),
                c["prompt_ids"].get<std::vector<int32_t>>())
          << name << " " << c["name"];
    }
    const auto& t = golden["text_tokenization"];
    EXPECT_EQ(tok->Encode(t["text"].get<std::string>(), tok->add_bos(), false, /*parse_special=*/true),
              t["ids"].get<std::vector<int32_t>>())
        << name;
  }
}

// A hand-made vocabulary, merges worked out by hand.
std::string TinyBpeGguf(const std::vector<std::string>& merges, const std::string& pre = "gpt-2") {
  GgufWriter w;
  w.KvStr("tokenizer.ggml.model", "gpt2");
  w.KvStr("tokenizer.ggml.pre", pre);
  // 0..4 single bytes, then merge results; "Ġ" (U+0120) is GPT-2's space.
  w.KvStrArray("tokenizer.ggml.tokens", {"a", "b", "c", "Ġ", "<|end|>", "ab", "bc", "abc", "aa", "Ġa"});
  w.KvI32Array("tokenizer.ggml.token_type", {1, 1, 1, 1, 3, 1, 1, 1, 1, 1});
  w.KvStrArray("tokenizer.ggml.merges", merges);
  w.KvU32("tokenizer.ggml.bos_token_id", 4);
  w.KvU32("tokenizer.ggml.eos_token_id", 4);
  return w.Finish();
}

absl::StatusOr<Tokenizer> ParseTiny(const std::string& bytes) {
  auto g = GgufFile::Parse({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}, "tiny.gguf");
  if (!g.ok()) return g.status();
  return Tokenizer::FromGguf(*g);
}

TEST(TokenizerTest, MergesApplyByRankThenLeftmost) {
  auto t1 = ParseTiny(TinyBpeGguf({"a b", "ab c", "b c"}));
  ASSERT_TRUE(t1.ok()) << t1.status();
  EXPECT_EQ(t1->Encode("abc", false, false), (std::vector<int32_t>{7}));  // (a b) then (ab c)
  auto t2 = ParseTiny(TinyBpeGguf({"b c", "a b", "ab c"}));
  ASSERT_TRUE(t2.ok()) << t2.status();
  EXPECT_EQ(t2->Encode("abc", false, false), (std::vector<int32_t>{0, 6}));  // (b c) first; no "a bc"
  auto t3 = ParseTiny(TinyBpeGguf({"a a", "Ġ a"}));
  ASSERT_TRUE(t3.ok()) << t3.status();
  EXPECT_EQ(t3->Encode("aaa", false, false), (std::vector<int32_t>{8, 0}));  // leftmost pair first
  // GPT-2 splits " aaa" as one word " aaa": ranks make "a a" before "Ġ a".
  EXPECT_EQ(t3->Encode(" aaa", false, false), (std::vector<int32_t>{3, 8, 0}));
  EXPECT_EQ(t3->Encode("a<|end|>", true, false, true), (std::vector<int32_t>{4, 0, 4}));
  EXPECT_EQ(t3->Encode("a<|end|>", false, false, false), (std::vector<int32_t>{0}));  // no tokens for "<|end|>"
  EXPECT_EQ(t3->DecodeAll(std::vector<int32_t>{3, 8, 4, 9}), " aa a");  // control token decodes to nothing
}

TEST(TokenizerTest, RejectsBadByteLevelVocabularies) {
  auto no_space = ParseTiny(TinyBpeGguf({"ab"}));
  EXPECT_EQ(no_space.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(no_space.status().message().find("tiny.gguf: tokenizer.ggml.merges[0] 'ab'"), std::string::npos)
      << no_space.status();
  auto unknown = ParseTiny(TinyBpeGguf({"a b", "c d"}));
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("merges[1] 'c d'"), std::string::npos) << unknown.status();
  auto pre = ParseTiny(TinyBpeGguf({"a b"}, "no-such-pre"));
  EXPECT_EQ(pre.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(pre.status().message().find("tiny.gguf: tokenizer.ggml.pre 'no-such-pre'"), std::string::npos)
      << pre.status();
  auto missing = Tokenizer::FromGgufFile(TestData("no-such-file.gguf"));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

// Pre-tokenizer splits worked out by hand from the regexes.
TEST(TokenizerTest, PreTokenizerSplits) {
  const auto split = [](const std::string& pre, absl::string_view text) {
    auto p = BpePreTokenizer::ForName(pre);
    EXPECT_TRUE(p.ok()) << p.status();
    std::vector<absl::string_view> pieces;
    p->Split(text, &pieces);
    return std::vector<std::string>(pieces.begin(), pieces.end());
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(split("gpt-2", "Hello world's  12345\n"), (V{"Hello", " world", "'s", " ", " 12345", "\n"}));
  EXPECT_EQ(split("llama-bpe", "I'M 12345!!\n\nx"), (V{"I", "'M", " ", "123", "45", "!!\n\n", "x"}));
  EXPECT_EQ(split("qwen2", "a 123"), (V{"a", " ", "1", "2", "3"}));
  EXPECT_EQ(split("starcoder", "x 42"), (V{"x", " ", "4", "2"}));
  EXPECT_EQ(split("falcon", "a1234,b"), (V{"a", "123", "4", ",", "b"}));
  EXPECT_EQ(split("deepseek-coder", "ab 中文\n1"), (V{"ab", " ", "中文", "\n", "1"}));
  // Invalid UTF-8 is kept byte for byte.
  EXPECT_EQ(split("llama-bpe", "a\xff\xfe b"), (V{"a", "\xff\xfe", " b"}));
}

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
