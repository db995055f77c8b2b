// Byte-level BPE, GPT-2's scheme (GGUF `tokenizer.ggml.model = "gpt2"`).
//
// Vocabulary strings hold bytes through GPT-2's byte-to-unicode table: the
// 188 bytes printable in Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
// themselves, and the other 68 (controls, space, DEL, NBSP, soft hyphen)
// become U+0100, U+0101, ... in byte order. So ' ' is "Ġ" (U+0120) and
// '\n' is "Ċ" (U+010A), and every token's text decodes to exact bytes.
//
// Encoding one piece of text (a pre-tokenizer word, see bpe_pretokenizer.h):
//   1. one symbol per byte: the token of that byte's code point;
//   2. repeatedly merge the adjacent pair of lowest rank
//      (tokenizer.ggml.merges[rank] = "left right"), the leftmost on ties;
//   3. the symbols' token ids are the result.
// Symbols are token ids throughout, so a merge is one hash lookup of a pair.
#ifndef APESERVE_COMMON_ENGINE_BPE_H_
#define APESERVE_COMMON_ENGINE_BPE_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ape {

// The code point GPT-2 writes for byte `b`.
uint32_t ByteToCodePoint(uint8_t b);
// `bytes` with every byte written as its code point, in UTF-8.
std::string BytesToUnicode(absl::string_view bytes);
// The bytes a vocabulary string stands for. A code point outside the table
// (not a byte-level string) is kept as its own UTF-8.
std::string UnicodeToBytes(absl::string_view text);

class BpeMerges {
 public:
  // `merges[i]` is "left right" with rank i; `piece_to_id` is the vocabulary.
  // INVALID_ARGUMENT (naming `what`, the key and the index) for a merge
  // without a space, or whose sides or result are not tokens.
  static absl::StatusOr<BpeMerges> Build(std::span<const std::string> merges,
                                         const absl::flat_hash_map<std::string, int32_t>& piece_to_id,
                                         const std::string& what);

  // Appends the token ids of `piece` (raw bytes) to `out`. A byte whose code
  // point is not a token is dropped (as llama.cpp does); real byte-level
  // vocabularies hold all 256.
  void Encode(absl::string_view piece, std::vector<int32_t>* out) const;

  // The merges as (rank, left, right, merged) int32 quadruples in rank order:
  // part of the tokenizer's canonical bytes.
  std::string CanonicalBytes() const;

  // Token of byte `b`'s code point, -1 if the vocabulary lacks it.
  int32_t byte_token(uint8_t b) const { return byte_token_[b]; }
  size_t num_merges() const { return merges_.size(); }

 private:
  struct Merge {
    int32_t rank;
    int32_t id;  // the merged token
  };
  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }

  int32_t byte_token_[256];
  absl::flat_hash_map<uint64_t, Merge> merges_;  // PairKey(left id, right id)
};

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_BPE_H_
