#include "common/server/segments.h"

#include <algorithm>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/engine/status_macros.h"

namespace ape {

absl::Status CheckTokenIds(const std::vector<int32_t>& ids, int vocab_size, const std::string& what) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": token id ", ids[i], " at index ", i,
                                                     " is outside the vocabulary [0, ", vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> PrefixTokens(absl::string_view text, const Tokenizer& tok,
                                                  const ChatFormat* chat) {
  std::vector<int32_t> ids;
  if (chat) {
    ASSIGN_OR_RETURN(ChatSegments s, BuildChatSegments(*chat, text, "", /*has_contexts=*/false));
    ids = EncodeChatPieces(tok, s.prefix, tok.add_bos());
  } else {
    ids = tok.Encode(text, tok.add_bos(), /*eos=*/false);
  }
  if (ids.empty()) {
    return absl::InvalidArgumentError(
        "prefix: empty, and this model adds no BOS token (add_bos false): send prefix text (a system prompt, or "
        "even \"\\n\"); cached contexts follow at least one prefix token");
  }
  return ids;
}

absl::StatusOr<std::vector<int32_t>> QueryTokens(absl::string_view text, const Tokenizer& tok, const ChatFormat* chat,
                                                 bool has_contexts) {
  if (!chat) return tok.Encode(text, /*bos=*/false, /*eos=*/false);
  ASSIGN_OR_RETURN(ChatSegments s, BuildChatSegments(*chat, "", text, has_contexts));
  return EncodeChatPieces(tok, s.query, /*bos=*/false);
}

absl::StatusOr<std::vector<int32_t>> ResolvePrefix(const v1::Segment& seg, const Tokenizer& tok, int max_tokens,
                                                   const ChatFormat* chat) {
  std::vector<int32_t> ids;
  if (seg.has_tokens()) {
    if (chat) {
      return absl::InvalidArgumentError(
          "prefix: chat needs the prefix as text (the server writes the turn markers around it); send token ids "
          "with chat false");
    }
    ids.assign(seg.tokens().ids().begin(), seg.tokens().ids().end());
    if (ids.empty()) return absl::InvalidArgumentError("prefix: token ids are empty (send text or at least BOS)");
    RETURN_IF_ERROR(CheckTokenIds(ids, tok.vocab_size(), "prefix"));
  } else {
    ASSIGN_OR_RETURN(ids, PrefixTokens(seg.text(), tok, chat));
  }
  RETURN_IF_ERROR(CheckTokenCount(ids.size(), max_tokens, "prefix", "--max_prefix_tokens"));
  return ids;
}

absl::StatusOr<std::vector<int32_t>> ResolveContext(const v1::Segment& seg, const Tokenizer& tok, int max_tokens,
                                                    const std::string& what) {
  std::vector<int32_t> ids;
  if (seg.has_tokens()) {
    ids.assign(seg.tokens().ids().begin(), seg.tokens().ids().end());
    RETURN_IF_ERROR(CheckTokenIds(ids, tok.vocab_size(), what));
  } else {
    ids = tok.Encode(seg.text(), /*bos=*/false, /*eos=*/false);
  }
  if (ids.empty()) return absl::InvalidArgumentError(absl::StrCat(what, " is empty"));
  RETURN_IF_ERROR(CheckTokenCount(ids.size(), max_tokens, what, "--max_context_tokens"));
  return ids;
}

absl::Status CheckTokenCount(size_t num_tokens, int max_tokens, const std::string& what,
                             const std::string& limit_name) {
  if (num_tokens <= static_cast<size_t>(std::max(max_tokens, 0))) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": ", num_tokens, " tokens, the limit is ", max_tokens, " (", limit_name, ")"));
}

absl::Status TextCheck::Add(absl::string_view text, const std::string& what) {
  const int64_t bytes = static_cast<int64_t>(text.size());
  if (bytes > limits_.max_field_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", bytes, " bytes of text, the limit is ",
                                                   limits_.max_field_bytes, " per field (--max_text_bytes)"));
  }
  total_bytes_ += bytes;
  if (total_bytes_ > limits_.max_request_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("the request's text fields hold more than ",
                                                   limits_.max_request_bytes, " bytes (at ", what,
                                                   "), the limit per request (--max_request_text_bytes)"));
  }
  if (const size_t bad = FirstInvalidUtf8(text); bad != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": invalid UTF-8 at byte ", bad, " (text fields are UTF-8)"));
  }
  return absl::OkStatus();
}

size_t FirstInvalidUtf8(absl::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    // Continuation bytes after a lead byte, and the range of the first one
    // (Unicode 15, table 3-7: it excludes overlong forms and surrogates).
    size_t more = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      more = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      more = 2;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      more = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;  // a stray continuation byte, C0, C1 or F5..FF
    }
    if (n - i <= more || s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t k = 2; k <= more; ++k) {
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
    }
    i += more + 1;
  }
  return absl::string_view::npos;
}

std::string ToValidUtf8(absl::string_view text) {
  size_t bad = FirstInvalidUtf8(text);
  if (bad == absl::string_view::npos) return std::string(text);
  std::string out;
  out.reserve(text.size() + 8);
  while (bad != absl::string_view::npos) {
    out.append(text.data(), bad);
    out.append("\xEF\xBF\xBD");  // U+FFFD
    text.remove_prefix(bad + 1);
    bad = FirstInvalidUtf8(text);
  }
  out.append(text.data(), text.size());
  return out;
}

std::string Excerpt(absl::string_view text) {
  if (text.size() <= kExcerptBytes) return absl::CHexEscape(text);
  return absl::StrCat(absl::CHexEscape(text.substr(0, kExcerptBytes)), "... (", text.size(), " bytes)");
}

}  // namespace ape
