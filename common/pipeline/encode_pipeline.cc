#include "common/pipeline/encode_pipeline.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "absl/container/flat_hash_set.h"
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

// Prefix in a cache, ready for contexts to be appended after it.
class PrefixState {
 public:
  PrefixState(const Model& m, const EncodeInput& in, int max_context)
      : tf_(m),
        cache_(m.config(), static_cast<int>(in.prefix_tokens.size()) + max_context),
        lp_(static_cast<int>(in.prefix_tokens.size())) {
    std::vector<int32_t> pos(lp_);
    std::iota(pos.begin(), pos.end(), 0);
    tf_.Forward(in.prefix_tokens, pos, cache_, ApeParams{}, nullptr);
  }
  // Appends `context` after the prefix (dropping any earlier context).
  void Encode(std::span<const int32_t> context) {
    cache_.size = lp_;
    std::vector<int32_t> pos(context.size());
    std::iota(pos.begin(), pos.end(), lp_);
    tf_.Forward(context, pos, cache_, ApeParams{}, nullptr);
  }
  const KvCache& cache() const { return cache_; }

 private:
  Transformer tf_;
  KvCache cache_;
  int lp_;
};

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

std::vector<std::string> EncodeBlocks(const Model& model, const EncodeInput& in) {
  const Hash128 prefix_key = ComputeKvKey(FingerprintBytes(model), in.dtype, KvKind::kPrefix, in.prefix_tokens, {});
  const uint32_t lp = static_cast<uint32_t>(in.prefix_tokens.size());
  size_t longest = 0;
  for (const auto& c : in.contexts) longest = std::max(longest, c.size());
  PrefixState ps(model, in, static_cast<int>(longest));
  std::vector<std::string> blocks;
  blocks.push_back(
      SerializeKvBlock(HeaderFor(model, in, KvKind::kPrefix, lp, 0, prefix_key), in.prefix_tokens, ps.cache(), 0));
  for (const auto& c : in.contexts) {
    ps.Encode(c);
    blocks.push_back(
        SerializeKvBlock(HeaderFor(model, in, KvKind::kContext, c.size(), lp, prefix_key), c, ps.cache(), lp));
  }
  return blocks;
}

absl::StatusOr<EncodeOutput> EncodeContexts(const Model& model, RedisStore& store, const EncodeInput& in) {
  auto t0 = std::chrono::steady_clock::now();
  EncodeOutput out = PlanEncode(model, in);
  std::vector<std::string> keys = {out.prefix.key};
  for (const auto& c : out.contexts) keys.push_back(c.key);
  ASSIGN_OR_RETURN(std::vector<bool> exists, store.Exists(keys));
  auto t1 = std::chrono::steady_clock::now();
  out.lookup_ms = MsBetween(t0, t1);
  out.prefix.already_cached = exists[0];
  int max_missing = 0;
  bool any_missing = !exists[0];
  for (size_t i = 0; i < out.contexts.size(); ++i) {
    out.contexts[i].already_cached = exists[i + 1];
    if (!exists[i + 1]) {
      any_missing = true;
      max_missing = std::max(max_missing, static_cast<int>(in.contexts[i].size()));
    }
  }
  if (!any_missing) return out;

  // The prefix is prefilled whenever anything is missing: contexts attend to it.
  double prefill = 0, storing = 0;
  auto tp = std::chrono::steady_clock::now();
  PrefixState ps(model, in, max_missing);
  const uint32_t lp = static_cast<uint32_t>(in.prefix_tokens.size());
  out.tokens_computed += lp;
  auto tq = std::chrono::steady_clock::now();
  prefill += MsBetween(tp, tq);
  if (!out.prefix.already_cached) {
    std::string block = SerializeKvBlock(HeaderFor(model, in, KvKind::kPrefix, lp, 0, out.prefix.hash),
                                         in.prefix_tokens, ps.cache(), 0);
    RETURN_IF_ERROR(store.Put(out.prefix.key, block, in.ttl_seconds));
    out.bytes_written += block.size();
    storing += MsBetween(tq, std::chrono::steady_clock::now());
  }
  absl::flat_hash_set<std::string> written;
  for (size_t i = 0; i < out.contexts.size(); ++i) {
    EncodedEntry& e = out.contexts[i];
    if (e.already_cached || written.contains(e.key)) continue;
    auto ta = std::chrono::steady_clock::now();
    ps.Encode(in.contexts[i]);
    out.tokens_computed += e.num_tokens;
    auto tb = std::chrono::steady_clock::now();
    std::string block = SerializeKvBlock(HeaderFor(model, in, KvKind::kContext, e.num_tokens, lp, out.prefix.hash),
                                         in.contexts[i], ps.cache(), lp);
    RETURN_IF_ERROR(store.Put(e.key, block, in.ttl_seconds));
    out.bytes_written += block.size();
    written.insert(e.key);
    auto tc = std::chrono::steady_clock::now();
    prefill += MsBetween(ta, tb);
    storing += MsBetween(tb, tc);
  }
  out.prefill_ms = prefill;
  out.store_ms = storing;
  return out;
}

}  // namespace ape
