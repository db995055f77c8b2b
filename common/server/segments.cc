#include "common/server/segments.h"

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

absl::StatusOr<std::vector<int32_t>> ResolvePrefix(const v1::Segment& seg, const Tokenizer& tok, int max_tokens) {
  std::vector<int32_t> ids;
  if (seg.has_tokens()) {
    ids.assign(seg.tokens().ids().begin(), seg.tokens().ids().end());
    if (ids.empty()) return absl::InvalidArgumentError("prefix: token ids are empty (send text or at least BOS)");
    RETURN_IF_ERROR(CheckTokenIds(ids, tok.vocab_size(), "prefix"));
  } else {
    ids = tok.Encode(seg.text(), /*bos=*/true, /*eos=*/false);
  }
  if (static_cast<int>(ids.size()) > max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("prefix: ", ids.size(), " tokens, the limit is ", max_tokens));
  }
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
  if (static_cast<int>(ids.size()) > max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", ids.size(), " tokens, the limit is ", max_tokens));
  }
  return ids;
}

}  // namespace ape
