#include "common/engine/bpe_pretokenizer.h"

#include <unicode/regex.h>
#include <unicode/unistr.h>

#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ape {
namespace {

// The regexes, as the models' tokenizer.json files write them. Where HF has
// `(?i:'s|'t|...)` we spell the cases out, as llama.cpp does.
constexpr char kGpt2[] = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr char kLlama3[] =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3})"
    R"(| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// Qwen2 is Llama 3's expression with single digits.
constexpr char kQwen2[] = R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N})"
                          R"(| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// DeepSeek-Coder's CJK ranges: U+4E00-9FA5, U+0800-4E00, U+AC00-D7FF.
constexpr char kDeepseekCjk[] = R"([\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}]+)";

struct Spec {
  std::vector<std::string> names;  // tokenizer.ggml.pre values
  std::vector<std::string> regexes;
  bool ignore_merges = false;
  bool add_bos = false;
};

// The pre-tokenizers we know, with the names llama.cpp maps to them.
const std::vector<Spec>& Specs() {
  static const auto* specs = new std::vector<Spec>{
      {{"llama-bpe", "llama3", "llama-v3"}, {kLlama3}, /*ignore_merges=*/true, /*add_bos=*/true},
      {{"qwen2", "deepseek-r1-qwen"}, {kQwen2}},
      {{"gpt-2", "phi-2"}, {kGpt2}},
      {{"starcoder", "smollm"}, {R"(\p{N})", kGpt2}},
      {{"falcon"}, {R"([\p{P}\$\+<=>\^~\|`]+)", kGpt2, R"([0-9][0-9][0-9])"}},
      {{"deepseek-coder"}, {R"([\r\n])", R"(\s?\p{L}+)", R"(\s?\p{P}+)", kDeepseekCjk, R"(\p{N})"}},
      // No tokenizer.ggml.pre: llama.cpp's fallback (it warns that quality suffers).
      {{"", "default"}, {R"([\p{P}\$\+<=>\^~\|]+)", kGpt2, R"(\p{N}+)", R"([0-9][0-9][0-9])"}},
  };
  return *specs;
}

// `text` as UTF-16 for ICU, with the byte offset in `text` where each UTF-16
// unit's code point starts (one extra entry: text.size()). A byte that does
// not start a valid UTF-8 sequence becomes one U+FFFD.
struct Utf16Text {
  std::vector<UChar> units;
  std::vector<uint32_t> byte_offset;
};

// Length of the valid UTF-8 sequence at s[i] and its code point; 0 if invalid
// (truncated, overlong, surrogate, above U+10FFFF, stray continuation byte).
size_t DecodeUtf8(absl::string_view s, size_t i, UChar32* cp) {
  const auto b = [&](size_t k) { return static_cast<uint8_t>(s[i + k]); };
  const uint8_t c = b(0);
  if (c < 0x80) {
    *cp = c;
    return 1;
  }
  size_t len = (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
  if (len == 0 || i + len > s.size()) return 0;
  UChar32 v = c & (0x7F >> len);
  for (size_t k = 1; k < len; ++k) {
    if ((b(k) & 0xC0) != 0x80) return 0;
    v = (v << 6) | (b(k) & 0x3F);
  }
  static constexpr UChar32 kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (v < kMin[len] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
  *cp = v;
  return len;
}

Utf16Text ToUtf16(absl::string_view text) {
  Utf16Text u;
  u.units.reserve(text.size());
  u.byte_offset.reserve(text.size() + 1);
  for (size_t i = 0; i < text.size();) {
    UChar32 cp = 0xFFFD;
    size_t len = DecodeUtf8(text, i, &cp);
    if (len == 0) len = 1;
    if (cp > 0xFFFF) {
      u.units.push_back(U16_LEAD(cp));
      u.byte_offset.push_back(static_cast<uint32_t>(i));
      cp = U16_TRAIL(cp);
    }
    u.units.push_back(static_cast<UChar>(cp));
    u.byte_offset.push_back(static_cast<uint32_t>(i));
    i += len;
  }
  u.byte_offset.push_back(static_cast<uint32_t>(text.size()));
  return u;
}

using Span = std::pair<int32_t, int32_t>;  // [begin, end) in UTF-16 units

// Splits [begin, end) into matches of `m` and the gaps between them. The span
// is matched on its own (opaque, anchoring region bounds: ICU's defaults). If
// ICU fails mid-way, the rest of the span stays one piece.
void SplitSpan(icu::RegexMatcher& m, Span span, std::vector<Span>* out) {
  UErrorCode status = U_ZERO_ERROR;
  m.region(span.first, span.second, status);
  int32_t last = span.first;
  while (U_SUCCESS(status) && m.find(status)) {
    const int32_t start = m.start(status), end = m.end(status);
    if (U_FAILURE(status)) break;
    if (start > last) out->push_back({last, start});
    if (end > start) out->push_back({start, end});
    last = end;
  }
  if (span.second > last) out->push_back({last, span.second});
}

}  // namespace

struct BpePreTokenizer::Compiled {
  std::vector<std::unique_ptr<icu::RegexPattern>> patterns;
};

absl::StatusOr<BpePreTokenizer> BpePreTokenizer::ForName(const std::string& pre) {
  const Spec* spec = nullptr;
  std::vector<std::string> known;
  for (const Spec& s : Specs()) {
    for (const std::string& n : s.names) {
      if (n == pre) spec = &s;
      if (!n.empty()) known.push_back(n);
    }
  }
  if (spec == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat("tokenizer.ggml.pre '", pre, "' is not supported (supported: ", absl::StrJoin(known, ", "), ")"));
  }
  auto compiled = std::make_shared<Compiled>();
  for (const std::string& re : spec->regexes) {
    UErrorCode status = U_ZERO_ERROR;
    UParseError where;
    std::unique_ptr<icu::RegexPattern> p(
        icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(re), 0, where, status));
    if (U_FAILURE(status)) {  // our own table: a bug, but say which
      return absl::InternalError(absl::StrCat("pre-tokenizer '", pre, "': regex ", re, " does not compile at offset ",
                                              where.offset, ": ", u_errorName(status)));
    }
    compiled->patterns.push_back(std::move(p));
  }
  BpePreTokenizer t;
  t.name_ = pre;
  t.regexes_ = spec->regexes;
  t.ignore_merges_ = spec->ignore_merges;
  t.default_add_bos_ = spec->add_bos;
  t.compiled_ = std::move(compiled);
  return t;
}

void BpePreTokenizer::Split(absl::string_view text, std::vector<absl::string_view>* pieces) const {
  if (text.empty()) return;
  const Utf16Text u = ToUtf16(text);
  const icu::UnicodeString input(false, u.units.data(), static_cast<int32_t>(u.units.size()));  // read-only alias
  std::vector<Span> spans = {{0, static_cast<int32_t>(u.units.size())}}, next;
  for (const auto& pattern : compiled_->patterns) {
    UErrorCode status = U_ZERO_ERROR;
    std::unique_ptr<icu::RegexMatcher> m(pattern->matcher(input, status));
    if (U_SUCCESS(status)) m->setStackLimit(0, status);  // no limit: long runs of spaces backtrack deeply
    if (U_FAILURE(status)) continue;                     // out of memory: keep the pieces as they are
    next.clear();
    for (const Span& s : spans) SplitSpan(*m, s, &next);
    spans.swap(next);
  }
  for (const auto& [begin, end] : spans) {
    pieces->push_back(text.substr(u.byte_offset[begin], u.byte_offset[end] - u.byte_offset[begin]));
  }
}

}  // namespace ape
