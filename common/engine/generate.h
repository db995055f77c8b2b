// The generation loop: sample, stream, feed back. Knows no gRPC: each token
// goes to a callback that returns false to stop (e.g. the client is gone).
#ifndef APESERVE_COMMON_ENGINE_GENERATE_H_
#define APESERVE_COMMON_ENGINE_GENERATE_H_

#include <chrono>
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
  double decode_seconds = 0;    // from the first token sampled to the last
};

// One stream's generation, advanced token by token by whoever owns the
// forward passes (Generate below for one request; the batch decoder for
// many sharing one forward step). Holds the sampler (its seeded RNG), the
// history (repetition penalty, leading-space rule), the text held back
// (incomplete UTF-8, a possible stop-string start) and the result so far.
//
// A step: Sample(logits) picks the token after `logits`, fills its event and
// says whether generation ends with it (stop string, end token, max_tokens).
// The owner then hands the event to the consumer, and unless it ended (or the
// consumer or the cache stops it: Finish), feeds last_token() to the model at
// the next position and calls Sample with the logits that came out. At the
// end, Tail() gives text still held back, if any is to be released.
class GenerationStepper {
 public:
  // `history`: the prompt's ids. max_tokens <= 0 ends at once (kLength).
  GenerationStepper(const Model& model, const GenerateOptions& options, std::vector<int32_t> history);

  // Samples the token after `logits` ([vocab], not modified) into `ev`.
  // Returns true when this token ends the generation (result().reason set).
  bool Sample(const float* logits, TokenEvent* ev);
  // Ends the generation early (the consumer is gone: kCancelled; no room
  // in the cache: kCacheFull).
  void Finish(FinishReason reason);
  // The held-back text to flush at the end (id -1), or false when there is
  // none or it must not be released (stop string, cancelled).
  bool Tail(TokenEvent* ev);

  bool done() const { return done_; }
  int32_t last_token() const { return result_.tokens.back(); }
  const GenerateResult& result() const { return result_; }
  GenerateResult TakeResult() { return std::move(result_); }

 private:
  const Tokenizer& tok_;
  const int vocab_;
  const GenerateOptions options_;  // a copy: the stepper outlives its caller's arguments
  Sampler sampler_;
  std::vector<float> work_;  // [vocab] the sampler's copy of the logits
  std::vector<int32_t> history_;
  std::string pending_;  // decoded, not yet released text
  GenerateResult result_;
  bool done_ = false;
  std::chrono::steady_clock::time_point t_first_;  // when the first token was sampled
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
