#include "common/kv/cache_key.h"

#include "absl/strings/str_cat.h"
#include "xxhash.h"

namespace ape {

Hash128 FingerprintBytes(const Model& model) {
  auto h = HashFromHex(model.fingerprint());
  return h.ok() ? *h : Hash128{};
}

Hash128 ComputeKvKey(const Hash128& fingerprint, KvDtype dtype, KvKind kind, std::span<const int32_t> prefix_tokens,
                     std::span<const int32_t> context_tokens) {
  XXH3_state_t* st = XXH3_createState();
  XXH3_128bits_reset(st);
  auto put_u32 = [&](uint32_t v) { XXH3_128bits_update(st, &v, sizeof(v)); };
  static const char kTag[] = "apeserve-kv-key";  // 15 chars + the NUL
  XXH3_128bits_update(st, kTag, sizeof(kTag));
  put_u32(kKvFormatVersion);
  XXH3_128bits_update(st, fingerprint.data(), fingerprint.size());
  put_u32(static_cast<uint32_t>(dtype));
  put_u32(static_cast<uint32_t>(kind));
  put_u32(static_cast<uint32_t>(prefix_tokens.size()));
  XXH3_128bits_update(st, prefix_tokens.data(), prefix_tokens.size() * sizeof(int32_t));
  put_u32(static_cast<uint32_t>(context_tokens.size()));
  XXH3_128bits_update(st, context_tokens.data(), context_tokens.size() * sizeof(int32_t));
  XXH128_hash_t h = XXH3_128bits_digest(st);
  XXH3_freeState(st);
  return HashFromHalves(h.high64, h.low64);
}

absl::Status CheckKvBlockKey(const KvBlockView& block, const Hash128& key, std::span<const int32_t> prefix_tokens) {
  const KvBlockHeader& h = block.header;
  const Hash128 identity =
      h.kind == KvKind::kPrefix
          ? ComputeKvKey(h.model_fingerprint, h.dtype, KvKind::kPrefix, block.tokens, {})
          : ComputeKvKey(h.model_fingerprint, h.dtype, KvKind::kContext, prefix_tokens, block.tokens);
  if (identity != key) {
    return absl::FailedPreconditionError(absl::StrCat("the entry is not the one its key ", HashToHex(key),
                                                      " names (its content hashes to ", HashToHex(identity), ")"));
  }
  return absl::OkStatus();
}

std::string RedisKeyFor(const Hash128& key) { return absl::StrCat(kKvKeyPrefix, HashToHex(key)); }

absl::StatusOr<Hash128> ParseRedisKey(const std::string& key) {
  if (key.rfind(kKvKeyPrefix, 0) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cache key '", key, "' does not start with ", kKvKeyPrefix));
  }
  auto h = HashFromHex(key.substr(sizeof(kKvKeyPrefix) - 1));
  if (!h.ok()) return absl::InvalidArgumentError(absl::StrCat("cache key '", key, "' is malformed"));
  return h;
}

}  // namespace ape
