// Content-addressed cache keys (kv_block_format.md, "Keys").
#ifndef APESERVE_COMMON_KV_CACHE_KEY_H_
#define APESERVE_COMMON_KV_CACHE_KEY_H_

#include <span>
#include <string>

#include "common/kv/kv_block.h"

namespace ape {

constexpr char kKvKeyPrefix[] = "ape:v1:kv:";

// The model fingerprint as the 16 bytes stored in keys and headers (zero for
// in-memory test models whose fingerprint is not 32 hex digits).
Hash128 FingerprintBytes(const Model& model);

// Key hash of a prefix entry (context empty) or of a context encoded after
// `prefix_tokens`.
Hash128 ComputeKvKey(const Hash128& fingerprint, KvDtype dtype, KvKind kind, std::span<const int32_t> prefix_tokens,
                     std::span<const int32_t> context_tokens);

// FAILED_PRECONDITION unless the block's identity (fingerprint, dtype, kind,
// its token ids and, for a context, `prefix_tokens`) hashes to `key`, the
// key it was read from: an entry copied or forged under another key's name.
absl::Status CheckKvBlockKey(const KvBlockView& block, const Hash128& key, std::span<const int32_t> prefix_tokens);

// "ape:v1:kv:" + hex; and back (INVALID_ARGUMENT for anything else).
std::string RedisKeyFor(const Hash128& key);
absl::StatusOr<Hash128> ParseRedisKey(const std::string& key);

}  // namespace ape

#endif  // APESERVE_COMMON_KV_CACHE_KEY_H_
