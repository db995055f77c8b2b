// The pre-tokenizer of a byte-level BPE vocabulary: splits text into the
// pieces ("words") that BPE merges never cross. GGUF names it in
// `tokenizer.ggml.pre`; each name stands for an ordered list of regular
// expressions, written as in the model's tokenizer.json (llama.cpp's
// src/llama-vocab.cpp keeps the same table):
//
//   for each regex, in order:
//     for each piece so far (at first: the whole text):
//       the regex's matches in the piece, and the gaps between them, become
//       the new pieces (empty ones dropped)
//
// A piece is matched on its own: `$` and lookahead see the piece's end, not
// the text's. Unicode classes (\p{L}, \p{N}, \p{P}, \s) come from ICU's regex
// engine (ICU 72 = Unicode 15); ICU's \s is the White_Space property, as in
// Oniguruma, which HF tokenizers use. Bytes that are not valid UTF-8 are matched as
// U+FFFD but stay in the pieces unchanged, so joining the pieces always gives
// the input bytes back.
#ifndef APESERVE_COMMON_ENGINE_BPE_PRETOKENIZER_H_
#define APESERVE_COMMON_ENGINE_BPE_PRETOKENIZER_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ape {

class BpePreTokenizer {
 public:
  // The pre-tokenizer named `pre` (tokenizer.ggml.pre; "" = llama.cpp's
  // "default"). UNIMPLEMENTED for a name we do not know.
  static absl::StatusOr<BpePreTokenizer> ForName(const std::string& pre);

  // Appends the pieces of `text` to `pieces`, in order; they are views into
  // `text` and cover it exactly. Thread-safe.
  void Split(absl::string_view text, std::vector<absl::string_view>* pieces) const;

  // tokenizer.ggml.pre as given ("" when absent).
  const std::string& name() const { return name_; }
  // The vocabulary family's defaults that llama.cpp ties to the name:
  // a whole piece that is a token is emitted without merging (HF's
  // `ignore_merges`), and BOS is added when the file has no
  // tokenizer.ggml.add_bos_token.
  bool ignore_merges() const { return ignore_merges_; }
  bool default_add_bos() const { return default_add_bos_; }
  // The regexes, in order (part of the tokenizer's canonical bytes).
  const std::vector<std::string>& regexes() const { return regexes_; }

 private:
  struct Compiled;  // the ICU patterns (ICU stays out of this header)

  std::string name_;
  std::vector<std::string> regexes_;
  bool ignore_merges_ = false;
  bool default_add_bos_ = false;
  std::shared_ptr<const Compiled> compiled_;  // shared: patterns are immutable
};

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_BPE_PRETOKENIZER_H_
