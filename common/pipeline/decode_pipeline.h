// Answering a query over cached contexts: resolve and load the prefix and
// context entries (verifying each), encode what is missing, lay them out in
// one KV cache with APE positions, prefill the query and generate.
// No gRPC here; callers stream TokenEvents and map statuses.
#ifndef APESERVE_COMMON_PIPELINE_DECODE_PIPELINE_H_
#define APESERVE_COMMON_PIPELINE_DECODE_PIPELINE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/engine/generate.h"
#include "common/engine/kv_cache.h"
#include "common/engine/transformer.h"
#include "common/pipeline/encode_pipeline.h"

namespace ape {

class HotCache;  // hot_cache.h

enum class DecodeMode { kApe, kParallel, kSequential };

// A context by cache key (tokens unknown) or by token ids.
struct ContextSource {
  std::string key;                             // set: by key
  std::optional<std::vector<int32_t>> tokens;  // set: by content
};

struct DecodeInput {
  // At least one token: BOS first when the model adds one, chat markers.
  std::vector<int32_t> prefix_tokens;
  std::vector<ContextSource> contexts;
  // No BOS; at least one token in every mode (APE and PARALLEL predict from
  // the query's last row: without a query there is no row that attends to
  // the contexts; SEQUENTIAL keeps the same rule so the modes accept the
  // same requests).
  std::vector<int32_t> query_tokens;
  DecodeMode mode = DecodeMode::kApe;
  // APE T and S. 0 = chosen by `ape_preset` once the contexts' lengths are
  // known (ApePreset{} when it is null).
  float temperature = 0.9f;
  float scale = 0.9f;
  std::function<std::pair<float, float>(int contexts, int64_t context_tokens)> ape_preset;
  KvDtype dtype = KvDtype::kFloat16;  // for contexts given by content
  int ttl_seconds = 0;                // for entries encoded on the fly
  // KV slots of the request (prompt + generated), in float32 slots (a
  // float16 entry's slot, used in place, counts half), checked once the
  // length of every key-only context is known (after loading); 0 = no limit.
  int64_t max_kv_slots = 0;
  // Positions the request may span (prefix + longest context + query +
  // generated for APE/PARALLEL; the whole prompt + generated for
  // SEQUENTIAL), checked once key-only contexts are loaded; 0 = no limit.
  // INVALID_ARGUMENT past it: the model was not trained there.
  int64_t max_positions = 0;
  GenerateOptions generate;
};

struct DecodeStats {
  int prompt_tokens = 0, cached_tokens = 0, encoded_tokens = 0;
  int hot_cache_tokens = 0;  // of cached_tokens, served by the hot cache (Redis not read for them)
  double cache_load_ms = 0, encode_ms = 0, prefill_ms = 0;
  // T and S the attention used (1 and 1 for PARALLEL and SEQUENTIAL).
  float ape_temperature = 1.f, ape_scale = 1.f;
  // prefix + contexts (request order) + query, as prefilled or loaded.
  std::vector<int32_t> prompt_ids;
};

// Encodes missing entries elsewhere (e.g. an ape-encoder over gRPC); null =
// encode locally with the decoder's own model.
using RemoteEncodeFn = std::function<absl::Status(const EncodeInput&)>;

struct DecodeHooks {
  // Checked before encoding, between prefill blocks and between tokens.
  std::function<bool()> cancelled;
  RemoteEncodeFn remote_encode;
  // The decoder's in-process cache of verified entries (hot_cache.h), shared
  // by its requests; null = every entry read from the store.
  HotCache* hot_cache = nullptr;
};

// INVALID_ARGUMENT for an input no store or model could answer (an empty
// query, an empty context); RunDecode and PromptLogits check it before any
// I/O, services call it while validating.
absl::Status CheckDecodeInput(const DecodeInput& in);

// A request whose cache entries are loaded, verified and laid out in its KV
// cache (APE and PARALLEL: the entries' payloads themselves, read-only and in
// their stored dtype, then a writable float32 segment for the query and the
// generated tokens; kv_cache.h), the rest of its prompt not prefilled yet: the query for APE and
// PARALLEL, the whole prompt for SEQUENTIAL. Room is reserved for
// max_new_tokens generated tokens. Movable, not copyable.
struct DecodeSession {
  std::unique_ptr<KvCache> cache;
  ApeParams ape;                              // T = S = 1 and no context range: ordinary attention
  std::vector<int32_t> to_prefill;            // prompt tokens not in the cache yet...
  std::vector<int32_t> to_prefill_positions;  // ...and their RoPE positions
  size_t prefilled = 0;                       // of to_prefill, in the cache now
  std::vector<int32_t> history;               // the whole prompt
  int32_t next_position = 0;                  // the first generated token's position
  int max_new_tokens = 0;
  bool prefill_done() const { return prefilled == to_prefill.size(); }
};

// Checks the input (before any I/O), loads and lays out the entries
// (encoding what is missing), with room for `max_new_tokens`. Same statuses
// as RunDecode.
absl::StatusOr<DecodeSession> PrepareDecode(const Model& model, RedisStore* store, const DecodeInput& in,
                                            int max_new_tokens, const DecodeHooks& hooks, DecodeStats* stats);

// Prefills up to `max_tokens` more of session.to_prefill. When that ends the
// prompt, the logits after its last token go to `logits` ([vocab]).
void PrefillChunk(Transformer& tf, DecodeSession& session, size_t max_tokens, float* logits);

// Runs the whole request. `store` may be null (everything computed
// locally, nothing cached). Statuses: INVALID_ARGUMENT (CheckDecodeInput, a
// malformed key), NOT_FOUND (keys not in the cache, all listed),
// FAILED_PRECONDITION (a key from another prefix/model/dtype),
// RESOURCE_EXHAUSTED (more than max_kv_slots), UNAVAILABLE (store down and a
// context given only by key), CANCELLED.
absl::StatusOr<GenerateResult> RunDecode(const Model& model, RedisStore* store, const DecodeInput& in,
                                         const DecodeHooks& hooks, const TokenCallback& on_token, DecodeStats* stats);

// The logits after the prompt, without generating: RunDecode's path (same
// loading, encoding, cancellation, cache assembly and attention) up to the
// first token. in.generate.max_tokens is not reserved.
absl::StatusOr<std::vector<float>> PromptLogits(const Model& model, RedisStore* store, const DecodeInput& in,
                                                const DecodeHooks& hooks, DecodeStats* stats);

}  // namespace ape

#endif  // APESERVE_COMMON_PIPELINE_DECODE_PIPELINE_H_
