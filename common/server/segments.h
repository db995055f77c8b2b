// Request segments (text or token ids) to validated token ids.
#ifndef APESERVE_COMMON_SERVER_SEGMENTS_H_
#define APESERVE_COMMON_SERVER_SEGMENTS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "ape/v1/encoder.pb.h"
#include "common/engine/tokenizer.h"

namespace ape {

// A prefix: text gets BOS prepended (unset or empty text: just BOS); ids are
// used as given. A context: text without BOS; ids as given, non-empty.
// INVALID_ARGUMENT (naming `what`) for ids outside the vocabulary, empty
// contexts, or more than `max_tokens` tokens.
absl::StatusOr<std::vector<int32_t>> ResolvePrefix(const v1::Segment& seg, const Tokenizer& tok, int max_tokens);
absl::StatusOr<std::vector<int32_t>> ResolveContext(const v1::Segment& seg, const Tokenizer& tok, int max_tokens,
                                                    const std::string& what);
absl::Status CheckTokenIds(const std::vector<int32_t>& ids, int vocab_size, const std::string& what);

}  // namespace ape

#endif  // APESERVE_COMMON_SERVER_SEGMENTS_H_
