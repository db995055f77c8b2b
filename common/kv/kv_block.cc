#include "common/kv/kv_block.h"

#include <immintrin.h>

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/engine/byte_reader.h"
#include "common/engine/half.h"
#include "common/engine/status_macros.h"
#include "xxhash.h"

namespace ape {
namespace {

// The fixed header of kv_block_format.md, in the order it is written.
constexpr char kMagic[] = {'A', 'P', 'E', 'K', 'V', '\r', '\n', '\x1a'};  // offset 0
constexpr size_t kMagicBytes = sizeof(kMagic);
constexpr size_t kHashBytes = sizeof(Hash128);     // fingerprint, prefix key, checksum: 128 bits
constexpr size_t kTokenIdBytes = sizeof(int32_t);  // each token id, from offset kKvHeaderFixedBytes
constexpr uint32_t kReserved32 = 0;                // offset 60
constexpr uint64_t kReserved64 = 0;                // offset 88
// magic | version, header_bytes | fingerprint | n_layers .. reserved (8 u32) |
// prefix key | payload_bytes, reserved (2 u64): offsets 0, 8, 16, 32, 64, 80.
static_assert(kMagicBytes + 2 * sizeof(uint32_t) + kHashBytes + 8 * sizeof(uint32_t) + kHashBytes +
                  2 * sizeof(uint64_t) ==
              kKvHeaderFixedBytes);
static_assert(kKvChecksumBytes == kHashBytes);

// Reader limits (kv_block_format.md): n_layers, n_kv_heads and head_dim in
// 1..kMaxShapeField, num_tokens in 1..kMaxTokens. Beyond them a header is
// corrupt rather than huge (no real model or block comes near).
constexpr uint32_t kMaxShapeField = 1 << 16;
constexpr uint32_t kMaxTokens = 1 << 28;

uint64_t HeaderBytes(uint64_t num_tokens) { return kKvHeaderFixedBytes + kTokenIdBytes * num_tokens; }

template <typename T>
void Put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

void PutHash(std::string& out, const Hash128& h) { out.append(reinterpret_cast<const char*>(h.data()), h.size()); }

Hash128 Checksum(const uint8_t* data, size_t n) {
  XXH128_hash_t h = XXH3_128bits(data, n);
  return HashFromHalves(h.high64, h.low64);
}

absl::Status Corrupt(const std::string& what) { return absl::DataLossError(absl::StrCat("KV block: ", what)); }

// Index of the first int8 row scale (kv_cache.h) that is NaN, infinite or
// negative, counted over the payload's scales, or -1. No encoder writes one.
int64_t FirstBadScale(std::span<const uint8_t> payload, const KvBlockHeader& h) {
  const size_t row = KvRowBytes(h.dtype, h.n_kv_heads, h.head_dim), kv_dim = size_t{h.n_kv_heads} * h.head_dim;
  const size_t rows = payload.size() / row;
  for (size_t r = 0; r < rows; ++r) {
    for (uint32_t g = 0; g < h.n_kv_heads; ++g) {
      const float s = Int8Scale(payload.data() + r * row, static_cast<int>(kv_dim), static_cast<int>(g));
      if (!(s >= 0.f && s <= std::numeric_limits<float>::max())) return static_cast<int64_t>(r * h.n_kv_heads + g);
    }
  }
  return -1;
}

// Index of the first NaN or infinity in a payload of `dtype` values, or -1:
// the exponent bits all set (float16: 0x7C00 of 16 bits; float32: 0x7F800000).
// 32 bytes at a time (the whole payload of every block read is scanned: at
// 16K cached tokens, hundreds of MB per request), the exact index found
// again one value at a time only when a vector holds a bad one.
int64_t FirstNonFinite(std::span<const uint8_t> payload, KvDtype dtype) {
  const bool f16 = dtype == KvDtype::kFloat16;
  const size_t es = f16 ? sizeof(uint16_t) : sizeof(uint32_t);
  const size_t n = payload.size() / es;
  const uint8_t* p = payload.data();
  const __m256i mask16 = _mm256_set1_epi16(0x7C00), mask32 = _mm256_set1_epi32(0x7F800000);
  size_t i = 0;
  for (const size_t per = 32 / es; i + per <= n; i += per) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i * es));
    const __m256i bad = f16 ? _mm256_cmpeq_epi16(_mm256_and_si256(x, mask16), mask16)
                            : _mm256_cmpeq_epi32(_mm256_and_si256(x, mask32), mask32);
    if (!_mm256_testz_si256(bad, bad)) break;
  }
  for (; i < n; ++i) {
    if (f16) {
      uint16_t h;
      std::memcpy(&h, p + i * es, sizeof(h));
      if ((h & 0x7C00u) == 0x7C00u) return static_cast<int64_t>(i);
    } else {
      uint32_t u;
      std::memcpy(&u, p + i * es, sizeof(u));
      if ((u & 0x7F800000u) == 0x7F800000u) return static_cast<int64_t>(i);
    }
  }
  return -1;
}

bool InShapeRange(uint32_t v, uint32_t max) { return v >= 1 && v <= max; }

}  // namespace

const char* KvDtypeName(KvDtype d) {
  switch (d) {
    case KvDtype::kFloat16: return "float16";
    case KvDtype::kFloat32: return "float32";
    case KvDtype::kInt8: return "int8";
  }
  return "unknown";
}

absl::StatusOr<KvDtype> ParseKvDtype(absl::string_view name) {
  for (KvDtype d : {KvDtype::kFloat16, KvDtype::kFloat32, KvDtype::kInt8}) {
    if (name == KvDtypeName(d)) return d;
  }
  return absl::InvalidArgumentError(absl::StrCat("KV dtype '", name, "' is not float16, float32 or int8"));
}

KvElement KvDtypeElement(KvDtype d) {
  switch (d) {
    case KvDtype::kFloat16: return KvElement::kFloat16;
    case KvDtype::kInt8: return KvElement::kInt8;
    case KvDtype::kFloat32: break;
  }
  return KvElement::kFloat32;
}

std::string HashToHex(const Hash128& h) {
  static const char* kHex = "0123456789abcdef";
  std::string s(2 * h.size(), '0');
  for (size_t i = 0; i < h.size(); ++i) {
    s[2 * i] = kHex[h[i] >> 4];
    s[2 * i + 1] = kHex[h[i] & 15];
  }
  return s;
}

Hash128 HashFromHalves(uint64_t high64, uint64_t low64) {
  Hash128 out;
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<uint8_t>(high64 >> (56 - 8 * i));
    out[8 + i] = static_cast<uint8_t>(low64 >> (56 - 8 * i));
  }
  return out;
}

absl::StatusOr<Hash128> HashFromHex(const std::string& hex) {
  Hash128 h;
  if (hex.size() != 2 * h.size())
    return absl::InvalidArgumentError(absl::StrCat("hash '", hex, "' is not 32 hex digits"));
  for (size_t i = 0; i < hex.size(); ++i) {
    char c = hex[i];
    int v = c >= '0' && c <= '9'   ? c - '0'
            : c >= 'a' && c <= 'f' ? c - 'a' + 10
            : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                   : -1;
    if (v < 0) return absl::InvalidArgumentError(absl::StrCat("hash '", hex, "' is not 32 hex digits"));
    if (i % 2 == 0)
      h[i / 2] = static_cast<uint8_t>(v << 4);
    else
      h[i / 2] |= static_cast<uint8_t>(v);
  }
  return h;
}

uint64_t KvBytesPerToken(const ModelConfig& c, KvDtype dtype) {
  return 2ull * c.n_layers * KvRowBytes(dtype, c.n_kv_heads, c.head_dim);
}

std::string SerializeKvBlock(const KvBlockHeader& h, std::span<const int32_t> tokens, const KvCache& cache,
                             int first_slot) {
  const size_t kv_dim = static_cast<size_t>(h.n_kv_heads) * h.head_dim;
  const uint64_t header_bytes = HeaderBytes(tokens.size());
  std::string out;
  out.reserve(header_bytes + h.payload_bytes() + kKvChecksumBytes);
  out.append(kMagic, kMagicBytes);
  Put<uint32_t>(out, kKvFormatVersion);
  Put<uint32_t>(out, static_cast<uint32_t>(header_bytes));
  PutHash(out, h.model_fingerprint);
  Put<uint32_t>(out, h.n_layers);
  Put<uint32_t>(out, h.n_kv_heads);
  Put<uint32_t>(out, h.head_dim);
  Put<uint32_t>(out, static_cast<uint32_t>(h.dtype));
  Put<uint32_t>(out, static_cast<uint32_t>(h.kind));
  Put<uint32_t>(out, h.num_tokens);
  Put<uint32_t>(out, h.first_position);
  Put<uint32_t>(out, kReserved32);
  PutHash(out, h.prefix_key);
  Put<uint64_t>(out, h.payload_bytes());
  Put<uint64_t>(out, kReserved64);
  for (int32_t t : tokens) Put<int32_t>(out, t);
  // Payload: per layer, K then V rows of the block's slots, converted once
  // (a run at a time: the slots may span the cache's segments): a row in
  // another dtype goes through float32.
  const KvElement want = KvDtypeElement(h.dtype);
  const size_t row_bytes = KvRowBytes(h.dtype, h.n_kv_heads, h.head_dim);
  std::vector<float> row_f32(kv_dim);
  std::vector<uint8_t> converted(row_bytes);
  for (uint32_t l = 0; l < h.n_layers; ++l) {
    for (const bool keys : {true, false}) {
      cache.ForEachRun(first_slot, static_cast<int>(h.num_tokens), [&](const KvSegment& seg, int first, int n) {
        for (int j = 0; j < n; ++j) {
          const uint8_t* r = keys ? seg.key_row(l, first + j) : seg.value_row(l, first + j);
          if (seg.element == want) {  // stored as the block wants it: the row as it is
            out.append(reinterpret_cast<const char*>(r), row_bytes);
            continue;
          }
          const float* x =
              RowAsFloat(seg.element, r, static_cast<int>(h.n_kv_heads), static_cast<int>(h.head_dim), row_f32.data());
          switch (want) {
            case KvElement::kFloat32: out.append(reinterpret_cast<const char*>(x), row_bytes); continue;
            case KvElement::kFloat16: FloatToHalf(x, reinterpret_cast<uint16_t*>(converted.data()), kv_dim); break;
            case KvElement::kInt8:
              QuantizeInt8Row(x, static_cast<int>(h.n_kv_heads), static_cast<int>(h.head_dim), converted.data());
              break;
          }
          out.append(reinterpret_cast<const char*>(converted.data()), row_bytes);
        }
      });
    }
  }
  PutHash(out, Checksum(reinterpret_cast<const uint8_t*>(out.data()), out.size()));
  return out;
}

bool HasKvBlockMagic(std::span<const uint8_t> bytes) {
  return bytes.size() >= kMagicBytes && std::memcmp(bytes.data(), kMagic, kMagicBytes) == 0;
}

absl::StatusOr<KvBlockHeader> ParseKvBlockHeader(std::span<const uint8_t> bytes) {
  ByteReader r(bytes, "KV block");
  if (!HasKvBlockMagic(bytes)) return Corrupt("bad magic (not a KV block)");
  if (bytes.size() < kKvHeaderFixedBytes) {
    return Corrupt(absl::StrCat("only ", bytes.size(), " bytes, shorter than a header"));
  }
  RETURN_IF_ERROR(r.Seek(kMagicBytes, "magic"));
  uint32_t version, header_bytes, dtype, kind, reserved32;
  uint64_t payload_bytes, reserved64;
  KvBlockHeader h;
  RETURN_IF_ERROR(r.Read(&version, "version"));
  if (version != kKvFormatVersion) {
    return absl::UnimplementedError(
        absl::StrCat("KV block: format version ", version, ", this build reads ", kKvFormatVersion));
  }
  RETURN_IF_ERROR(r.Read(&header_bytes, "header_bytes"));
  RETURN_IF_ERROR(r.Read(&h.model_fingerprint, "fingerprint"));
  RETURN_IF_ERROR(r.Read(&h.n_layers, "n_layers"));
  RETURN_IF_ERROR(r.Read(&h.n_kv_heads, "n_kv_heads"));
  RETURN_IF_ERROR(r.Read(&h.head_dim, "head_dim"));
  RETURN_IF_ERROR(r.Read(&dtype, "dtype"));
  RETURN_IF_ERROR(r.Read(&kind, "kind"));
  RETURN_IF_ERROR(r.Read(&h.num_tokens, "num_tokens"));
  RETURN_IF_ERROR(r.Read(&h.first_position, "first_position"));
  RETURN_IF_ERROR(r.Read(&reserved32, "reserved"));
  RETURN_IF_ERROR(r.Read(&h.prefix_key, "prefix_key"));
  RETURN_IF_ERROR(r.Read(&payload_bytes, "payload_bytes"));
  RETURN_IF_ERROR(r.Read(&reserved64, "reserved"));
  if (dtype != static_cast<uint32_t>(KvDtype::kFloat16) && dtype != static_cast<uint32_t>(KvDtype::kFloat32) &&
      dtype != static_cast<uint32_t>(KvDtype::kInt8)) {
    return Corrupt(absl::StrCat("unknown dtype ", dtype));
  }
  if (kind != static_cast<uint32_t>(KvKind::kPrefix) && kind != static_cast<uint32_t>(KvKind::kContext)) {
    return Corrupt(absl::StrCat("unknown kind ", kind));
  }
  h.dtype = static_cast<KvDtype>(dtype);
  h.kind = static_cast<KvKind>(kind);
  if (!InShapeRange(h.n_layers, kMaxShapeField) || !InShapeRange(h.n_kv_heads, kMaxShapeField) ||
      !InShapeRange(h.head_dim, kMaxShapeField) || !InShapeRange(h.num_tokens, kMaxTokens)) {
    return Corrupt("shape fields out of range");
  }
  if (header_bytes != HeaderBytes(h.num_tokens)) {
    return Corrupt(absl::StrCat("header_bytes ", header_bytes, " disagrees with ", h.num_tokens, " tokens"));
  }
  if (payload_bytes != h.payload_bytes()) {
    return Corrupt(
        absl::StrCat("payload_bytes ", payload_bytes, " disagrees with the shape (", h.payload_bytes(), ")"));
  }
  return h;
}

uint64_t KvBlockBytes(const KvBlockHeader& h) {
  return HeaderBytes(h.num_tokens) + h.payload_bytes() + kKvChecksumBytes;
}

absl::StatusOr<KvBlockView> ParseKvBlock(std::span<const uint8_t> bytes) {
  if (!HasKvBlockMagic(bytes)) return Corrupt("bad magic (not a KV block)");
  if (bytes.size() < kKvHeaderFixedBytes + kKvChecksumBytes) {
    return Corrupt(absl::StrCat("only ", bytes.size(), " bytes, shorter than a header"));
  }
  KvBlockView v;
  ASSIGN_OR_RETURN(v.header, ParseKvBlockHeader(bytes));
  const KvBlockHeader& h = v.header;
  const uint64_t header_bytes = HeaderBytes(h.num_tokens), payload_bytes = h.payload_bytes();
  const uint64_t total = uint64_t{header_bytes} + payload_bytes + kKvChecksumBytes;
  if (bytes.size() != total) { return Corrupt(absl::StrCat("size ", bytes.size(), " bytes, header says ", total)); }
  const uint64_t checksum_offset = total - kKvChecksumBytes;
  Hash128 want;
  std::memcpy(want.data(), bytes.data() + checksum_offset, kKvChecksumBytes);
  if (Checksum(bytes.data(), checksum_offset) != want) return Corrupt("checksum mismatch");
  v.tokens.resize(h.num_tokens);
  std::memcpy(v.tokens.data(), bytes.data() + kKvHeaderFixedBytes, kTokenIdBytes * h.num_tokens);
  v.payload = bytes.subspan(header_bytes, payload_bytes);
  // A checksum proves the bytes are what a writer sealed, not that the writer
  // was an encoder: keys and values a model computes are finite (int8: any
  // byte is a value, the scales must be finite and not negative).
  if (h.dtype == KvDtype::kInt8) {
    if (const int64_t bad = FirstBadScale(v.payload, h); bad >= 0) {
      return Corrupt(absl::StrCat("payload scale ", bad, " is NaN, infinite or negative"));
    }
  } else if (const int64_t bad = FirstNonFinite(v.payload, h.dtype); bad >= 0) {
    return Corrupt(absl::StrCat("payload value ", bad, " is NaN or infinite"));
  }
  return v;
}

absl::Status CheckKvBlockMatches(const KvBlockView& b, const Hash128& fingerprint, const ModelConfig& c, KvDtype dtype,
                                 KvKind kind, const Hash128& prefix_key) {
  const KvBlockHeader& h = b.header;
  if (h.model_fingerprint != fingerprint) {
    return absl::FailedPreconditionError(
        absl::StrCat("KV block was made by model ", HashToHex(h.model_fingerprint), ", not ", HashToHex(fingerprint)));
  }
  if (h.n_layers != static_cast<uint32_t>(c.n_layers) || h.n_kv_heads != static_cast<uint32_t>(c.n_kv_heads) ||
      h.head_dim != static_cast<uint32_t>(c.head_dim)) {
    return absl::FailedPreconditionError("KV block shape does not match the model");
  }
  if (h.dtype != dtype) {
    return absl::FailedPreconditionError(
        absl::StrCat("KV block holds ", KvDtypeName(h.dtype), ", not ", KvDtypeName(dtype)));
  }
  if (h.kind != kind) return absl::FailedPreconditionError("KV block is of the wrong kind (prefix/context)");
  if (h.prefix_key != prefix_key) {
    return absl::FailedPreconditionError(
        absl::StrCat("KV block was encoded after prefix ", HashToHex(h.prefix_key), ", not ", HashToHex(prefix_key)));
  }
  for (int32_t t : b.tokens) {
    if (t < 0 || t >= c.vocab_size)
      return absl::FailedPreconditionError("KV block holds token ids outside the vocabulary");
  }
  return absl::OkStatus();
}

namespace {

// FAILED_PRECONDITION unless the block has the cache's shape and a payload
// of the size its header gives.
absl::Status CheckFitsCache(const KvBlockView& b, const KvCache& cache) {
  const KvBlockHeader& h = b.header;
  // Every size below comes from stored bytes: check it against the cache
  // before writing a single slot.
  if (h.n_layers != static_cast<uint32_t>(cache.n_layers) || h.n_kv_heads != static_cast<uint32_t>(cache.n_kv_heads) ||
      static_cast<uint64_t>(h.n_kv_heads) * h.head_dim != static_cast<uint64_t>(cache.kv_dim)) {
    return absl::FailedPreconditionError("KV block shape does not match the cache");
  }
  if (b.payload.size() != h.payload_bytes()) return absl::FailedPreconditionError("KV block payload size is wrong");
  return absl::OkStatus();
}

}  // namespace

absl::Status LoadKvBlock(const KvBlockView& b, KvCache& cache, int dest_slot) {
  const KvBlockHeader& h = b.header;
  RETURN_IF_ERROR(CheckFitsCache(b, cache));
  if (dest_slot < cache.writable_begin || static_cast<int64_t>(dest_slot) + h.num_tokens > cache.capacity) {
    return absl::FailedPreconditionError(absl::StrCat("KV block of ", h.num_tokens, " tokens does not fit slots ",
                                                      dest_slot, ".. of a cache of ", cache.capacity,
                                                      " (writable from ", cache.writable_begin, ")"));
  }
  const size_t n = static_cast<size_t>(h.num_tokens) * h.n_kv_heads * h.head_dim;
  const size_t row_bytes = KvRowBytes(h.dtype, h.n_kv_heads, h.head_dim), kv_dim = size_t{h.n_kv_heads} * h.head_dim;
  const uint8_t* p = b.payload.data();
  for (uint32_t l = 0; l < h.n_layers; ++l) {
    for (float* dst : {cache.key(l, dest_slot), cache.value(l, dest_slot)}) {
      if (h.dtype == KvDtype::kFloat16) {
        HalfToFloat(reinterpret_cast<const uint16_t*>(p), dst, n);  // payload offsets are even
      } else if (h.dtype == KvDtype::kInt8) {
        for (uint32_t j = 0; j < h.num_tokens; ++j) {
          DequantizeInt8Row(p + j * row_bytes, static_cast<int>(h.n_kv_heads), static_cast<int>(h.head_dim),
                            dst + j * kv_dim);
        }
      } else {
        std::memcpy(dst, p, n * sizeof(float));
      }
      p += h.num_tokens * row_bytes;
    }
  }
  for (uint32_t i = 0; i < h.num_tokens; ++i) cache.pos[dest_slot + i] = static_cast<int32_t>(h.first_position + i);
  return absl::OkStatus();
}

absl::Status AttachKvBlock(const KvBlockView& b, std::shared_ptr<const void> owner, KvCache& cache) {
  const KvBlockHeader& h = b.header;
  RETURN_IF_ERROR(CheckFitsCache(b, cache));
  // The payload is, per layer, K [num_tokens][kv_dim] then V likewise: a
  // segment with a row stride of kv_dim elements and a layer stride of two
  // K/V halves.
  const size_t row_bytes = KvRowBytes(h.dtype, h.n_kv_heads, h.head_dim);
  const size_t half = static_cast<size_t>(h.num_tokens) * row_bytes;
  KvSegment seg;
  seg.count = static_cast<int>(h.num_tokens);
  seg.element = KvDtypeElement(h.dtype);
  seg.k = b.payload.data();
  seg.v = b.payload.data() + half;
  seg.row_stride = row_bytes;
  seg.layer_stride = 2 * half;
  seg.owner = std::move(owner);
  return cache.AppendReadOnly(std::move(seg), static_cast<int>(h.first_position));
}

}  // namespace ape
