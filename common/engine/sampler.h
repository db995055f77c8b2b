// Token sampling: greedy at temperature 0 (deterministic argmax, lowest id
// on ties), otherwise repetition penalty -> temperature -> top-k -> top-p ->
// min-p -> a draw from a seeded std::mt19937_64 (identical on every platform).
#ifndef APESERVE_COMMON_ENGINE_SAMPLER_H_
#define APESERVE_COMMON_ENGINE_SAMPLER_H_

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace ape {

struct SamplingParams {
  float temperature = 0.f;         // 0 = greedy
  int top_k = 0;                   // 0 = off
  float top_p = 1.f;               // 1 = off
  float min_p = 0.f;               // 0 = off
  float repetition_penalty = 1.f;  // 1 = off; >1 discourages repeats
  int repetition_window = 64;      // last N tokens penalised
  uint64_t seed = 0;
};

// INVALID_ARGUMENT naming the field when a parameter is out of range.
absl::Status ValidateSamplingParams(const SamplingParams& p);

class Sampler {
 public:
  Sampler(const SamplingParams& params, int vocab_size);
  // Picks the next token. `logits` [vocab] is modified (penalty, scaling);
  // `history` holds the tokens so far (prompt and generated).
  int32_t Sample(float* logits, std::span<const int32_t> history);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> candidates_;  // scratch [vocab]
};

// log sum_i exp(logits[i]), with max subtraction (accumulated in double).
float LogSumExp(const float* logits, int vocab_size);
// log softmax(logits)[id] over the raw logits.
float LogProb(const float* logits, int vocab_size, int32_t id);
// The `k` most likely (id, logprob) pairs, most likely first.
std::vector<std::pair<int32_t, float>> TopLogProbs(const float* logits, int vocab_size, int k);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_SAMPLER_H_
