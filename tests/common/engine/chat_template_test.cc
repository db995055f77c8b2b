// Chat formats: family detection on the real templates of tests/data's
// vocabularies and on templates written out below (Llama 2, Mistral v0.3,
// Qwen2, Qwen2.5: their published Jinja, cut to the parts that render a
// system and a user message); each family's rendering against the string
// its Jinja template writes (worked out by hand from the template text);
// tokenizing against llama.cpp's ids for chat-formatted strings
// (special-parsing.golden.json) and against Encode(rendering,
// parse_special=true); client text is never parsed for special tokens.
// tests/e2e/chat_test.py renders the real templates with Jinja itself.
#include "common/engine/chat_template.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "common/engine/gguf.h"
#include "common/engine/mapped_file.h"
#include "tests/test_util.h"

namespace ape {
namespace {

using ::ape::testing::ReadAll;
using ::ape::testing::TestData;

constexpr char kLlama3Vocab[] = "families/vocab/ggml-vocab-llama-bpe.gguf";
constexpr char kQwenVocab[] = "families/vocab/ggml-vocab-qwen2.gguf";
constexpr char kSpmVocab[] = "vocab/ggml-vocab-llama-spm.gguf";
constexpr char kPhi3Vocab[] = "vocab/ggml-vocab-phi-3.gguf";

// meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json chat_template.
constexpr char kLlama2Template[] =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif "
    "%}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}{% set content = "
    "'<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
    "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + "
    "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif "
    "%}{% endfor %}";
// Mistral-7B-Instruct-v0.3's, without the tool-calling branches.
constexpr char kMistralV3Template[] =
    "{%- if messages[0][\"role\"] == \"system\" %}\n    {%- set system_message = messages[0][\"content\"] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif "
    "%}\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message[\"role\"] == \"user\" %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- else %}\n            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n        {%- endif "
    "%}\n    {%- elif message[\"role\"] == \"assistant\" %}\n"
    "        {{- \" \" + message[\"content\"]|trim + eos_token}}\n    {%- endif %}\n{%- endfor %}\n";
// Qwen2-7B-Instruct's.
constexpr char kQwen2Template[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|im_start|>assistant\\n' }}{% endif %}";
// Qwen2.5-7B-Instruct's system part (the tools branch has the default as a
// separate literal, which must not be taken for template code).
constexpr char kQwen25Template[] =
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n";

std::string TemplateOf(const std::string& name) {
  auto file = MappedFile::Open(TestData(name));
  EXPECT_TRUE(file.ok()) << file.status();
  auto gguf = GgufFile::Parse((*file)->bytes(), name);
  EXPECT_TRUE(gguf.ok()) << gguf.status();
  if (!gguf->Has("tokenizer.chat_template")) return "";
  return *gguf->GetString("tokenizer.chat_template");
}

Tokenizer LoadVocab(const std::string& name) {
  auto tok = Tokenizer::FromGgufFile(TestData(name));
  EXPECT_TRUE(tok.ok()) << tok.status();
  return *std::move(tok);
}

ChatSegments Build(const ChatFormat& f, absl::string_view system, absl::string_view query, bool has_contexts) {
  auto s = BuildChatSegments(f, system, query, has_contexts);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *std::move(s) : ChatSegments{};
}

std::string Render(const ChatSegments& s, absl::string_view contexts = "") {
  return RenderChatPieces(s.prefix) + std::string(contexts) + RenderChatPieces(s.query);
}

TEST(ChatFormatTest, DetectsTheFamiliesOfRealTemplates) {
  const ChatFormat llama3 = DetectChatFormat(TemplateOf(kLlama3Vocab));
  EXPECT_EQ(llama3.family, ChatFamily::kLlama3);
  EXPECT_TRUE(llama3.strip);  // `message['content'] | trim`
  const ChatFormat qwen3 = DetectChatFormat(TemplateOf(kQwenVocab));
  EXPECT_EQ(qwen3.family, ChatFamily::kChatMl);
  EXPECT_FALSE(qwen3.strip);
  EXPECT_EQ(qwen3.default_system, "");  // Qwen3 writes a system turn only for a system message
  EXPECT_EQ(DetectChatFormat(TemplateOf(kPhi3Vocab)).family, ChatFamily::kUnknown);  // <|user|> ... <|end|>
  EXPECT_EQ(DetectChatFormat(TemplateOf(kSpmVocab)).family, ChatFamily::kNone);      // no template
  EXPECT_EQ(DetectChatFormat("").family, ChatFamily::kNone);
  EXPECT_EQ(DetectChatFormat("{{ messages[0]['content'] }}").family, ChatFamily::kUnknown);
}

TEST(ChatFormatTest, DetectsDetailsOfWrittenOutTemplates) {
  const ChatFormat llama2 = DetectChatFormat(kLlama2Template);
  EXPECT_EQ(llama2.family, ChatFamily::kMistralInst);
  EXPECT_TRUE(llama2.sys_block);
  EXPECT_TRUE(llama2.strip);
  EXPECT_TRUE(llama2.space_before_inst_end);
  const ChatFormat mistral = DetectChatFormat(kMistralV3Template);
  EXPECT_EQ(mistral.family, ChatFamily::kMistralInst);
  EXPECT_FALSE(mistral.sys_block);
  EXPECT_FALSE(mistral.strip);  // only assistant content is trimmed there
  EXPECT_FALSE(mistral.space_before_inst_end);
  EXPECT_EQ(DetectChatFormat(kQwen2Template).default_system, "You are a helpful assistant.");
  EXPECT_EQ(DetectChatFormat(kQwen25Template).default_system,
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
}

TEST(ChatFormatTest, FamilyNames) {
  EXPECT_STREQ(ChatFamilyName(ChatFamily::kNone), "none");
  EXPECT_STREQ(ChatFamilyName(ChatFamily::kUnknown), "unknown");
  EXPECT_STREQ(ChatFamilyName(ChatFamily::kLlama3), "llama3");
  EXPECT_STREQ(ChatFamilyName(ChatFamily::kChatMl), "chatml");
  EXPECT_STREQ(ChatFamilyName(ChatFamily::kMistralInst), "mistral-inst");
}

TEST(ChatSegmentsTest, NoOrUnknownTemplateIsFailedPrecondition) {
  for (ChatFamily family : {ChatFamily::kNone, ChatFamily::kUnknown}) {
    ChatFormat f;
    f.family = family;
    auto s = BuildChatSegments(f, "sys", "q", true);
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(s.status().message().find(family == ChatFamily::kNone ? "no chat template" : "no family"),
              std::string::npos)
        << s.status();
    EXPECT_NE(s.status().message().find("chat false"), std::string::npos) << s.status();
  }
}

TEST(ChatSegmentsTest, Llama3SplitsAtTheUserTurnAndTrims) {
  const ChatFormat f = DetectChatFormat(TemplateOf(kLlama3Vocab));
  ChatSegments s = Build(f, "  Be brief.\n", "Who? \n", /*has_contexts=*/true);
  EXPECT_EQ(RenderChatPieces(s.prefix),
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n");
  EXPECT_EQ(RenderChatPieces(s.query), "Who?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
  // A query's leading space is inside the user message while documents come
  // first; with no documents the query begins the message and is trimmed.
  EXPECT_EQ(RenderChatPieces(Build(f, "", " Who?", true).query).substr(0, 5), " Who?");
  EXPECT_EQ(Render(Build(f, "", " Who?", false)),
            "<|start_header_id|>user<|end_header_id|>\n\nWho?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

TEST(ChatSegmentsTest, ChatMlWithAndWithoutSystemText) {
  const ChatFormat qwen3 = DetectChatFormat(TemplateOf(kQwenVocab));
  EXPECT_EQ(Render(Build(qwen3, "You are terse.", "Q?", true), "DOC"),
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nDOCQ?<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(Render(Build(qwen3, "", " Q? ", false)), "<|im_start|>user\n Q? <|im_end|>\n<|im_start|>assistant\n");
  // Qwen2 / Qwen2.5 write their default system text when there is none.
  EXPECT_EQ(RenderChatPieces(Build(DetectChatFormat(kQwen2Template), "", "Q?", true).prefix),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n");
  EXPECT_EQ(RenderChatPieces(Build(DetectChatFormat(kQwen25Template), "Mine.", "Q?", true).prefix),
            "<|im_start|>system\nMine.<|im_end|>\n<|im_start|>user\n");
}

TEST(ChatSegmentsTest, Llama2PutsTheSystemTextInASysBlock) {
  const ChatFormat f = DetectChatFormat(kLlama2Template);
  // bos_token + '[INST] ' + ('<<SYS>>\n' + sys + '\n<</SYS>>\n\n' + user).strip() + ' [/INST]'
  EXPECT_EQ(Render(Build(f, "Be brief.", "Who? ", true), "DOC "),
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nDOC Who? [/INST]");
  EXPECT_EQ(Render(Build(f, "", "  Who?  ", false)), "[INST] Who? [/INST]");
}

TEST(ChatSegmentsTest, MistralPutsTheSystemTextFirstInTheUserMessage) {
  const ChatFormat f = DetectChatFormat(kMistralV3Template);
  // "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]"
  EXPECT_EQ(Render(Build(f, "Be brief.", "Who? ", true), "DOC"), "[INST] Be brief.\n\nDOCWho? [/INST]");
  EXPECT_EQ(Render(Build(f, "", "Who?", false)), "[INST] Who?[/INST]");
}

// llama-tokenize's ids (special tokens parsed, BOS as the vocabulary asks)
// for "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>" and
// "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n...": our
// prefix and query for the question "Hi there!" begin the same way.
TEST(ChatEncodeTest, AgreesWithLlamaCppOnChatFormattedText) {
  auto golden = nlohmann::json::parse(ReadAll(TestData("families/vocab/special-parsing.golden.json")));
  struct Case {
    const char* vocab;
    size_t golden_case;
    size_t compare;
  };
  for (const Case& c : {Case{kLlama3Vocab, 1, 9}, Case{kQwenVocab, 4, 11}}) {
    const auto& g = golden["cases"][c.golden_case];
    ASSERT_EQ("families/" + g["vocab"].get<std::string>(), c.vocab);
    const std::vector<int32_t> want = g["ids"].get<std::vector<int32_t>>();
    const Tokenizer tok = LoadVocab(c.vocab);
    const ChatSegments s = Build(DetectChatFormat(TemplateOf(c.vocab)), "", "Hi there!", false);
    std::vector<int32_t> ids = EncodeChatPieces(tok, s.prefix, tok.add_bos());
    const std::vector<int32_t> query = EncodeChatPieces(tok, s.query, false);
    ids.insert(ids.end(), query.begin(), query.end());
    ASSERT_GE(ids.size(), c.compare);
    EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.begin() + c.compare),
              std::vector<int32_t>(want.begin(), want.begin() + c.compare))
        << c.vocab;
  }
}

// Segment by segment, the ids are those of the whole rendering with special
// tokens parsed (the boundaries fall where the pre-tokenizer splits anyway).
TEST(ChatEncodeTest, SegmentsTokenizeAsTheRendering) {
  for (const char* vocab : {kLlama3Vocab, kQwenVocab}) {
    const Tokenizer tok = LoadVocab(vocab);
    const ChatSegments s =
        Build(DetectChatFormat(TemplateOf(vocab)), "You answer from the documents.", "What does Ann keep?", true);
    const std::string doc = "Ann keeps a green lamp.\n";
    std::vector<int32_t> ids = EncodeChatPieces(tok, s.prefix, tok.add_bos());
    for (int32_t id : tok.Encode(doc, false, false)) ids.push_back(id);
    for (int32_t id : EncodeChatPieces(tok, s.query, false)) ids.push_back(id);
    const std::string bos = tok.add_bos() ? tok.piece(tok.bos_id()) : "";
    EXPECT_EQ(ids, tok.Encode(bos + Render(s, doc), false, false, /*parse_special=*/true)) << vocab;
  }
}

TEST(ChatEncodeTest, ClientTextIsNeverParsedForSpecialTokens) {
  const Tokenizer tok = LoadVocab(kQwenVocab);
  const ChatSegments s = Build(DetectChatFormat(TemplateOf(kQwenVocab)), "sys<|im_end|>", "q<|im_start|>", true);
  const int32_t im_start = 151644, im_end = 151645;
  const std::vector<int32_t> prefix = EncodeChatPieces(tok, s.prefix, false);
  const std::vector<int32_t> query = EncodeChatPieces(tok, s.query, false);
  // The markers only: prefix <|im_start|>system\n..<|im_end|>\n<|im_start|>user\n, query
  // ..<|im_end|>\n<|im_start|>assistant\n
  EXPECT_EQ(std::count(prefix.begin(), prefix.end(), im_start), 2);
  EXPECT_EQ(std::count(prefix.begin(), prefix.end(), im_end), 1);
  EXPECT_EQ(std::count(query.begin(), query.end(), im_start), 1);
  EXPECT_EQ(std::count(query.begin(), query.end(), im_end), 1);
  EXPECT_EQ(tok.DecodeAll(query), "q<|im_start|>\nassistant\n");  // control tokens decode to nothing
}

// Llama 2's vocabulary has no [INST] token: the markers are plain text, and
// SentencePiece's space prefix falls as in the whole rendering.
TEST(ChatEncodeTest, MarkersThatAreNotSpecialTokensArePlainText) {
  const Tokenizer tok = LoadVocab(kSpmVocab);
  const ChatSegments s = Build(DetectChatFormat(kLlama2Template), "Be brief.", "Who?", false);
  std::vector<int32_t> ids = EncodeChatPieces(tok, s.prefix, true);
  const std::vector<int32_t> query = EncodeChatPieces(tok, s.query, false);
  EXPECT_EQ(ids, tok.Encode(RenderChatPieces(s.prefix), true, false, true));
  EXPECT_EQ(query, tok.Encode(RenderChatPieces(s.query), false, false, true));
  EXPECT_EQ(ids[0], tok.bos_id());
}

}  // namespace
}  // namespace ape
