#include "common/pipeline/encode_pipeline.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/engine/status_macros.h"
#include "common/engine/timing.h"
#include "common/engine/transformer.h"
#include "common/kv/cache_key.h"

namespace ape {
namespace {

KvBlockHeader HeaderFor(const Model& m, const EncodeInput& in, KvKind kind, uint32_t n, uint32_t first,
                        const Hash128& prefix_key) {
  KvBlockHeader h;
  h.model_fingerprint = FingerprintBytes(m);
  h.n_layers = m.config().n_layers;
  h.n_kv_heads = m.config().n_kv_heads;
  h.head_dim = m.config().head_dim;
  h.dtype = in.dtype;
  h.kind = kind;
  h.num_tokens = n;
  h.first_position = first;
  h.prefix_key = prefix_key;
  return h;
}

bool IsCancelled(const EncodeCancelledFn& cancelled) { return cancelled && cancelled(); }

// Runs `tokens` at positions first_position.. into `cache` (after its
// cache.size slots), kEncodeBlockTokens at a time, checking `cancelled`
// before each block. `what` names the tokens in the CANCELLED message.
absl::Status PrefillBlocks(Transformer& tf, KvCache& cache, std::span<const int32_t> tokens, int first_position,
                           const EncodeCancelledFn& cancelled, const char* what) {
  const size_t block = kEncodeBlockTokens;
  std::vector<int32_t> pos(std::min(block, tokens.size()));
  for (size_t s = 0; s < tokens.size(); s += block) {
    if (IsCancelled(cancelled)) {
      return absl::CancelledError(absl::StrCat("encoding cancelled (client cancelled or deadline passed) at token ", s,
                                               " of ", tokens.size(), " of the ", what));
    }
    const size_t m = std::min(block, tokens.size() - s);
    std::iota(pos.begin(), pos.begin() + m, first_position + static_cast<int>(s));
    tf.Forward(tokens.subspan(s, m), std::span<const int32_t>(pos.data(), m), cache, ApeParams{}, nullptr);
  }
  return absl::OkStatus();
}

// The prefix in a cache, with room for one context of up to `max_context`
// tokens after it. Prefill() first, then Encode() each context in turn.
class PrefixState {
 public:
  PrefixState(const Model& m, const EncodeInput& in, int max_context)
      : tf_(m),
        cache_(m.config(), static_cast<int>(in.prefix_tokens.size()) + max_context),
        prefix_(in.prefix_tokens),
        lp_(static_cast<int>(in.prefix_tokens.size())) {}
  absl::Status Prefill(const EncodeCancelledFn& cancelled) {
    return PrefillBlocks(tf_, cache_, prefix_, 0, cancelled, "prefix");
  }
  // Appends `context` after the prefix (dropping any earlier context).
  absl::Status Encode(std::span<const int32_t> context, const EncodeCancelledFn& cancelled) {
    cache_.size = lp_;
    return PrefillBlocks(tf_, cache_, context, lp_, cancelled, "context");
  }
  const KvCache& cache() const { return cache_; }

 private:
  Transformer tf_;
  KvCache cache_;
  std::span<const int32_t> prefix_;
  int lp_;
};

// Looks every entry up (unless in.overwrite) and sets already_cached.
absl::Status MarkCached(RedisStore& store, const EncodeInput& in, EncodeOutput& out) {
  if (in.overwrite) return absl::OkStatus();  // write everything: the keys hold unusable entries
  std::vector<std::string> keys = {out.prefix.key};
  for (const auto& c : out.contexts) keys.push_back(c.key);
  ASSIGN_OR_RETURN(std::vector<bool> exists, store.Exists(keys));
  out.prefix.already_cached = exists[0];
  for (size_t i = 0; i < out.contexts.size(); ++i) out.contexts[i].already_cached = exists[i + 1];
  return absl::OkStatus();
}

// Publishes `block` under `key`, counting the bytes written.
absl::Status Store(RedisStore& store, const std::string& key, const std::string& block, int ttl_seconds,
                   EncodeOutput& out) {
  RETURN_IF_ERROR(store.Put(key, block, ttl_seconds));
  out.bytes_written += block.size();
  return absl::OkStatus();
}

// Prefills the prefix (contexts attend to it), then every context not
// already cached, once per key, publishing each block not already cached;
// `max_missing`: the longest such context.
absl::Status ComputeMissing(const Model& model, RedisStore& store, const EncodeInput& in, int max_missing,
                            const EncodeCancelledFn& cancelled, EncodeOutput& out) {
  auto tp = std::chrono::steady_clock::now();
  PrefixState ps(model, in, max_missing);
  RETURN_IF_ERROR(ps.Prefill(cancelled));
  const uint32_t lp = static_cast<uint32_t>(in.prefix_tokens.size());
  out.tokens_computed += lp;
  auto tq = std::chrono::steady_clock::now();
  out.prefill_ms += MsBetween(tp, tq);
  if (!out.prefix.already_cached) {
    const std::string block = SerializeKvBlock(HeaderFor(model, in, KvKind::kPrefix, lp, 0, out.prefix.hash),
                                               in.prefix_tokens, ps.cache(), 0);
    RETURN_IF_ERROR(Store(store, out.prefix.key, block, in.ttl_seconds, out));
    out.store_ms += MsSince(tq);
  }
  absl::flat_hash_set<std::string> written;
  for (size_t i = 0; i < out.contexts.size(); ++i) {
    EncodedEntry& e = out.contexts[i];
    if (e.already_cached || written.contains(e.key)) continue;
    auto ta = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(ps.Encode(in.contexts[i], cancelled));
    out.tokens_computed += e.num_tokens;
    auto tb = std::chrono::steady_clock::now();
    const std::string block = SerializeKvBlock(
        HeaderFor(model, in, KvKind::kContext, e.num_tokens, lp, out.prefix.hash), in.contexts[i], ps.cache(), lp);
    RETURN_IF_ERROR(Store(store, e.key, block, in.ttl_seconds, out));
    written.insert(e.key);
    out.prefill_ms += MsBetween(ta, tb);
    out.store_ms += MsSince(tb);
  }
  return absl::OkStatus();
}

}  // namespace

EncodeOutput PlanEncode(const Model& model, const EncodeInput& in) {
  const Hash128 fp = FingerprintBytes(model);
  EncodeOutput out;
  const uint32_t lp = static_cast<uint32_t>(in.prefix_tokens.size());
  const uint64_t per_token = KvBytesPerToken(model.config(), in.dtype);
  auto entry = [&](KvKind kind, std::span<const int32_t> ctx) {
    EncodedEntry e;
    e.hash = ComputeKvKey(fp, in.dtype, kind, in.prefix_tokens, ctx);
    e.key = RedisKeyFor(e.hash);
    e.num_tokens = kind == KvKind::kPrefix ? lp : static_cast<uint32_t>(ctx.size());
    e.first_position = kind == KvKind::kPrefix ? 0 : lp;
    e.stored_bytes = kKvHeaderFixedBytes + 4ull * e.num_tokens + per_token * e.num_tokens + kKvChecksumBytes;
    return e;
  };
  out.prefix = entry(KvKind::kPrefix, {});
  for (const auto& c : in.contexts) out.contexts.push_back(entry(KvKind::kContext, c));
  return out;
}

absl::StatusOr<std::vector<std::string>> EncodeBlocks(const Model& model, const EncodeInput& in,
                                                      const EncodeCancelledFn& cancelled) {
  const Hash128 prefix_key = ComputeKvKey(FingerprintBytes(model), in.dtype, KvKind::kPrefix, in.prefix_tokens, {});
  const uint32_t lp = static_cast<uint32_t>(in.prefix_tokens.size());
  size_t longest = 0;
  for (const auto& c : in.contexts) longest = std::max(longest, c.size());
  PrefixState ps(model, in, static_cast<int>(longest));
  RETURN_IF_ERROR(ps.Prefill(cancelled));
  std::vector<std::string> blocks;
  blocks.push_back(
      SerializeKvBlock(HeaderFor(model, in, KvKind::kPrefix, lp, 0, prefix_key), in.prefix_tokens, ps.cache(), 0));
  for (const auto& c : in.contexts) {
    RETURN_IF_ERROR(ps.Encode(c, cancelled));
    blocks.push_back(
        SerializeKvBlock(HeaderFor(model, in, KvKind::kContext, c.size(), lp, prefix_key), c, ps.cache(), lp));
  }
  return blocks;
}

absl::StatusOr<EncodeOutput> EncodeContexts(const Model& model, RedisStore& store, const EncodeInput& in,
                                            const EncodeCancelledFn& cancelled) {
  auto t0 = std::chrono::steady_clock::now();
  EncodeOutput out = PlanEncode(model, in);
  RETURN_IF_ERROR(MarkCached(store, in, out));
  out.lookup_ms = MsSince(t0);
  int max_missing = 0;
  bool any_missing = !out.prefix.already_cached;
  for (size_t i = 0; i < out.contexts.size(); ++i) {
    if (out.contexts[i].already_cached) continue;
    any_missing = true;
    max_missing = std::max(max_missing, static_cast<int>(in.contexts[i].size()));
  }
  if (any_missing) RETURN_IF_ERROR(ComputeMissing(model, store, in, max_missing, cancelled, out));
  return out;
}

}  // namespace ape
