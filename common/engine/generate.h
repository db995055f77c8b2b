// The generation loop: sample, stream, feed back. Knows no gRPC: each token
// goes to a callback that returns false to stop (e.g. the client is gone).
#ifndef APESERVE_COMMON_ENGINE_GENERATE_H_
#define APESERVE_COMMON_ENGINE_GENERATE_H_

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "common/engine/sampler.h"
#include "common/engine/transformer.h"

namespace ape {

enum class FinishReason { kLength, kEos, kStopString, kCancelled, kCacheFull };
const char* FinishReasonName(FinishReason r);

struct GenerateOptions {
  SamplingParams sampling;
  int max_tokens = 256;           // generated tokens, at most
  std::vector<std::string> stop;  // stop strings (not included in the text)
  int top_logprobs = 0;           // alternatives reported per token
};

struct TokenEvent {
  int32_t id = 0;                              // -1: no token, only text held back until the end
  std::string text;                            // text released with this token (may be empty: held
                                               // back while it could start a stop string or is an
                                               // incomplete UTF-8 sequence)
  float logprob = 0;                           // log p(id) under the model's raw distribution
  std::vector<std::pair<int32_t, float>> top;  // top_logprobs alternatives
};
using TokenCallback = std::function<bool(const TokenEvent&)>;

struct GenerateResult {
  FinishReason reason = FinishReason::kLength;
  std::vector<int32_t> tokens;  // generated ids (a stop string's tokens included)
  std::string text;             // released text (stop string excluded)
  double decode_seconds = 0;    // time spent after the first token
};

// Generates from `logits` ([vocab], the distribution after the last prompt
// token). `history` is the prompt's ids (for the repetition penalty and
// the leading-space rule); new tokens take positions next_position, +1, ...
// and are appended to `cache` with `ape` attention.
GenerateResult Generate(Transformer& transformer, KvCache& cache, const ApeParams& ape, std::vector<float> logits,
                        std::vector<int32_t> history, int32_t next_position, const GenerateOptions& options,
                        const TokenCallback& on_token);

// Length of the longest prefix of `text` that is safe to release: it holds
// no incomplete trailing UTF-8 sequence and no suffix that could begin a
// stop string.
size_t SafePrefixLength(const std::string& text, const std::vector<std::string>& stop);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_GENERATE_H_
