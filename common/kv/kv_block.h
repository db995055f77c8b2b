// KV blocks: the bytes of one cache entry. Format: kv_block_format.md.
#ifndef APESERVE_COMMON_KV_KV_BLOCK_H_
#define APESERVE_COMMON_KV_KV_BLOCK_H_

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/engine/kv_cache.h"

namespace ape {

constexpr uint32_t kKvFormatVersion = 1;
// The header up to the token ids (offsets 0..95 of kv_block_format.md); the
// whole header is kKvHeaderFixedBytes + 4 * num_tokens.
constexpr size_t kKvHeaderFixedBytes = 96;
// The XXH3-128 checksum that ends every block.
constexpr size_t kKvChecksumBytes = 16;

// The values are the format's (and ape.v1.KvDtype's): they are stored.
enum class KvDtype : uint32_t { kFloat16 = 1, kFloat32 = 2, kInt8 = 3 };
enum class KvKind : uint32_t { kPrefix = 1, kContext = 2 };
// "float16" / "float32" / "int8": the one spelling of a dtype in flags, logs
// and tools. ParseKvDtype is its inverse: INVALID_ARGUMENT for any other name.
const char* KvDtypeName(KvDtype d);
absl::StatusOr<KvDtype> ParseKvDtype(absl::string_view name);
// How the engine's caches hold a block's rows (the same layouts).
KvElement KvDtypeElement(KvDtype d);
// Bytes of one slot's K (or V) row: kv_dim values, and for int8 the
// per-KV-head scales after them (kv_cache.h).
inline uint64_t KvRowBytes(KvDtype d, uint32_t n_kv_heads, uint32_t head_dim) {
  return KvRowBytes(KvDtypeElement(d), static_cast<int>(n_kv_heads), static_cast<int>(head_dim));
}

using Hash128 = std::array<uint8_t, 16>;
// 32 lowercase hex digits <-> 16 bytes (high half first).
std::string HashToHex(const Hash128& h);
// The 16 bytes of a 128-bit hash given as its high and low halves (high first).
Hash128 HashFromHalves(uint64_t high64, uint64_t low64);
absl::StatusOr<Hash128> HashFromHex(const std::string& hex);

// The header fields (everything but token ids, payload and checksum).
struct KvBlockHeader {
  Hash128 model_fingerprint{};
  uint32_t n_layers = 0;
  uint32_t n_kv_heads = 0;
  uint32_t head_dim = 0;
  KvDtype dtype = KvDtype::kFloat16;
  KvKind kind = KvKind::kContext;
  uint32_t num_tokens = 0;
  uint32_t first_position = 0;
  Hash128 prefix_key{};
  uint64_t payload_bytes() const { return 2ull * n_layers * num_tokens * KvRowBytes(dtype, n_kv_heads, head_dim); }
};

// Bytes one token costs in a block: 2 * layers * KvRowBytes.
uint64_t KvBytesPerToken(const ModelConfig& c, KvDtype dtype);

// Serialises slots [first_slot, first_slot + header.num_tokens) of `cache`
// (converted to header.dtype once, here) with `tokens` into a block.
std::string SerializeKvBlock(const KvBlockHeader& header, std::span<const int32_t> tokens, const KvCache& cache,
                             int first_slot);

// A verified block: header, token ids and a view of the payload.
struct KvBlockView {
  KvBlockHeader header;
  std::vector<int32_t> tokens;
  std::span<const uint8_t> payload;
};

// Whether `bytes` starts like a KV block of any version (its magic): tells a
// damaged block of ours from a value that never was one.
bool HasKvBlockMagic(std::span<const uint8_t> bytes);

// Parses the fixed header at the start of `bytes` (kKvHeaderFixedBytes
// suffice: magic, version, dtype, kind, shape and token count in range,
// header and payload sizes consistent), without the token ids, the payload
// or the checksum: for tools that read only the start of an entry. The
// same errors as ParseKvBlock.
absl::StatusOr<KvBlockHeader> ParseKvBlockHeader(std::span<const uint8_t> bytes);
// The size of the whole block a header describes (header, token ids,
// payload, checksum).
uint64_t KvBlockBytes(const KvBlockHeader& header);

// Parses and verifies `bytes` (magic, version, sizes, checksum, a finite
// payload). Errors: DATA_LOSS for anything malformed, UNIMPLEMENTED for
// another version.
absl::StatusOr<KvBlockView> ParseKvBlock(std::span<const uint8_t> bytes);

// FAILED_PRECONDITION unless the block was made by this model (fingerprint
// and shape), with `dtype`, of `kind` and after `prefix_key`, and holds only
// token ids of the model's vocabulary.
absl::Status CheckKvBlockMatches(const KvBlockView& block, const Hash128& fingerprint, const ModelConfig& config,
                                 KvDtype dtype, KvKind kind, const Hash128& prefix_key);

// Writes the block into `cache` slots dest_slot.. of its writable segment
// (converted to float32; positions from first_position).
// FAILED_PRECONDITION, before writing anything, when the block's shape is
// not the cache's or it does not fit.
absl::Status LoadKvBlock(const KvBlockView& block, KvCache& cache, int dest_slot);

// Appends the block to `cache` at slot cache.size WITHOUT copying it: a
// read-only segment (kv_cache.h) viewing block.payload in its stored dtype,
// which `owner` keeps alive (the block's bytes must not change while the
// cache lives). Advances cache.size. FAILED_PRECONDITION, changing nothing,
// when the block's shape is not the cache's or it does not fit before the
// writable segment.
absl::Status AttachKvBlock(const KvBlockView& block, std::shared_ptr<const void> owner, KvCache& cache);

// A verified block that owns its bytes, shared read-only by the requests
// using it (and by the decoder's hot cache, hot_cache.h). `view` points into
// the bytes, so an entry is built in place and never moved or copied. The
// bytes are a string's or any memory `owner` keeps alive (the decoder reads
// Redis replies straight into pooled memory, entry_loader.cc).
struct KvEntry {
  explicit KvEntry(std::string b) : KvEntry(std::make_shared<const std::string>(std::move(b))) {}
  KvEntry(std::shared_ptr<const void> owner, std::span<const uint8_t> bytes)
      : owner_(std::move(owner)), bytes_(bytes) {}
  KvEntry(const KvEntry&) = delete;
  KvEntry& operator=(const KvEntry&) = delete;
  std::span<const uint8_t> span() const { return bytes_; }
  KvBlockView view;

 private:
  explicit KvEntry(std::shared_ptr<const std::string> s)
      : owner_(s), bytes_(reinterpret_cast<const uint8_t*>(s->data()), s->size()) {}
  std::shared_ptr<const void> owner_;
  std::span<const uint8_t> bytes_;
};

}  // namespace ape

#endif  // APESERVE_COMMON_KV_KV_BLOCK_H_
