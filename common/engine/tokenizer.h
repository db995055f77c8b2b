// SentencePiece-style BPE tokenizer with byte fallback, as used by Llama-2
// family models. Built from a llama2.c tokenizer file or from the
// `tokenizer.ggml.*` metadata of a GGUF file.
//
// Encode (same result as llama2.c encode() and llama.cpp's SPM tokenizer):
//   1. normalise: spaces -> the vocabulary's space symbol (" " in llama2.c
//      files, U+2581 "▁" in GGUF), and prepend one space symbol to non-empty
//      text (the "dummy prefix");
//   2. split into UTF-8 code points, one symbol each;
//   3. repeatedly merge the adjacent pair whose concatenation is a vocabulary
//      piece with the highest score (leftmost on ties);
//   4. a final symbol that is not a piece becomes its bytes' <0xXX> tokens.
// Decode maps a token to its text: byte tokens to their byte, the space
// symbol to ' ', control tokens (BOS/EOS/unknown-type) to nothing, and drops
// the leading space of the first piece after BOS.
#ifndef APESERVE_COMMON_ENGINE_TOKENIZER_H_
#define APESERVE_COMMON_ENGINE_TOKENIZER_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>
#include "absl/strings/string_view.h"

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace ape {

class GgufFile;

class Tokenizer {
 public:
  // Piece kinds, numbered as GGUF's tokenizer.ggml.token_type.
  enum class Kind : int32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

  // llama2.c tokenizer file: i32 max_token_length, then per token f32 score,
  // i32 length, bytes. Id 0 <unk>, 1 BOS, 2 EOS by convention.
  static absl::StatusOr<Tokenizer> FromLlama2c(std::span<const uint8_t> bytes, int vocab_size, const std::string& what);
  // GGUF `tokenizer.ggml.model == "llama"` vocabularies.
  static absl::StatusOr<Tokenizer> FromGguf(const GgufFile& gguf);

  // Token ids for `text`, optionally with BOS first and EOS last.
  std::vector<int32_t> Encode(absl::string_view text, bool bos, bool eos) const;
  // Text of `token` when it follows `prev` (see the header comment).
  std::string Decode(int32_t prev, int32_t token) const;
  // Text of a sequence; `prev` is the token before ids[0] (-1 for none).
  std::string DecodeAll(std::span<const int32_t> ids, int32_t prev = -1) const;

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  const std::string& piece(int32_t id) const { return pieces_[id]; }
  const std::string& source() const { return source_; }
  // A canonical byte string of everything that affects encode/decode; part of
  // the model fingerprint.
  std::string CanonicalBytes() const;

 private:
  absl::Status Finish();  // builds lookup tables, validates

  std::string source_;       // "llama2.c" or "gguf"
  std::string space_ = " ";  // the vocabulary's space symbol
  bool add_dummy_prefix_ = true;
  bool add_bos_ = true;  // tokenizer.ggml.add_bos_token; recorded in the fingerprint
  int32_t bos_id_ = 1, eos_id_ = 2;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<Kind> kinds_;
  absl::flat_hash_map<std::string, int32_t> piece_to_id_;
  int32_t byte_token_[256];  // <0xXX> token of each byte, -1 if absent
};

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_TOKENIZER_H_
