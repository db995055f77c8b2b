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
#include "common/pipeline/encode_pipeline.h"
#include "common/engine/generate.h"

namespace ape {

enum class DecodeMode { kApe, kParallel, kSequential };
const char* DecodeModeName(DecodeMode m);

// A context by cache key (tokens unknown) or by token ids.
struct ContextSource {
  std::string key;                              // set: by key
  std::optional<std::vector<int32_t>> tokens;  // set: by content
};

struct DecodeInput {
  std::vector<int32_t> prefix_tokens;  // BOS first
  std::vector<ContextSource> contexts;
  std::vector<int32_t> query_tokens;   // no BOS
  DecodeMode mode = DecodeMode::kApe;
  float temperature = 0.9f;            // APE T
  float scale = 0.9f;                  // APE S
  KvDtype dtype = KvDtype::kFloat16;   // for contexts given by content
  int ttl_seconds = 0;                 // for entries encoded on the fly
  GenerateOptions generate;
};

struct DecodeStats {
  int prompt_tokens = 0, cached_tokens = 0, encoded_tokens = 0;
  double cache_load_ms = 0, encode_ms = 0, prefill_ms = 0, first_token_ms = 0;
};

// Encodes missing entries elsewhere (e.g. an ape-encoder over gRPC); null =
// encode locally with the decoder's own model.
using RemoteEncodeFn = std::function<absl::Status(const EncodeInput&)>;

struct DecodeHooks {
  std::function<bool()> cancelled;   // checked between prefill blocks
  RemoteEncodeFn remote_encode;
  // Called once, right before the first token is sampled.
  std::function<void()> on_prefilled;
};

// Runs the whole request. `store` may be null (everything computed
// locally, nothing cached). Statuses: NOT_FOUND (keys not in the cache, all
// listed), FAILED_PRECONDITION (a key from another prefix/model/dtype),
// UNAVAILABLE (store down and a context given only by key), CANCELLED.
absl::StatusOr<GenerateResult> RunDecode(const Model& model, RedisStore* store, const DecodeInput& in,
                                         const DecodeHooks& hooks, const TokenCallback& on_token,
                                         DecodeStats* stats);

// The logits after the prompt, without generating: for evaluation tools and
// tests (same cache assembly and attention as RunDecode).
absl::StatusOr<std::vector<float>> PromptLogits(const Model& model, RedisStore* store, const DecodeInput& in,
                                                DecodeStats* stats);

}  // namespace ape

#endif  // APESERVE_COMMON_PIPELINE_DECODE_PIPELINE_H_
