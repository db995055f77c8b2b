#include "common/engine/tokenizer.h"

#include <cstdio>
#include <cstring>
#include <queue>

#include "absl/strings/str_cat.h"
#include "common/engine/byte_reader.h"
#include "common/engine/gguf.h"
#include "common/engine/status_macros.h"

namespace ape {
namespace {

constexpr char kSpmSpace[] = "\xe2\x96\x81";  // U+2581 LOWER ONE EIGHTH BLOCK

// Length of the UTF-8 sequence starting with byte `c` (1 for invalid bytes,
// which then fall back to byte tokens on their own).
size_t Utf8Len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xE) return 3;
  if ((c >> 3) == 0x1E) return 4;
  return 1;
}

// Parses "<0xAB>" into 0xAB; -1 if `piece` is not a byte piece.
int ParseBytePiece(const std::string& piece) {
  if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return -1;
  unsigned v;
  if (std::sscanf(piece.c_str() + 3, "%2X", &v) != 1) return -1;
  return static_cast<int>(v);
}

}  // namespace

absl::StatusOr<Tokenizer> Tokenizer::FromLlama2c(std::span<const uint8_t> bytes, int vocab_size,
                                                 const std::string& what) {
  if (vocab_size <= 3) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": vocab size ", vocab_size, " is too small"));
  }
  ByteReader r(bytes, what);
  int32_t max_len;
  RETURN_IF_ERROR(r.Read(&max_len, "max_token_length"));
  if (max_len <= 0 || max_len > 4096) return r.Error(absl::StrCat("bad max_token_length ", max_len));
  // Every piece takes at least 8 bytes (score, length): bound the count by the
  // file before allocating for it.
  if (static_cast<uint64_t>(vocab_size) > r.remaining() / 8) {
    return r.Error(absl::StrCat("vocab size ", vocab_size, " needs more pieces than the file holds"));
  }
  Tokenizer t;
  t.source_ = "llama2.c";
  t.pieces_.resize(vocab_size);
  t.scores_.resize(vocab_size);
  t.kinds_.assign(vocab_size, Kind::kNormal);
  for (int i = 0; i < vocab_size; ++i) {
    int32_t len;
    RETURN_IF_ERROR(r.Read(&t.scores_[i], "token score"));
    RETURN_IF_ERROR(r.Read(&len, "token length"));
    if (len < 0 || len > max_len) {
      return r.Error(absl::StrCat("token ", i, " has length ", len, " (max ", max_len, ")"));
    }
    RETURN_IF_ERROR(r.ReadString(len, &t.pieces_[i], "token bytes"));
  }
  if (r.remaining() != 0) {
    return r.Error(
        absl::StrCat(r.remaining(), " trailing bytes: the file holds more tokens than the model's vocabulary"));
  }
  t.kinds_[0] = Kind::kUnknown;
  t.kinds_[1] = Kind::kControl;
  t.kinds_[2] = Kind::kControl;
  RETURN_IF_ERROR(t.Finish());
  return t;
}

absl::StatusOr<Tokenizer> Tokenizer::FromGguf(const GgufFile& g) {
  ASSIGN_OR_RETURN(std::string model, g.GetString("tokenizer.ggml.model"));
  if (model != "llama") {
    return absl::UnimplementedError(
        absl::StrCat(g.what(), ": tokenizer.ggml.model '", model, "' is not supported (only 'llama' SentencePiece)"));
  }
  Tokenizer t;
  t.source_ = "gguf";
  t.space_ = kSpmSpace;
  ASSIGN_OR_RETURN(t.pieces_, g.GetStringArray("tokenizer.ggml.tokens"));
  const size_t n = t.pieces_.size();
  if (n < 4) return absl::InvalidArgumentError(absl::StrCat(g.what(), ": vocabulary has ", n, " tokens"));
  if (g.Has("tokenizer.ggml.scores")) {
    ASSIGN_OR_RETURN(t.scores_, g.GetFloatArray("tokenizer.ggml.scores"));
  } else {
    t.scores_.assign(n, 0.f);
  }
  std::vector<int32_t> types(n, static_cast<int32_t>(Kind::kNormal));
  if (g.Has("tokenizer.ggml.token_type")) { ASSIGN_OR_RETURN(types, g.GetIntArray("tokenizer.ggml.token_type")); }
  if (t.scores_.size() != n || types.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat(g.what(), ": tokenizer arrays disagree: ", n, " tokens, ",
                                                   t.scores_.size(), " scores, ", types.size(), " types"));
  }
  for (int32_t ty : types) {
    if (ty < 1 || ty > 6) ty = 1;
    t.kinds_.push_back(static_cast<Kind>(ty));
  }
  if (g.Has("tokenizer.ggml.bos_token_id")) {
    ASSIGN_OR_RETURN(int64_t b, g.GetInt("tokenizer.ggml.bos_token_id"));
    t.bos_id_ = static_cast<int32_t>(b);
  }
  if (g.Has("tokenizer.ggml.eos_token_id")) {
    ASSIGN_OR_RETURN(int64_t e, g.GetInt("tokenizer.ggml.eos_token_id"));
    t.eos_id_ = static_cast<int32_t>(e);
  }
  if (g.Has("tokenizer.ggml.add_bos_token")) {
    ASSIGN_OR_RETURN(t.add_bos_, g.GetBool("tokenizer.ggml.add_bos_token"));
  }
  if (g.Has("tokenizer.ggml.add_space_prefix")) {
    ASSIGN_OR_RETURN(t.add_dummy_prefix_, g.GetBool("tokenizer.ggml.add_space_prefix"));
  }
  RETURN_IF_ERROR(t.Finish());
  return t;
}

absl::Status Tokenizer::Finish() {
  const int32_t n = static_cast<int32_t>(pieces_.size());
  if (bos_id_ < 0 || bos_id_ >= n || eos_id_ < 0 || eos_id_ >= n) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: BOS ", bos_id_, " or EOS ", eos_id_, " outside the vocabulary of ", n));
  }
  for (auto& b : byte_token_) b = -1;
  piece_to_id_.reserve(n);
  for (int32_t i = 0; i < n; ++i) {
    piece_to_id_.emplace(pieces_[i], i);  // first id wins on duplicates
    int b = ParseBytePiece(pieces_[i]);
    if (b >= 0 && byte_token_[b] < 0) {
      byte_token_[b] = i;
      kinds_[i] = Kind::kByte;
    }
  }
  return absl::OkStatus();
}

std::vector<int32_t> Tokenizer::Encode(absl::string_view text, bool bos, bool eos) const {
  std::vector<int32_t> out;
  if (bos) out.push_back(bos_id_);
  // 1. Normalise.
  std::string s;
  s.reserve(text.size() + 8);
  if (add_dummy_prefix_ && !text.empty()) s += space_;
  for (char c : text) {
    if (c == ' ')
      s += space_;
    else
      s += c;
  }
  // 2. One symbol per code point: a doubly linked list over `s`.
  struct Symbol {
    int prev, next;
    size_t start, len;
  };
  std::vector<Symbol> sym;
  for (size_t i = 0; i < s.size();) {
    size_t len = std::min(Utf8Len(static_cast<unsigned char>(s[i])), s.size() - i);
    int idx = static_cast<int>(sym.size());
    sym.push_back({idx - 1, idx + 1, i, len});
    i += len;
  }
  if (!sym.empty()) sym.back().next = -1;
  // 3. Best-first merges. A queued pair is stale when either side changed.
  struct Bigram {
    float score;
    int left;
    size_t left_start;
    size_t len;
  };
  auto worse = [](const Bigram& a, const Bigram& b) {
    return a.score < b.score || (a.score == b.score && a.left_start > b.left_start);
  };
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(worse)> queue(worse);
  auto try_pair = [&](int left) {
    if (left < 0 || sym[left].next < 0) return;
    const Symbol& a = sym[left];
    const Symbol& b = sym[a.next];
    auto it = piece_to_id_.find(absl::string_view(s).substr(a.start, a.len + b.len));
    if (it == piece_to_id_.end()) return;
    queue.push({scores_[it->second], left, a.start, a.len + b.len});
  };
  for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) try_pair(i);
  while (!queue.empty()) {
    Bigram top = queue.top();
    queue.pop();
    Symbol& a = sym[top.left];
    if (a.len == 0 || a.next < 0 || a.len + sym[a.next].len != top.len) continue;  // stale
    Symbol& b = sym[a.next];
    a.len += b.len;
    b.len = 0;
    a.next = b.next;
    if (a.next >= 0) sym[a.next].prev = top.left;
    try_pair(a.prev);
    try_pair(top.left);
  }
  // 4. Emit pieces, falling back to bytes.
  for (int i = sym.empty() ? -1 : 0; i >= 0; i = sym[i].next) {
    absl::string_view piece = absl::string_view(s).substr(sym[i].start, sym[i].len);
    auto it = piece_to_id_.find(piece);
    if (it != piece_to_id_.end()) {
      out.push_back(it->second);
      continue;
    }
    for (unsigned char c : piece) {
      int32_t id = byte_token_[c];
      out.push_back(id >= 0 ? id : 0);  // 0 = <unk> when a vocabulary lacks byte pieces
    }
  }
  if (eos) out.push_back(eos_id_);
  return out;
}

std::string Tokenizer::Decode(int32_t prev, int32_t token) const {
  if (token < 0 || token >= vocab_size()) return "";
  Kind k = kinds_[token];
  if (k == Kind::kControl || k == Kind::kUnknown || k == Kind::kUnused) {
    return source_ == "llama2.c" && k == Kind::kUnknown ? pieces_[token] : "";
  }
  if (k == Kind::kByte) return std::string(1, static_cast<char>(ParseBytePiece(pieces_[token])));
  std::string out;
  const std::string& p = pieces_[token];
  for (size_t i = 0; i < p.size();) {
    if (p.compare(i, space_.size(), space_) == 0) {
      out += ' ';
      i += space_.size();
    } else {
      out += p[i++];
    }
  }
  if (prev == bos_id_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

std::string Tokenizer::DecodeAll(std::span<const int32_t> ids, int32_t prev) const {
  std::string out;
  for (int32_t id : ids) {
    out += Decode(prev, id);
    prev = id;
  }
  return out;
}

std::string Tokenizer::CanonicalBytes() const {
  std::string out = absl::StrCat("tokenizer:", source_, ":", space_, ":", add_dummy_prefix_, ":", add_bos_, ":",
                                 bos_id_, ":", eos_id_, ":", pieces_.size(), "\n");
  for (size_t i = 0; i < pieces_.size(); ++i) {
    uint32_t len = static_cast<uint32_t>(pieces_[i].size());
    out.append(reinterpret_cast<const char*>(&len), 4);
    out += pieces_[i];
    out.append(reinterpret_cast<const char*>(&scores_[i]), 4);
    int32_t k = static_cast<int32_t>(kinds_[i]);
    out.append(reinterpret_cast<const char*>(&k), 4);
  }
  return out;
}

}  // namespace ape
