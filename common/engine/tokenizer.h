// The tokenizers of the models we run, built from a llama2.c tokenizer file
// or from the `tokenizer.ggml.*` metadata of a GGUF file:
//
// - SentencePiece-style BPE with byte fallback (`tokenizer.ggml.model =
//   "llama"`, and llama2.c files): Llama 2, Mistral, Phi-3.
// - Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): Llama 3, Qwen2/3,
//   GPT-2 and others; see bpe.h and bpe_pretokenizer.h.
//
// Encode (same ids as llama.cpp's llama_tokenize):
//   1. special tokens: the text of a kControl or kUnknown token is that token
//      only when parse_special is set (else it is plain text); the text of a
//      kUserDefined token is always that token (as llama.cpp and HF do).
//      Longer token texts are matched first. The text between them is a
//      fragment, encoded by 2 or 3:
//   2. SentencePiece: spaces -> the vocabulary's space symbol (" " in llama2.c
//      files, U+2581 "▁" in GGUF); one space symbol is prepended (the "dummy
//      prefix") to the first fragment and to each fragment after a special
//      token; then one symbol per UTF-8 code point, repeatedly merge the
//      adjacent pair whose concatenation is a piece of highest score (leftmost
//      on ties); a final symbol that is not a piece becomes <0xXX> tokens.
//   3. byte-level BPE: the pre-tokenizer splits the fragment into words; a
//      word that is a token is emitted whole if the pre-tokenizer says so
//      (ignore_merges, Llama 3); else BPE merges on its bytes (bpe.h).
// Decode maps a token to its bytes: byte tokens to their byte; SentencePiece
// pieces with the space symbol as ' ' (and the leading space of the first
// piece after BOS dropped); byte-level pieces through GPT-2's table;
// kUserDefined tokens as their text; kControl/kUnknown/kUnused tokens to
// nothing. A token may end inside a UTF-8 character: the caller holds
// incomplete characters back. As in llama.cpp, and unlike some HF configs,
// there is no NFC normalisation before encoding (Qwen's tokenizer.json has
// one) and no clean-up of spaces after decoding: with byte-level BPE,
// decode(encode(s)) == s whenever the vocabulary has a token for every byte.
//
// BOS: Encode adds it when asked; add_bos() is the model's wish, as llama.cpp
// reads it: `tokenizer.ggml.add_bos_token` when present, else true for
// SentencePiece and for the Llama 3 pre-tokenizer, false for other BPE.
//
// End of generation (as llama.cpp's special_eog_ids): the EOS id; the
// `tokenizer.ggml.eot_token_id` / `eom_token_id` / `fim_{pad,rep,sep}_token_id`
// ids; and tokens whose text names an end of turn ("<|eot_id|>",
// "<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "</s>", ... and the FIM
// pad/repo/file-separator tokens). Those found by their text are treated as
// kControl even where the file says otherwise, as llama.cpp does (Qwen's
// normal token 128247 "</s>" is one).
#ifndef APESERVE_COMMON_ENGINE_TOKENIZER_H_
#define APESERVE_COMMON_ENGINE_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ape {

class BpeMerges;
class BpePreTokenizer;
class GgufFile;

class Tokenizer {
 public:
  // Piece kinds, numbered as GGUF's tokenizer.ggml.token_type.
  enum class Kind : int32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

  // llama2.c tokenizer file: i32 max_token_length, then per token f32 score,
  // i32 length, bytes. Id 0 <unk>, 1 BOS, 2 EOS by convention.
  static absl::StatusOr<Tokenizer> FromLlama2c(std::span<const uint8_t> bytes, int vocab_size, const std::string& what);
  // GGUF `tokenizer.ggml.model` "llama" (SentencePiece) or "gpt2" (byte-level
  // BPE); UNIMPLEMENTED for other models and unknown `tokenizer.ggml.pre`.
  static absl::StatusOr<Tokenizer> FromGguf(const GgufFile& gguf);
  // The tokenizer of the GGUF file at `path`, without its weights: works on
  // vocabulary-only files (tokenizer metadata, no tensors).
  static absl::StatusOr<Tokenizer> FromGgufFile(const std::string& path);

  // Token ids for `text`, optionally with BOS first and EOS last (see the
  // header comment for parse_special).
  std::vector<int32_t> Encode(absl::string_view text, bool bos, bool eos, bool parse_special = false) const;
  // Bytes of `token` when it follows `prev` (see the header comment).
  std::string Decode(int32_t prev, int32_t token) const;
  // Bytes of a sequence; `prev` is the token before ids[0] (-1 for none).
  std::string DecodeAll(std::span<const int32_t> ids, int32_t prev = -1) const;

  // True for the tokens that end a generation (see the header comment).
  bool IsEndOfGeneration(int32_t id) const;
  // Those tokens, ascending.
  const std::vector<int32_t>& end_of_generation_ids() const { return eog_ids_; }

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  // Whether the model expects BOS before a prompt (see the header comment).
  bool add_bos() const { return add_bos_; }
  const std::string& piece(int32_t id) const { return pieces_[id]; }
  Kind kind(int32_t id) const { return kinds_[id]; }
  const std::string& source() const { return source_; }
  // "llama" (SentencePiece, also for llama2.c files) or "gpt2" (byte-level BPE).
  const std::string& model() const { return model_; }
  // tokenizer.ggml.pre of a byte-level BPE vocabulary ("" otherwise).
  const std::string& pre() const;
  // A canonical byte string of everything that affects encode/decode; part of
  // the model fingerprint.
  std::string CanonicalBytes() const;

 private:
  absl::Status ReadGgufPreTokenizer(const GgufFile& g);
  absl::Status ReadGgufVocabulary(const GgufFile& g);
  absl::Status ReadGgufEndOfGeneration(const GgufFile& g);
  // Builds the lookup tables, the end-of-generation set and the list of
  // special tokens; validates BOS/EOS. `what` names the file in errors.
  absl::Status Finish(const std::string& what);
  void IndexSpecialTokens();  // eog_ids_ by text (and kinds_ overrides), special_
  // Text split around special tokens: token >= 0 for a special token, else
  // `text` is a fragment to encode.
  struct Fragment {
    int32_t token;
    absl::string_view text;
  };
  std::vector<Fragment> SplitSpecial(absl::string_view text, bool parse_special) const;
  void EncodeSentencePiece(absl::string_view text, bool dummy_prefix, std::vector<int32_t>* out) const;
  void EncodeByteLevel(absl::string_view text, std::vector<int32_t>* out) const;

  std::string source_;  // "llama2.c" or "gguf"
  std::string model_ = "llama";
  std::string space_ = " ";  // the vocabulary's space symbol (SentencePiece)
  bool add_dummy_prefix_ = true;
  bool add_bos_ = true;  // tokenizer.ggml.add_bos_token or the default above; in the fingerprint
  int32_t bos_id_ = 1, eos_id_ = 2;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<Kind> kinds_;
  absl::flat_hash_map<std::string, int32_t> piece_to_id_;
  int32_t byte_token_[256] = {};  // <0xXX> token of each byte, -1 if absent (set by Finish)
  std::vector<int32_t> special_;  // kControl/kUnknown/kUserDefined ids, longest text first
  std::vector<int32_t> eog_ids_;  // ascending
  // Byte-level BPE only (shared: immutable, and large).
  std::shared_ptr<const BpePreTokenizer> pre_tokenizer_;
  std::shared_ptr<const BpeMerges> merges_;
};

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_TOKENIZER_H_
