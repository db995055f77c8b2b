// Request segments (text or token ids) to validated token ids, and the
// checks every piece of client text passes before anything tokenizes it:
// size limits, well-formed UTF-8, and short excerpts for messages and logs.
#ifndef APESERVE_COMMON_SERVER_SEGMENTS_H_
#define APESERVE_COMMON_SERVER_SEGMENTS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "ape/v1/encoder.pb.h"
#include "common/engine/chat_template.h"
#include "common/engine/tokenizer.h"

namespace ape {

// Prefix text to ids: BOS first when the model asks for one
// (tok.add_bos()); with `chat` (null: plain text) the text is the system
// text of a chat prefix (common/engine/chat_template.h: system turn and the
// user's turn header; FAILED_PRECONDITION when the model has no template the
// server renders). INVALID_ARGUMENT when that gives no token (a model
// without BOS and no text: a cache entry follows at least one prefix token).
absl::StatusOr<std::vector<int32_t>> PrefixTokens(absl::string_view text, const Tokenizer& tok, const ChatFormat* chat);
// Query text to ids, without BOS; with `chat` followed by the end of the
// user's turn and the assistant's header (`has_contexts`: documents sit
// between prefix and query, see chat_template.h on stripping).
absl::StatusOr<std::vector<int32_t>> QueryTokens(absl::string_view text, const Tokenizer& tok, const ChatFormat* chat,
                                                 bool has_contexts);

// A prefix: text as PrefixTokens says (unset or empty text: just BOS, when
// the model has one); ids are used as given (not with `chat`). A context:
// text without BOS; ids as given, non-empty. INVALID_ARGUMENT (naming
// `what`) for ids outside the vocabulary, empty prefixes and contexts, or
// more than `max_tokens` tokens.
absl::StatusOr<std::vector<int32_t>> ResolvePrefix(const v1::Segment& seg, const Tokenizer& tok, int max_tokens,
                                                   const ChatFormat* chat = nullptr);
absl::StatusOr<std::vector<int32_t>> ResolveContext(const v1::Segment& seg, const Tokenizer& tok, int max_tokens,
                                                    const std::string& what);
absl::Status CheckTokenIds(const std::vector<int32_t>& ids, int vocab_size, const std::string& what);
// INVALID_ARGUMENT "<what>: N tokens, the limit is M (<limit_name>)" when
// num_tokens > max_tokens.
absl::Status CheckTokenCount(size_t num_tokens, int max_tokens, const std::string& what, const std::string& limit_name);

// ---- Client text, before tokenizing --------------------------------------------

// Byte limits on the text fields of one request (--max_text_bytes,
// --max_request_text_bytes on both servers).
struct TextLimits {
  int64_t max_field_bytes;    // one text field
  int64_t max_request_bytes;  // all text fields of a request together
};

// Checks the text fields of one request in turn, before any is tokenized:
// each must be well-formed UTF-8 and within the limits. INVALID_ARGUMENT
// naming the field (`what`) and the fault.
class TextCheck {
 public:
  explicit TextCheck(const TextLimits& limits) : limits_(limits) {}
  absl::Status Add(absl::string_view text, const std::string& what);

 private:
  const TextLimits limits_;
  int64_t total_bytes_ = 0;
};

// Offset of the first byte that does not start a well-formed UTF-8 sequence
// (RFC 3629: shortest form, no surrogates, at most U+10FFFF), or npos.
size_t FirstInvalidUtf8(absl::string_view text);

// `text` with every byte that does not start a well-formed UTF-8 sequence
// replaced by U+FFFD: for the text the servers send in `string` fields
// (protobuf's Python and Node runtimes refuse invalid UTF-8 there, and a
// model may generate any bytes, e.g. a random or a byte-level model).
std::string ToValidUtf8(absl::string_view text);

// Client input as it may appear in a status message or a log line: at most
// kExcerptBytes bytes, C-escaped (so always printable ASCII), then
// "... (N bytes)" when it was longer.
constexpr size_t kExcerptBytes = 80;
std::string Excerpt(absl::string_view text);

}  // namespace ape

#endif  // APESERVE_COMMON_SERVER_SEGMENTS_H_
