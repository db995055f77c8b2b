// Content-addressed cache keys (kv_block_format.md, "Keys").
#ifndef APESERVE_COMMON_CACHE_KEY_H_
#define APESERVE_COMMON_CACHE_KEY_H_

#include <span>
#include <string>

#include "common/kv_block.h"

namespace ape {

constexpr char kKvKeyPrefix[] = "ape:v1:kv:";

// Key hash of a prefix entry (context empty) or of a context encoded after
// `prefix_tokens`.
Hash128 ComputeKvKey(const Hash128& fingerprint, KvDtype dtype, KvKind kind,
                     std::span<const int32_t> prefix_tokens, std::span<const int32_t> context_tokens);

// "ape:v1:kv:" + hex; and back (INVALID_ARGUMENT for anything else).
std::string RedisKeyFor(const Hash128& key);
absl::StatusOr<Hash128> ParseRedisKey(const std::string& key);

}  // namespace ape

#endif  // APESERVE_COMMON_CACHE_KEY_H_
