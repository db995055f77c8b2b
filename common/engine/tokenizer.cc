#include "common/engine/tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <queue>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/engine/bpe.h"
#include "common/engine/bpe_pretokenizer.h"
#include "common/engine/byte_reader.h"
#include "common/engine/gguf.h"
#include "common/engine/mapped_file.h"
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

// Texts of tokens that end a turn, from llama.cpp's list (src/llama-vocab.cpp,
// special_eog_ids; DeepSeek's is "<｜end▁of▁sentence｜>"), and of the
// fill-in-the-middle pad / repo / file-separator tokens, which it also counts.
constexpr const char* kEndOfGenerationTexts[] = {
    "<|eot_id|>",  "<|im_end|>",  "<|end|>",   "<end_of_turn>",   "<|endoftext|>",      "</s>",
    "<|eom_id|>",  "<EOT>",       "_<EOT>",    "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>",
    "<|fim_pad|>", "<fim-pad>",   "<fim_pad>", "<|fim_repo|>",    "<|repo_name|>",      "<fim-repo>",
    "<reponame>",  "<|file_sep|>"};

// Optional token id `key`: `*id` unchanged when absent.
absl::Status ReadOptionalId(const GgufFile& g, const std::string& key, int32_t* id) {
  if (!g.Has(key)) return absl::OkStatus();
  ASSIGN_OR_RETURN(int64_t v, g.GetInt(key));
  if (v < 0 || v > INT32_MAX) return absl::InvalidArgumentError(absl::StrCat(g.what(), ": ", key, " = ", v));
  *id = static_cast<int32_t>(v);
  return absl::OkStatus();
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
  RETURN_IF_ERROR(t.Finish(what));
  return t;
}

absl::StatusOr<Tokenizer> Tokenizer::FromGguf(const GgufFile& g) {
  ASSIGN_OR_RETURN(std::string model, g.GetString("tokenizer.ggml.model"));
  Tokenizer t;
  t.source_ = "gguf";
  t.model_ = model;
  if (model == "llama") {
    t.space_ = kSpmSpace;
  } else if (model == "gpt2") {
    RETURN_IF_ERROR(t.ReadGgufPreTokenizer(g));
  } else {
    return absl::UnimplementedError(absl::StrCat(g.what(), ": tokenizer.ggml.model '", model,
                                                 "' is not supported (only 'llama' SentencePiece and 'gpt2' BPE)"));
  }
  RETURN_IF_ERROR(t.ReadGgufVocabulary(g));
  RETURN_IF_ERROR(t.Finish(g.what()));
  RETURN_IF_ERROR(t.ReadGgufEndOfGeneration(g));
  if (model == "gpt2") {
    ASSIGN_OR_RETURN(std::vector<std::string> merges, g.GetStringArray("tokenizer.ggml.merges"));
    ASSIGN_OR_RETURN(BpeMerges bpe, BpeMerges::Build(merges, t.piece_to_id_, g.what()));
    t.merges_ = std::make_shared<const BpeMerges>(std::move(bpe));
  }
  return t;
}

// tokenizer.ggml.pre, and llama.cpp's defaults for byte-level vocabularies:
// no dummy prefix, BOS = EOS = 11 unless the file says, add_bos as the
// pre-tokenizer says unless the file says.
absl::Status Tokenizer::ReadGgufPreTokenizer(const GgufFile& g) {
  std::string pre;
  if (g.Has("tokenizer.ggml.pre")) { ASSIGN_OR_RETURN(pre, g.GetString("tokenizer.ggml.pre")); }
  auto pre_tokenizer = BpePreTokenizer::ForName(pre);
  if (!pre_tokenizer.ok()) {
    return absl::Status(pre_tokenizer.status().code(), absl::StrCat(g.what(), ": ", pre_tokenizer.status().message()));
  }
  add_dummy_prefix_ = false;
  bos_id_ = eos_id_ = 11;
  add_bos_ = pre_tokenizer->default_add_bos();
  pre_tokenizer_ = std::make_shared<const BpePreTokenizer>(*std::move(pre_tokenizer));
  return absl::OkStatus();
}

// The end-of-generation ids the file names, besides EOS (added by Finish).
absl::Status Tokenizer::ReadGgufEndOfGeneration(const GgufFile& g) {
  for (const char* key :
       {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id", "tokenizer.ggml.fim_pad_token_id",
        "tokenizer.ggml.fim_rep_token_id", "tokenizer.ggml.fim_sep_token_id"}) {
    int32_t id = -1;
    RETURN_IF_ERROR(ReadOptionalId(g, key, &id));
    if (id >= vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat(g.what(), ": ", key, " = ", id, " is outside the vocabulary"));
    }
    if (id >= 0) eog_ids_.insert(std::lower_bound(eog_ids_.begin(), eog_ids_.end(), id), id);
  }
  eog_ids_.erase(std::unique(eog_ids_.begin(), eog_ids_.end()), eog_ids_.end());
  return absl::OkStatus();
}

// Tokens, scores, types, BOS/EOS ids and flags: the keys both models share.
absl::Status Tokenizer::ReadGgufVocabulary(const GgufFile& g) {
  ASSIGN_OR_RETURN(pieces_, g.GetStringArray("tokenizer.ggml.tokens"));
  const size_t n = pieces_.size();
  if (n < 4) return absl::InvalidArgumentError(absl::StrCat(g.what(), ": vocabulary has ", n, " tokens"));
  if (g.Has("tokenizer.ggml.scores")) {
    ASSIGN_OR_RETURN(scores_, g.GetFloatArray("tokenizer.ggml.scores"));
  } else {
    scores_.assign(n, 0.f);
  }
  std::vector<int32_t> types(n, static_cast<int32_t>(Kind::kNormal));
  if (g.Has("tokenizer.ggml.token_type")) { ASSIGN_OR_RETURN(types, g.GetIntArray("tokenizer.ggml.token_type")); }
  if (scores_.size() != n || types.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat(g.what(), ": tokenizer arrays disagree: ", n, " tokens, ",
                                                   scores_.size(), " scores, ", types.size(), " types"));
  }
  for (int32_t ty : types) {
    if (ty < 1 || ty > 6) ty = 1;
    kinds_.push_back(static_cast<Kind>(ty));
  }
  RETURN_IF_ERROR(ReadOptionalId(g, "tokenizer.ggml.bos_token_id", &bos_id_));
  RETURN_IF_ERROR(ReadOptionalId(g, "tokenizer.ggml.eos_token_id", &eos_id_));
  if (g.Has("tokenizer.ggml.add_bos_token")) { ASSIGN_OR_RETURN(add_bos_, g.GetBool("tokenizer.ggml.add_bos_token")); }
  if (g.Has("tokenizer.ggml.add_space_prefix")) {
    ASSIGN_OR_RETURN(add_dummy_prefix_, g.GetBool("tokenizer.ggml.add_space_prefix"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Tokenizer> Tokenizer::FromGgufFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> file, MappedFile::Open(path));
  ASSIGN_OR_RETURN(GgufFile g, GgufFile::Parse(file->bytes(), path));
  return FromGguf(g);  // copies what it keeps: the file may go
}

absl::Status Tokenizer::Finish(const std::string& what) {
  const int32_t n = static_cast<int32_t>(pieces_.size());
  if (bos_id_ < 0 || bos_id_ >= n || eos_id_ < 0 || eos_id_ >= n) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": BOS ", bos_id_, " or EOS ", eos_id_, " outside the vocabulary of ", n));
  }
  for (auto& b : byte_token_) b = -1;
  piece_to_id_.reserve(n);
  for (int32_t i = 0; i < n; ++i) {
    piece_to_id_.emplace(pieces_[i], i);  // first id wins on duplicates
    int b = model_ == "llama" ? ParseBytePiece(pieces_[i]) : -1;
    if (b >= 0 && byte_token_[b] < 0) {
      byte_token_[b] = i;
      kinds_[i] = Kind::kByte;
    }
  }
  IndexSpecialTokens();
  return absl::OkStatus();
}

void Tokenizer::IndexSpecialTokens() {
  // End of generation by text; such tokens count as control tokens.
  eog_ids_ = {eos_id_};
  for (const char* text : kEndOfGenerationTexts) {
    auto it = piece_to_id_.find(text);
    if (it == piece_to_id_.end()) continue;
    eog_ids_.push_back(it->second);
    kinds_[it->second] = Kind::kControl;
  }
  std::sort(eog_ids_.begin(), eog_ids_.end());
  eog_ids_.erase(std::unique(eog_ids_.begin(), eog_ids_.end()), eog_ids_.end());
  // Tokens that may appear in text, longest first (ties: lower id first).
  for (int32_t i = 0; i < vocab_size(); ++i) {
    const Kind k = kinds_[i];
    if (k == Kind::kControl || k == Kind::kUnknown || k == Kind::kUserDefined) special_.push_back(i);
  }
  std::stable_sort(special_.begin(), special_.end(),
                   [&](int32_t a, int32_t b) { return pieces_[a].size() > pieces_[b].size(); });
}

bool Tokenizer::IsEndOfGeneration(int32_t id) const { return std::binary_search(eog_ids_.begin(), eog_ids_.end(), id); }

const std::string& Tokenizer::pre() const {
  static const std::string kNone;
  return pre_tokenizer_ ? pre_tokenizer_->name() : kNone;
}

std::vector<Tokenizer::Fragment> Tokenizer::SplitSpecial(absl::string_view text, bool parse_special) const {
  std::vector<Fragment> fragments, next;
  if (!text.empty()) fragments.push_back({-1, text});
  for (int32_t id : special_) {
    if (!parse_special && kinds_[id] != Kind::kUserDefined) continue;
    const std::string& s = pieces_[id];
    if (s.empty()) continue;
    next.clear();
    for (const Fragment& f : fragments) {
      if (f.token >= 0) {
        next.push_back(f);
        continue;
      }
      absl::string_view rest = f.text;
      for (size_t at = rest.find(s); at != absl::string_view::npos; at = rest.find(s)) {
        if (at > 0) next.push_back({-1, rest.substr(0, at)});
        next.push_back({id, {}});
        rest.remove_prefix(at + s.size());
      }
      if (!rest.empty()) next.push_back({-1, rest});
    }
    fragments.swap(next);
  }
  return fragments;
}

std::vector<int32_t> Tokenizer::Encode(absl::string_view text, bool bos, bool eos, bool parse_special) const {
  std::vector<int32_t> out;
  if (bos) out.push_back(bos_id_);
  bool after_special = true;  // the text's start counts as one (SentencePiece's dummy prefix)
  for (const Fragment& f : SplitSpecial(text, parse_special)) {
    if (f.token >= 0) {
      out.push_back(f.token);
      after_special = true;
      continue;
    }
    if (merges_) {
      EncodeByteLevel(f.text, &out);
    } else {
      EncodeSentencePiece(f.text, add_dummy_prefix_ && after_special, &out);
    }
    after_special = false;
  }
  if (eos) out.push_back(eos_id_);
  return out;
}

void Tokenizer::EncodeByteLevel(absl::string_view text, std::vector<int32_t>* out) const {
  std::vector<absl::string_view> words;
  pre_tokenizer_->Split(text, &words);
  for (absl::string_view word : words) {
    if (pre_tokenizer_->ignore_merges()) {
      auto it = piece_to_id_.find(BytesToUnicode(word));
      if (it != piece_to_id_.end()) {
        out->push_back(it->second);
        continue;
      }
    }
    merges_->Encode(word, out);
  }
}

void Tokenizer::EncodeSentencePiece(absl::string_view text, bool dummy_prefix, std::vector<int32_t>* out) const {
  // 1. Normalise.
  std::string s;
  s.reserve(text.size() + 8);
  if (dummy_prefix) s += space_;
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
      out->push_back(it->second);
      continue;
    }
    for (unsigned char c : piece) {
      int32_t id = byte_token_[c];
      out->push_back(id >= 0 ? id : 0);  // 0 = <unk> when a vocabulary lacks byte pieces
    }
  }
}

std::string Tokenizer::Decode(int32_t prev, int32_t token) const {
  if (token < 0 || token >= vocab_size()) return "";
  const Kind k = kinds_[token];
  const std::string& p = pieces_[token];
  if (k == Kind::kControl || k == Kind::kUnknown || k == Kind::kUnused) {
    return source_ == "llama2.c" && k == Kind::kUnknown ? p : "";
  }
  if (k == Kind::kByte) {
    const int b = ParseBytePiece(p);
    return b >= 0 ? std::string(1, static_cast<char>(b)) : "";
  }
  if (merges_) return k == Kind::kUserDefined ? p : UnicodeToBytes(p);
  std::string out;
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
  if (merges_) {  // byte-level BPE: the pre-tokenizer, merges and end-of-generation set too
    absl::StrAppend(&out, "bpe:", pre_tokenizer_->name(), ":", pre_tokenizer_->ignore_merges(), ":",
                    absl::StrJoin(pre_tokenizer_->regexes(), "\n"), "\neog:", absl::StrJoin(eog_ids_, ","), "\n");
    out += merges_->CanonicalBytes();
  }
  return out;
}

}  // namespace ape
