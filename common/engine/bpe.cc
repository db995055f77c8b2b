#include "common/engine/bpe.h"

#include <algorithm>
#include <array>

#include "absl/strings/str_cat.h"

namespace ape {
namespace {

// Bytes that GPT-2 writes as themselves: printable ASCII and Latin-1.
bool IsPrintableByte(uint8_t b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; }

struct ByteTable {
  uint32_t code_point[256];
  int16_t byte_of[324];  // code point -> byte, -1 if none (all code points are < 256 + 68)
};

const ByteTable& Table() {
  static const ByteTable table = [] {
    ByteTable t;
    std::fill(std::begin(t.byte_of), std::end(t.byte_of), int16_t{-1});
    uint32_t next = 256;  // the 68 others, in byte order
    for (int b = 0; b < 256; ++b) {
      t.code_point[b] = IsPrintableByte(b) ? b : next++;
      t.byte_of[t.code_point[b]] = static_cast<int16_t>(b);
    }
    return t;
  }();
  return table;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace

uint32_t ByteToCodePoint(uint8_t b) { return Table().code_point[b]; }

std::string BytesToUnicode(absl::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) AppendUtf8(ByteToCodePoint(static_cast<uint8_t>(c)), &out);
  return out;
}

std::string UnicodeToBytes(absl::string_view text) {
  // The table's code points are all below U+0800: one or two UTF-8 bytes.
  std::string out;
  for (size_t i = 0; i < text.size();) {
    const uint8_t c = static_cast<uint8_t>(text[i]);
    uint32_t cp = c;
    size_t len = 1;
    if ((c >> 5) == 0x6 && i + 1 < text.size() && (static_cast<uint8_t>(text[i + 1]) & 0xC0) == 0x80) {
      cp = ((c & 0x1F) << 6) | (static_cast<uint8_t>(text[i + 1]) & 0x3F);
      len = 2;
    }
    const int b = cp < 324 ? Table().byte_of[cp] : -1;
    if (b >= 0) {
      out.push_back(static_cast<char>(b));
    } else {
      out.append(text.data() + i, len);  // not a byte-level code point: keep it
    }
    i += len;
  }
  return out;
}

absl::StatusOr<BpeMerges> BpeMerges::Build(std::span<const std::string> merges,
                                           const absl::flat_hash_map<std::string, int32_t>& piece_to_id,
                                           const std::string& what) {
  BpeMerges bpe;
  for (int b = 0; b < 256; ++b) {
    std::string s;
    AppendUtf8(ByteToCodePoint(static_cast<uint8_t>(b)), &s);
    auto it = piece_to_id.find(s);
    bpe.byte_token_[b] = it == piece_to_id.end() ? -1 : it->second;
  }
  bpe.merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const std::string& m = merges[rank];
    // As llama.cpp: split at the first space after the first byte.
    const size_t space = m.find(' ', 1);
    const auto error = [&](absl::string_view fault) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": tokenizer.ggml.merges[", rank, "] '", m, "' ", fault));
    };
    if (space == std::string::npos) return error("has no space between its two sides");
    const absl::string_view left = absl::string_view(m).substr(0, space);
    const absl::string_view right = absl::string_view(m).substr(space + 1);
    auto l = piece_to_id.find(left), r = piece_to_id.find(right);
    auto merged = piece_to_id.find(absl::StrCat(left, right));
    if (l == piece_to_id.end() || r == piece_to_id.end() || merged == piece_to_id.end()) {
      return error("joins strings that are not all tokens");
    }
    // The first (lowest-rank) merge of a pair wins, as in llama.cpp.
    bpe.merges_.try_emplace(PairKey(l->second, r->second), Merge{static_cast<int32_t>(rank), merged->second});
  }
  return bpe;
}

std::string BpeMerges::CanonicalBytes() const {
  std::vector<std::array<int32_t, 4>> rows;
  rows.reserve(merges_.size());
  for (const auto& [key, m] : merges_) {
    rows.push_back({m.rank, static_cast<int32_t>(key >> 32), static_cast<int32_t>(key & 0xFFFFFFFF), m.id});
  }
  std::sort(rows.begin(), rows.end());
  std::string out(reinterpret_cast<const char*>(byte_token_), sizeof(byte_token_));
  out.append(reinterpret_cast<const char*>(rows.data()), rows.size() * sizeof(rows[0]));
  return out;
}

void BpeMerges::Encode(absl::string_view piece, std::vector<int32_t>* out) const {
  // 1. One symbol per byte, linked both ways so that merges unlink in O(1).
  struct Symbol {
    int32_t id, prev, next;
  };
  // A merge that was possible when queued; stale once either side changed.
  struct Candidate {
    int32_t rank, left, left_id, right_id, merged_id;
    bool operator<(const Candidate& o) const {  // heap top = lowest rank, then leftmost
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  thread_local std::vector<Symbol> sym;
  thread_local std::vector<Candidate> heap;
  sym.clear();
  heap.clear();
  for (char c : piece) {
    const int32_t id = byte_token_[static_cast<uint8_t>(c)];
    if (id < 0) continue;  // dropped, see the header
    const int32_t i = static_cast<int32_t>(sym.size());
    sym.push_back({id, i - 1, i + 1});
  }
  if (sym.empty()) return;
  sym.back().next = -1;
  const auto consider = [&](int32_t left) {
    if (left < 0 || sym[left].next < 0) return;
    const Symbol& a = sym[left];
    const Symbol& b = sym[a.next];
    auto it = merges_.find(PairKey(a.id, b.id));
    if (it == merges_.end()) return;
    heap.push_back({it->second.rank, left, a.id, b.id, it->second.id});
    std::push_heap(heap.begin(), heap.end());
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(sym.size()); ++i) consider(i);
  // 2. Merge the best pair until none is left.
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const Candidate c = heap.back();
    heap.pop_back();
    Symbol& a = sym[c.left];
    if (a.id != c.left_id || a.next < 0 || sym[a.next].id != c.right_id) continue;  // stale
    Symbol& b = sym[a.next];
    a.id = c.merged_id;
    a.next = b.next;
    if (a.next >= 0) sym[a.next].prev = c.left;
    b.id = -1;  // unlinked
    consider(a.prev);
    consider(c.left);
  }
  // 3. Emit.
  for (int32_t i = 0; i >= 0; i = sym[i].next) out->push_back(sym[i].id);
}

}  // namespace ape
