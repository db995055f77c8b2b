#include "common/pipeline/decode_pipeline.h"

#include <chrono>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/kv/cache_key.h"
#include "common/engine/status_macros.h"
#include "common/engine/timing.h"
#include "common/engine/transformer.h"

namespace ape {

const char* DecodeModeName(DecodeMode m) {
  switch (m) {
    case DecodeMode::kApe: return "APE";
    case DecodeMode::kParallel: return "PARALLEL";
    case DecodeMode::kSequential: return "SEQUENTIAL";
  }
  return "?";
}

namespace {

using Clock = std::chrono::steady_clock;

// The prefix and every context as verified blocks (bytes kept alive here).
struct LoadedEntries {
  std::vector<std::string> bytes;  // [0] prefix, [1 + i] context i
  std::vector<KvBlockView> views;
};

// Loads and verifies entries; encodes the missing ones that have content.
absl::StatusOr<LoadedEntries> LoadEntries(const Model& model, RedisStore* store, const DecodeInput& in,
                                          const DecodeHooks& hooks, DecodeStats* stats) {
  const Hash128 fp = FingerprintBytes(model);
  const size_t n = in.contexts.size();
  std::vector<Hash128> hashes(n + 1);
  std::vector<std::string> keys(n + 1);
  std::vector<KvKind> kinds(n + 1, KvKind::kContext);
  kinds[0] = KvKind::kPrefix;
  hashes[0] = ComputeKvKey(fp, in.dtype, KvKind::kPrefix, in.prefix_tokens, {});
  for (size_t i = 0; i < n; ++i) {
    const ContextSource& c = in.contexts[i];
    if (c.tokens) {
      hashes[i + 1] = ComputeKvKey(fp, in.dtype, KvKind::kContext, in.prefix_tokens, *c.tokens);
    } else {
      ASSIGN_OR_RETURN(hashes[i + 1], ParseRedisKey(c.key));
    }
  }
  for (size_t i = 0; i <= n; ++i) keys[i] = RedisKeyFor(hashes[i]);

  LoadedEntries out;
  out.bytes.resize(n + 1);
  out.views.resize(n + 1);
  std::vector<bool> have(n + 1, false);
  absl::Status store_status = absl::OkStatus();
  std::vector<std::string> foreign;  // keys whose entries exist but do not match
  std::vector<std::string> corrupt;  // keys whose bytes fail verification, with why
  std::vector<std::string> corrupt_keys;
  auto try_load = [&](const std::vector<size_t>& which) -> absl::Status {
    std::vector<std::string> ks;
    for (size_t i : which) ks.push_back(keys[i]);
    ASSIGN_OR_RETURN(auto values, store->GetMany(ks));
    for (size_t j = 0; j < which.size(); ++j) {
      const size_t i = which[j];
      if (!values[j]) continue;
      out.bytes[i] = std::move(*values[j]);
      auto view = ParseKvBlock({reinterpret_cast<const uint8_t*>(out.bytes[i].data()), out.bytes[i].size()});
      if (!view.ok()) {  // corrupt: a clean miss (re-encoded when we have the content)
        corrupt.push_back(absl::StrCat(keys[i], " (", view.status().message(), ")"));
        corrupt_keys.push_back(keys[i]);
        out.bytes[i].clear();
        continue;
      }
      // The prefix key (which covers model, dtype and prefix tokens) must match.
      absl::Status ok = CheckKvBlockMatches(*view, fp, model.config(), kinds[i], hashes[0]);
      if (ok.ok() && view->header.first_position != (i == 0 ? 0u : in.prefix_tokens.size())) {
        ok = absl::FailedPreconditionError("KV block starts at the wrong position");
      }
      if (!ok.ok()) {  // foreign: never used
        if (i > 0 && !in.contexts[i - 1].tokens) foreign.push_back(absl::StrCat(keys[i], " (", ok.message(), ")"));
        out.bytes[i].clear();
        continue;
      }
      out.views[i] = *std::move(view);
      have[i] = true;
    }
    return absl::OkStatus();
  };

  auto t0 = Clock::now();
  std::vector<size_t> all(n + 1);
  std::iota(all.begin(), all.end(), 0);
  if (store != nullptr) store_status = try_load(all);
  // Unreadable entries are useless to everyone: drop them so they get rewritten.
  if (!corrupt_keys.empty() && store_status.ok()) (void)store->Delete(corrupt_keys);
  if (!foreign.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cache entries cannot be used with this request's model, prefix and format: ", absl::StrJoin(foreign, ", ")));
  }
  // Key-only contexts must be in the cache.
  std::vector<std::string> missing_keys;
  for (size_t i = 1; i <= n; ++i) {
    if (!have[i] && !in.contexts[i - 1].tokens) missing_keys.push_back(keys[i]);
  }
  if (!missing_keys.empty()) {
    if (!store_status.ok()) return store_status;  // could not even look
    return absl::NotFoundError(absl::StrCat("contexts not in the cache: ", absl::StrJoin(missing_keys, ", "),
                                            corrupt.empty() ? "" : "; unreadable entries: ", absl::StrJoin(corrupt, ", ")));
  }
  for (size_t i = 0; i <= n; ++i) {
    if (have[i]) stats->cached_tokens += out.views[i].header.num_tokens;
  }
  stats->cache_load_ms += MsBetween(t0, Clock::now());

  // Encode what is missing (all of it has content).
  std::vector<size_t> missing;
  for (size_t i = 0; i <= n; ++i) if (!have[i]) missing.push_back(i);
  if (missing.empty()) return out;
  auto t1 = Clock::now();
  EncodeInput enc;
  enc.prefix_tokens = in.prefix_tokens;
  enc.dtype = in.dtype;
  enc.ttl_seconds = in.ttl_seconds;
  for (size_t i : missing) if (i > 0) enc.contexts.push_back(*in.contexts[i - 1].tokens);
  absl::Status stored = store_status;
  if (stored.ok() && store != nullptr) {
    stored = hooks.remote_encode ? hooks.remote_encode(enc) : EncodeContexts(model, *store, enc).status();
    if (stored.ok()) stored = try_load(missing);
  }
  std::vector<size_t> still;
  for (size_t i : missing) if (!have[i]) still.push_back(i);
  // Store down or refusing writes: compute in memory, cache nothing.
  if (!still.empty()) {
    EncodeInput local;
    local.prefix_tokens = in.prefix_tokens;
    local.dtype = in.dtype;
    for (size_t i : still) if (i > 0) local.contexts.push_back(*in.contexts[i - 1].tokens);
    std::vector<std::string> blocks = EncodeBlocks(model, local);  // [0] prefix, then `still`'s contexts
    size_t next_context = 1;
    for (size_t i : still) {
      out.bytes[i] = std::move(blocks[i == 0 ? 0 : next_context++]);
      auto view = ParseKvBlock({reinterpret_cast<const uint8_t*>(out.bytes[i].data()), out.bytes[i].size()});
      if (!view.ok()) return absl::InternalError(absl::StrCat("locally encoded block is invalid: ", view.status().message()));
      out.views[i] = *std::move(view);
    }
  }
  for (size_t i : missing) stats->encoded_tokens += out.views[i].header.num_tokens;
  stats->encode_ms += MsBetween(t1, Clock::now());
  return out;
}

// Prefills `tokens` at `positions` in blocks, checking for cancellation.
absl::Status Prefill(Transformer& tf, KvCache& cache, std::span<const int32_t> tokens,
                     std::span<const int32_t> positions, const ApeParams& ape, float* logits,
                     const std::function<bool()>& cancelled) {
  constexpr size_t kBlock = 256;
  for (size_t s = 0; s < tokens.size(); s += kBlock) {
    if (cancelled && cancelled()) return absl::CancelledError("request cancelled during prefill");
    const size_t m = std::min(kBlock, tokens.size() - s);
    tf.Forward(tokens.subspan(s, m), positions.subspan(s, m), cache, ape,
               s + m == tokens.size() ? logits : nullptr);
  }
  return absl::OkStatus();
}

struct Prepared {
  std::unique_ptr<Transformer> tf;
  std::unique_ptr<KvCache> cache;
  ApeParams ape;
  std::vector<float> logits;
  std::vector<int32_t> history;  // the whole prompt
  int32_t next_position = 0;
};

absl::StatusOr<Prepared> Prepare(const Model& model, RedisStore* store, const DecodeInput& in,
                                 const DecodeHooks& hooks, DecodeStats* stats) {
  const ModelConfig& c = model.config();
  Prepared p;
  p.logits.resize(c.vocab_size);
  p.tf = std::make_unique<Transformer>(model);
  const int max_new = std::max(0, in.generate.max_tokens);
  if (in.mode == DecodeMode::kSequential) {
    // The baseline: the concatenated ids, prefilled at positions 0..L-1.
    std::vector<int32_t> all = in.prefix_tokens;
    bool need_store = false;
    for (const auto& ctx : in.contexts) need_store |= !ctx.tokens.has_value();
    LoadedEntries loaded;
    if (need_store) {  // contexts by key: their token ids come from the cache
      ASSIGN_OR_RETURN(loaded, LoadEntries(model, store, in, hooks, stats));
      stats->cached_tokens = 0;
    }
    for (size_t i = 0; i < in.contexts.size(); ++i) {
      const auto& toks = in.contexts[i].tokens ? *in.contexts[i].tokens : loaded.views[i + 1].tokens;
      all.insert(all.end(), toks.begin(), toks.end());
    }
    all.insert(all.end(), in.query_tokens.begin(), in.query_tokens.end());
    std::vector<int32_t> pos(all.size());
    std::iota(pos.begin(), pos.end(), 0);
    p.cache = std::make_unique<KvCache>(c, static_cast<int>(all.size()) + max_new);
    auto t0 = Clock::now();
    RETURN_IF_ERROR(Prefill(*p.tf, *p.cache, all, pos, ApeParams{}, p.logits.data(), hooks.cancelled));
    stats->prefill_ms += MsBetween(t0, Clock::now());
    stats->prompt_tokens = static_cast<int>(all.size());
    p.history = std::move(all);
    p.next_position = static_cast<int32_t>(p.history.size());
    return p;
  }

  // APE / PARALLEL: [prefix | C_1 .. C_N | query, generated] in slots.
  ASSIGN_OR_RETURN(LoadedEntries loaded, LoadEntries(model, store, in, hooks, stats));
  auto t0 = Clock::now();
  const int lp = static_cast<int>(in.prefix_tokens.size());
  int total_ctx = 0, longest = 0;
  for (size_t i = 1; i < loaded.views.size(); ++i) {
    total_ctx += loaded.views[i].header.num_tokens;
    longest = std::max<int>(longest, loaded.views[i].header.num_tokens);
  }
  const int lq = static_cast<int>(in.query_tokens.size());
  p.cache = std::make_unique<KvCache>(c, lp + total_ctx + lq + max_new);
  int slot = 0;
  for (const auto& v : loaded.views) {
    LoadKvBlock(v, *p.cache, slot);
    slot += v.header.num_tokens;
  }
  p.cache->size = slot;
  stats->cache_load_ms += MsBetween(t0, Clock::now());
  p.ape.context_begin = lp;
  p.ape.context_end = lp + total_ctx;
  p.ape.temperature = in.mode == DecodeMode::kApe ? in.temperature : 1.f;
  p.ape.scale = in.mode == DecodeMode::kApe ? in.scale : 1.f;
  // The query starts after the LONGEST context (APE.md section 1).
  std::vector<int32_t> qpos(lq);
  std::iota(qpos.begin(), qpos.end(), lp + longest);
  p.history = in.prefix_tokens;
  for (size_t i = 1; i < loaded.views.size(); ++i) {
    p.history.insert(p.history.end(), loaded.views[i].tokens.begin(), loaded.views[i].tokens.end());
  }
  p.history.insert(p.history.end(), in.query_tokens.begin(), in.query_tokens.end());
  stats->prompt_tokens = static_cast<int>(p.history.size());
  auto t1 = Clock::now();
  if (lq > 0) {
    RETURN_IF_ERROR(Prefill(*p.tf, *p.cache, in.query_tokens, qpos, p.ape, p.logits.data(), hooks.cancelled));
  } else {
    return absl::InvalidArgumentError("the query is empty: nothing to attend from (send query text)");
  }
  stats->prefill_ms += MsBetween(t1, Clock::now());
  p.next_position = lp + longest + lq;
  return p;
}

}  // namespace

absl::StatusOr<GenerateResult> RunDecode(const Model& model, RedisStore* store, const DecodeInput& in,
                                         const DecodeHooks& hooks, const TokenCallback& on_token,
                                         DecodeStats* stats) {
  ASSIGN_OR_RETURN(Prepared p, Prepare(model, store, in, hooks, stats));
  if (hooks.on_prefilled) hooks.on_prefilled();
  auto cb = [&](const TokenEvent& ev) {
    if (hooks.cancelled && hooks.cancelled()) return false;
    return on_token(ev);
  };
  return Generate(*p.tf, *p.cache, p.ape, std::move(p.logits), std::move(p.history), p.next_position,
                  in.generate, cb);
}

absl::StatusOr<std::vector<float>> PromptLogits(const Model& model, RedisStore* store, const DecodeInput& in,
                                                DecodeStats* stats) {
  DecodeInput copy = in;
  copy.generate.max_tokens = 0;
  ASSIGN_OR_RETURN(Prepared p, Prepare(model, store, copy, DecodeHooks{}, stats));
  return std::move(p.logits);
}

}  // namespace ape
