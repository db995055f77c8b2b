#include "common/engine/chat_template.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace ape {
namespace {

ChatPiece Marker(absl::string_view text) { return ChatPiece{true, std::string(text)}; }
ChatPiece Text(absl::string_view text) { return ChatPiece{false, std::string(text)}; }

// The system text a ChatML template writes when the messages have none, as
// Qwen2's and Qwen2.5's do: a string literal
// '<|im_start|>system\n<text><|im_end|>\n' ("\n" escaped in the Jinja source
// or a real newline). "" when the template has no such literal (Qwen3's
// writes a system turn only for a system message).
std::string DefaultChatMlSystem(absl::string_view jinja) {
  static constexpr absl::string_view kOpen = "<|im_start|>system";
  static constexpr absl::string_view kClose = "<|im_end|>";
  for (size_t at = jinja.find(kOpen); at != absl::string_view::npos; at = jinja.find(kOpen, at + 1)) {
    absl::string_view rest = jinja.substr(at + kOpen.size());
    if (absl::StartsWith(rest, "\\n")) {
      rest.remove_prefix(2);
    } else if (absl::StartsWith(rest, "\n")) {
      rest.remove_prefix(1);
    } else {
      continue;
    }
    const size_t end = rest.find(kClose);
    if (end == absl::string_view::npos || end == 0) continue;
    absl::string_view text = rest.substr(0, end);
    // Template code (a message's content, a concatenation) is not a literal.
    if (text.find_first_of("'\"\\{}+") != absl::string_view::npos) continue;
    return std::string(text);
  }
  return "";
}

// The id of the special token whose text is exactly `text`, or -1 (also
// for text the vocabulary has no single special token for, e.g. "[INST]" in
// Llama 2's, where it is plain text).
int32_t SpecialTokenOf(const Tokenizer& tok, absl::string_view text) {
  if (text.empty()) return -1;
  const std::vector<int32_t> ids = tok.Encode(text, /*bos=*/false, /*eos=*/false, /*parse_special=*/true);
  if (ids.size() != 1) return -1;
  const Tokenizer::Kind kind = tok.kind(ids[0]);
  if (kind != Tokenizer::Kind::kControl && kind != Tokenizer::Kind::kUserDefined && kind != Tokenizer::Kind::kUnknown) {
    return -1;
  }
  return tok.piece(ids[0]) == text ? ids[0] : -1;
}

}  // namespace

const char* ChatFamilyName(ChatFamily family) {
  switch (family) {
    case ChatFamily::kNone: return "none";
    case ChatFamily::kUnknown: return "unknown";
    case ChatFamily::kLlama3: return "llama3";
    case ChatFamily::kChatMl: return "chatml";
    case ChatFamily::kMistralInst: return "mistral-inst";
  }
  return "unknown";
}

ChatFormat DetectChatFormat(absl::string_view jinja) {
  ChatFormat f;
  if (jinja.empty()) return f;
  if (absl::StrContains(jinja, "<|start_header_id|>") && absl::StrContains(jinja, "<|end_header_id|>")) {
    f.family = ChatFamily::kLlama3;
    f.strip = absl::StrContains(jinja, "| trim") || absl::StrContains(jinja, "|trim");  // every message's content
  } else if (absl::StrContains(jinja, "<|im_start|>") && absl::StrContains(jinja, "<|im_end|>")) {
    f.family = ChatFamily::kChatMl;
    f.default_system = DefaultChatMlSystem(jinja);
  } else if (absl::StrContains(jinja, "[INST]") && absl::StrContains(jinja, "[/INST]")) {
    f.family = ChatFamily::kMistralInst;
    // Llama 2's `content.strip()` on the user message (Mistral's templates
    // trim only the assistant's content, which we never render).
    f.strip = absl::StrContains(jinja, ".strip()");
    f.sys_block = absl::StrContains(jinja, "<<SYS>>");
    f.space_before_inst_end = absl::StrContains(jinja, " [/INST]");
  } else {
    f.family = ChatFamily::kUnknown;
  }
  return f;
}

absl::StatusOr<ChatSegments> BuildChatSegments(const ChatFormat& format, absl::string_view system,
                                               absl::string_view query, bool has_contexts) {
  if (format.family == ChatFamily::kNone) {
    return absl::FailedPreconditionError(
        "chat: the model has no chat template (tokenizer.chat_template); send chat false and write the turn "
        "markers into the prefix and query yourself");
  }
  if (format.family == ChatFamily::kUnknown) {
    return absl::FailedPreconditionError(
        "chat: the model's chat template is of no family the server renders (llama3, chatml, mistral-inst); send "
        "chat false and write the turn markers into the prefix and query yourself");
  }
  // The user message is [lead] + contexts + query; a stripping template
  // strips its start (when the lead or the query begins it) and its end.
  absl::string_view q = query;
  if (format.strip) q = absl::StripTrailingAsciiWhitespace(q);
  ChatSegments s;
  switch (format.family) {
    case ChatFamily::kLlama3: {
      if (format.strip && !has_contexts) q = absl::StripLeadingAsciiWhitespace(q);
      if (!system.empty()) {
        s.prefix = {Marker("<|start_header_id|>"),
                    Marker("system"),
                    Marker("<|end_header_id|>"),
                    Marker("\n\n"),
                    Text(format.strip ? absl::StripAsciiWhitespace(system) : system),
                    Marker("<|eot_id|>")};
      }
      for (const char* m : {"<|start_header_id|>", "user", "<|end_header_id|>", "\n\n"}) s.prefix.push_back(Marker(m));
      s.query = {Text(q),
                 Marker("<|eot_id|>"),
                 Marker("<|start_header_id|>"),
                 Marker("assistant"),
                 Marker("<|end_header_id|>"),
                 Marker("\n\n")};
      break;
    }
    case ChatFamily::kChatMl: {
      const absl::string_view sys = system.empty() ? absl::string_view(format.default_system) : system;
      if (!sys.empty()) {
        s.prefix = {Marker("<|im_start|>"), Marker("system\n"), Text(sys), Marker("<|im_end|>"), Marker("\n")};
      }
      s.prefix.push_back(Marker("<|im_start|>"));
      s.prefix.push_back(Marker("user\n"));
      s.query = {Text(q), Marker("<|im_end|>"), Marker("\n"), Marker("<|im_start|>"), Marker("assistant\n")};
      break;
    }
    case ChatFamily::kMistralInst: {
      s.prefix = {Marker("[INST]"), Marker(" ")};
      if (!system.empty() && format.sys_block) {
        s.prefix.push_back(Marker("<<SYS>>\n"));
        s.prefix.push_back(Text(system));
        s.prefix.push_back(Marker("\n<</SYS>>\n\n"));
      } else if (!system.empty()) {
        s.prefix.push_back(Text(format.strip ? absl::StripLeadingAsciiWhitespace(system) : system));
        s.prefix.push_back(Marker("\n\n"));
      } else if (format.strip && !has_contexts) {
        q = absl::StripLeadingAsciiWhitespace(q);
      }
      s.query = {Text(q)};
      if (format.space_before_inst_end) s.query.push_back(Marker(" "));
      s.query.push_back(Marker("[/INST]"));
      break;
    }
    default: break;
  }
  return s;
}

std::string RenderChatPieces(std::span<const ChatPiece> pieces) {
  std::string out;
  for (const ChatPiece& p : pieces) out += p.text;
  return out;
}

std::vector<int32_t> EncodeChatPieces(const Tokenizer& tok, std::span<const ChatPiece> pieces, bool bos) {
  std::vector<int32_t> ids;
  if (bos) ids.push_back(tok.bos_id());
  std::string text;  // since the last special token
  auto flush = [&] {
    if (text.empty()) return;
    const std::vector<int32_t> part = tok.Encode(text, /*bos=*/false, /*eos=*/false, /*parse_special=*/false);
    ids.insert(ids.end(), part.begin(), part.end());
    text.clear();
  };
  for (const ChatPiece& p : pieces) {
    const int32_t special = p.marker ? SpecialTokenOf(tok, p.text) : -1;
    if (special < 0) {
      text += p.text;
      continue;
    }
    flush();
    ids.push_back(special);
  }
  flush();
  return ids;
}

}  // namespace ape
