// Answering a query over cached contexts: resolve and load the prefix and
// context entries (verifying each), encode what is missing, lay them out in
// one KV cache with APE positions, prefill the query and generate.
// No gRPC here; callers stream TokenEvents and map statuses.
#ifndef APESERVE_COMMON_PIPELINE_DECODE_PIPELINE_H_
#define APESERVE_COMMON_PIPELINE_DECODE_PIPELINE_H_

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/engine/generate.h"
#include "common/pipeline/encode_pipeline.h"

namespace ape {

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
  float temperature = 0.9f;           // APE T
  float scale = 0.9f;                 // APE S
  KvDtype dtype = KvDtype::kFloat16;  // for contexts given by content
  int ttl_seconds = 0;                // for entries encoded on the fly
  // KV slots of the request (prompt + generated), checked once the length of
  // every key-only context is known (after loading); 0 = no limit.
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
  double cache_load_ms = 0, encode_ms = 0, prefill_ms = 0;
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
};

// INVALID_ARGUMENT for an input no store or model could answer (an empty
// query, an empty context); RunDecode and PromptLogits check it before any
// I/O, services call it while validating.
absl::Status CheckDecodeInput(const DecodeInput& in);

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
