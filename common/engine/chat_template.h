// Chat formats: the turn markers a model's `tokenizer.chat_template` (a
// Jinja template in the GGUF metadata) writes around a system text and one
// user message, split the way APE needs them. No Jinja here: the family is
// recognised by its markers, and each family's rendering is written out.
//
// A chat request's three segments (docs/APE.md section 2):
//   prefix  = [BOS] + system turn (when there is system text) + user-turn header
//   context = each document's text as it is (the documents sit inside the
//             user's turn, one after the other, no separators)
//   query   = the question + end of the user turn + assistant header
// so that prefix + contexts + query is what the template renders for
// messages [system: prefix, user: contexts + query] with
// add_generation_prompt, and the answer starts in the assistant's turn.
//
// Families:
//   kLlama3       <|start_header_id|>role<|end_header_id|>\n\n TEXT <|eot_id|>
//                 (Llama 3, 3.1, 3.2, 3.3; the template trims each message)
//   kChatMl       <|im_start|>role\n TEXT <|im_end|>\n  (Qwen, and others);
//                 a default system text the template writes when there is
//                 none (Qwen2, Qwen2.5) is written too
//   kMistralInst  [INST] TEXT [/INST]: Llama 2 (the system text in a
//                 <<SYS>>\n..\n<</SYS>>\n\n block) and Mistral (the system
//                 text and "\n\n" open the user message)
// BOS is not part of the pieces: the caller adds it when the tokenizer's
// add_bos() says so (the templates of these families write bos_token exactly
// when their tokenizers ask for BOS).
//
// Tokenizing (EncodeChatPieces): a marker that is one special token of the
// vocabulary becomes that token; all other text between two such tokens
// (marker text like "user\n" and the client's text) is encoded as one piece
// with special tokens NOT parsed, so client text that spells "<|im_end|>"
// stays text. This is what Encode(rendering, parse_special=true) gives
// whenever the client text holds no special token's text.
//
// Whitespace: where a template strips message content (Llama 3's `| trim`,
// Llama 2's `.strip()`), the system text and the query are stripped of ASCII
// whitespace as the template would (the query's leading whitespace only when
// there are no contexts: otherwise it is inside the user message); contexts
// are never changed, since their cache entries must not depend on where they
// sit in a request.
#ifndef APESERVE_COMMON_ENGINE_CHAT_TEMPLATE_H_
#define APESERVE_COMMON_ENGINE_CHAT_TEMPLATE_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/engine/tokenizer.h"

namespace ape {

enum class ChatFamily { kNone, kUnknown, kLlama3, kChatMl, kMistralInst };

// "none" (no template), "unknown" (a template of no family below), "llama3",
// "chatml", "mistral-inst".
const char* ChatFamilyName(ChatFamily family);

// What a template says, as far as rendering one system text and one user
// message goes.
struct ChatFormat {
  ChatFamily family = ChatFamily::kNone;
  // Message content stripped of surrounding whitespace (see the header).
  bool strip = false;
  // kChatMl: the system text written when the request has none ("" = no
  // system turn then).
  std::string default_system;
  // kMistralInst: the Llama 2 <<SYS>> block (else the Mistral layout), and
  // " [/INST]" (Llama 2, Mistral v0.1/v0.2) rather than "[/INST]" (v0.3 on).
  bool sys_block = false;
  bool space_before_inst_end = true;
};

// The family and its details from a Jinja template's text ("" = kNone).
ChatFormat DetectChatFormat(absl::string_view jinja);

// A piece of a segment: template markup (`marker`) or the client's text.
struct ChatPiece {
  bool marker = false;
  std::string text;
};

struct ChatSegments {
  std::vector<ChatPiece> prefix;  // after BOS
  std::vector<ChatPiece> query;
};

// The prefix and query pieces for a system text (may be empty: no system
// turn, unless the template has a default) and a query; `has_contexts` says
// whether documents sit between them (for stripping). FAILED_PRECONDITION
// naming the problem for kNone and kUnknown.
absl::StatusOr<ChatSegments> BuildChatSegments(const ChatFormat& format, absl::string_view system,
                                               absl::string_view query, bool has_contexts);

// The pieces' text concatenated: what the template renders for them.
std::string RenderChatPieces(std::span<const ChatPiece> pieces);

// Token ids of `pieces` (see the header), with BOS first when `bos`.
std::vector<int32_t> EncodeChatPieces(const Tokenizer& tok, std::span<const ChatPiece> pieces, bool bos);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_CHAT_TEMPLATE_H_
