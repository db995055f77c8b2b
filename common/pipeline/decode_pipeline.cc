#include "common/pipeline/decode_pipeline.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/engine/ape_preset.h"
#include "common/engine/status_macros.h"
#include "common/engine/timing.h"
#include "common/engine/transformer.h"
#include "common/kv/cache_key.h"
#include "common/pipeline/entry_loader.h"

namespace ape {
namespace {

using Clock = std::chrono::steady_clock;

bool Cancelled(const DecodeHooks& hooks) { return hooks.cancelled && hooks.cancelled(); }

// RESOURCE_EXHAUSTED when the prompt and the tokens it may generate need more
// than in.max_kv_slots float32 slots. `half_slots` of the prompt are float16
// or int8 entries used in place (kv_cache.h): they take at most half a float32
// slot's bytes (int8 about a quarter, counted as half).
absl::Status CheckKvSlots(const DecodeInput& in, int64_t prompt_tokens, int max_new_tokens, int64_t half_slots = 0) {
  const int64_t need = prompt_tokens - half_slots + (half_slots + 1) / 2 + max_new_tokens;
  if (in.max_kv_slots > 0 && need > in.max_kv_slots) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "request needs ", need, " KV slots", half_slots > 0 ? " (float16 and int8 entries counted as half a slot)" : "",
        ", the limit is ", in.max_kv_slots, " (the per-request KV budget)"));
  }
  return absl::OkStatus();
}

// INVALID_ARGUMENT when the request spans more positions than allowed.
absl::Status CheckPositions(const DecodeInput& in, int64_t span) {
  if (in.max_positions > 0 && span > in.max_positions) {
    return absl::InvalidArgumentError(absl::StrCat("the request spans ", span, " positions, the limit is ",
                                                   in.max_positions, " (the model's window)"));
  }
  return absl::OkStatus();
}

// A session whose cache has `slots` slots, the first `read_only` of them for
// entries attached read-only, the rest writable float32.
DecodeSession NewSession(const Model& model, int64_t slots, int64_t read_only, int max_new_tokens) {
  DecodeSession p;
  p.cache = std::make_unique<KvCache>(model.config(), static_cast<int>(slots), static_cast<int>(read_only));
  p.max_new_tokens = max_new_tokens;
  return p;
}

// SEQUENTIAL, the baseline: prefix, contexts and query concatenated and
// prefilled at positions 0..L-1. Contexts given by key take their token ids
// from the cache (their KV is not used).
absl::StatusOr<DecodeSession> PrepareSequential(const Model& model, RedisStore* store, const DecodeInput& in,
                                                int max_new_tokens, const DecodeHooks& hooks, DecodeStats* stats) {
  std::vector<EntryLoad> entries;
  if (std::any_of(in.contexts.begin(), in.contexts.end(), [](const ContextSource& c) { return !c.tokens; })) {
    ASSIGN_OR_RETURN(entries, LoadEntries(model, store, in, hooks, stats));
    stats->cached_tokens = 0;
  }
  std::vector<int32_t> prompt = in.prefix_tokens;
  for (size_t i = 0; i < in.contexts.size(); ++i) {
    const std::vector<int32_t>& ids = in.contexts[i].tokens ? *in.contexts[i].tokens : entries[i + 1].view().tokens;
    prompt.insert(prompt.end(), ids.begin(), ids.end());
  }
  prompt.insert(prompt.end(), in.query_tokens.begin(), in.query_tokens.end());
  RETURN_IF_ERROR(CheckPositions(in, static_cast<int64_t>(prompt.size()) + max_new_tokens));
  RETURN_IF_ERROR(CheckKvSlots(in, prompt.size(), max_new_tokens));
  DecodeSession p = NewSession(model, prompt.size() + max_new_tokens, 0, max_new_tokens);
  p.to_prefill = prompt;
  p.to_prefill_positions.resize(prompt.size());
  std::iota(p.to_prefill_positions.begin(), p.to_prefill_positions.end(), 0);
  stats->prompt_tokens = static_cast<int>(prompt.size());
  stats->prompt_ids = prompt;
  p.next_position = static_cast<int32_t>(prompt.size());
  p.history = std::move(prompt);
  return p;
}

// APE and PARALLEL: slots [prefix | C_1 .. C_N | query, generated], every
// context at positions Lp.., the query after the LONGEST context (APE.md
// section 2), T and S on the pooled context range (1 for PARALLEL).
absl::StatusOr<DecodeSession> PrepareParallel(const Model& model, RedisStore* store, const DecodeInput& in,
                                              int max_new_tokens, const DecodeHooks& hooks, DecodeStats* stats) {
  ASSIGN_OR_RETURN(std::vector<EntryLoad> entries, LoadEntries(model, store, in, hooks, stats));
  const auto t_layout = Clock::now();
  const int lp = static_cast<int>(in.prefix_tokens.size());
  const int lq = static_cast<int>(in.query_tokens.size());
  // Slots are sized from the headers below; the prefix's must be the
  // request's (VerifyEntry compared its tokens: this is the invariant).
  if (entries[0].view().header.num_tokens != static_cast<uint32_t>(lp)) {
    return absl::InternalError("the prefix entry's length differs from the request's prefix");
  }
  int total_ctx = 0, longest = 0;
  int64_t half_slots = 0;  // float16 and int8 entries' slots (the prefix's too)
  for (size_t i = 0; i < entries.size(); ++i) {
    const KvBlockView& v = entries[i].view();
    if (v.header.dtype != KvDtype::kFloat32) half_slots += v.header.num_tokens;
    if (i == 0) continue;
    total_ctx += v.header.num_tokens;
    longest = std::max<int>(longest, v.header.num_tokens);
  }
  RETURN_IF_ERROR(CheckPositions(in, int64_t{lp} + longest + lq + max_new_tokens));
  RETURN_IF_ERROR(CheckKvSlots(in, int64_t{lp} + total_ctx + lq, max_new_tokens, half_slots));
  DecodeSession p =
      NewSession(model, int64_t{lp} + total_ctx + lq + max_new_tokens, int64_t{lp} + total_ctx, max_new_tokens);
  for (const EntryLoad& e : entries) {  // the prefix, then each context
    RETURN_IF_ERROR(AppendEntryToCache(e, *p.cache));
    p.history.insert(p.history.end(), e.view().tokens.begin(), e.view().tokens.end());
  }
  stats->cache_load_ms += MsBetween(t_layout, Clock::now());
  p.history.insert(p.history.end(), in.query_tokens.begin(), in.query_tokens.end());
  stats->prompt_tokens = static_cast<int>(p.history.size());
  stats->prompt_ids = p.history;
  p.ape.context_begin = lp;
  p.ape.context_end = lp + total_ctx;
  if (in.mode == DecodeMode::kApe) {
    const int contexts = static_cast<int>(in.contexts.size());
    const std::pair<float, float> preset =
        in.ape_preset ? in.ape_preset(contexts, total_ctx) : ApePreset{}.For(contexts, total_ctx);
    p.ape.temperature = in.temperature != 0.f ? in.temperature : preset.first;
    p.ape.scale = in.scale != 0.f ? in.scale : preset.second;
  }
  stats->ape_temperature = p.ape.temperature;
  stats->ape_scale = p.ape.scale;
  p.to_prefill = in.query_tokens;
  p.to_prefill_positions.resize(lq);
  std::iota(p.to_prefill_positions.begin(), p.to_prefill_positions.end(), lp + longest);
  p.next_position = lp + longest + lq;
  return p;
}

}  // namespace

absl::Status CheckDecodeInput(const DecodeInput& in) {
  if (in.prefix_tokens.empty()) {
    // A cache entry holds one token or more, and contexts are keyed by the
    // prefix they follow: BOS, or prefix text for a model without BOS.
    return absl::InvalidArgumentError("the prefix is empty: send at least one prefix token (BOS, or prefix text)");
  }
  if (in.query_tokens.empty()) {
    return absl::InvalidArgumentError("the query is empty: nothing to predict from (send query text)");
  }
  for (size_t i = 0; i < in.contexts.size(); ++i) {
    const ContextSource& c = in.contexts[i];
    if (c.tokens ? c.tokens->empty() : c.key.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("context ", i, c.tokens ? " is empty" : ": empty key"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<DecodeSession> PrepareDecode(const Model& model, RedisStore* store, const DecodeInput& in,
                                            int max_new_tokens, const DecodeHooks& hooks, DecodeStats* stats) {
  RETURN_IF_ERROR(CheckDecodeInput(in));
  if (in.mode == DecodeMode::kSequential) return PrepareSequential(model, store, in, max_new_tokens, hooks, stats);
  return PrepareParallel(model, store, in, max_new_tokens, hooks, stats);
}

void PrefillChunk(Transformer& tf, DecodeSession& session, size_t max_tokens, float* logits) {
  const size_t m = std::min(max_tokens, session.to_prefill.size() - session.prefilled);
  const std::span<const int32_t> tokens(session.to_prefill), positions(session.to_prefill_positions);
  session.prefilled += m;
  tf.Forward(tokens.subspan(session.prefilled - m, m), positions.subspan(session.prefilled - m, m), *session.cache,
             session.ape, session.prefill_done() ? logits : nullptr);
}

namespace {
// Prefills the whole prompt in blocks, checking for cancellation between them.
absl::StatusOr<DecodeSession> PrepareAndPrefill(const Model& model, RedisStore* store, const DecodeInput& in,
                                                int max_new_tokens, const DecodeHooks& hooks, Transformer& tf,
                                                std::vector<float>& logits, DecodeStats* stats) {
  ASSIGN_OR_RETURN(DecodeSession p, PrepareDecode(model, store, in, max_new_tokens, hooks, stats));
  constexpr size_t kBlock = 256;  // tokens per Forward: bounds the time between cancellation checks
  const auto t0 = Clock::now();
  while (!p.prefill_done()) {
    if (Cancelled(hooks)) return absl::CancelledError("request cancelled during prefill");
    PrefillChunk(tf, p, kBlock, logits.data());
  }
  stats->prefill_ms += MsBetween(t0, Clock::now());
  return p;
}
}  // namespace

absl::StatusOr<GenerateResult> RunDecode(const Model& model, RedisStore* store, const DecodeInput& in,
                                         const DecodeHooks& hooks, const TokenCallback& on_token, DecodeStats* stats) {
  const int max_new_tokens = std::max(0, in.generate.max_tokens);
  Transformer tf(model);
  std::vector<float> logits(model.config().vocab_size);
  ASSIGN_OR_RETURN(DecodeSession p, PrepareAndPrefill(model, store, in, max_new_tokens, hooks, tf, logits, stats));
  auto cb = [&](const TokenEvent& ev) { return !Cancelled(hooks) && on_token(ev); };
  return Generate(tf, *p.cache, p.ape, std::move(logits), std::move(p.history), p.next_position, in.generate, cb);
}

absl::StatusOr<std::vector<float>> PromptLogits(const Model& model, RedisStore* store, const DecodeInput& in,
                                                const DecodeHooks& hooks, DecodeStats* stats) {
  Transformer tf(model);
  std::vector<float> logits(model.config().vocab_size);
  RETURN_IF_ERROR(PrepareAndPrefill(model, store, in, /*max_new_tokens=*/0, hooks, tf, logits, stats).status());
  return logits;
}

}  // namespace ape
