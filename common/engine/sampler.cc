#include "common/engine/sampler.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace ape {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  auto bad = [](const std::string& m) { return absl::InvalidArgumentError(m); };
  if (!(p.temperature >= 0.f) || p.temperature > 100.f)
    return bad(absl::StrCat("temperature must be in [0, 100], got ", p.temperature));
  if (p.top_k < 0) return bad(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  if (!(p.top_p > 0.f && p.top_p <= 1.f)) return bad(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  if (!(p.min_p >= 0.f && p.min_p < 1.f)) return bad(absl::StrCat("min_p must be in [0, 1), got ", p.min_p));
  if (!(p.repetition_penalty > 0.f) || p.repetition_penalty > 10.f)
    return bad(absl::StrCat("repetition_penalty must be in (0, 10], got ", p.repetition_penalty));
  if (p.repetition_window < 0) return bad("repetition_window must be >= 0");
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params, int vocab_size) : p_(params), rng_(params.seed) {
  candidates_.reserve(vocab_size);
}

int32_t Sampler::Sample(float* logits, std::span<const int32_t> history) {
  const int vocab = static_cast<int>(candidates_.capacity());
  // Repetition penalty over the recent window (each distinct token once).
  if (p_.repetition_penalty != 1.f && p_.repetition_window > 0) {
    const size_t from =
        history.size() > static_cast<size_t>(p_.repetition_window) ? history.size() - p_.repetition_window : 0;
    std::vector<int32_t> seen(history.begin() + from, history.end());
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    for (int32_t id : seen) {
      if (id < 0 || id >= vocab) continue;
      logits[id] = logits[id] > 0 ? logits[id] / p_.repetition_penalty : logits[id] * p_.repetition_penalty;
    }
  }
  if (p_.temperature == 0.f) { return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits); }
  // Softmax at temperature, as (prob, id) candidates sorted by probability.
  const float mx = *std::max_element(logits, logits + vocab);
  candidates_.clear();
  for (int i = 0; i < vocab; ++i) { candidates_.emplace_back(std::exp((logits[i] - mx) / p_.temperature), i); }
  auto by_prob = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t keep = candidates_.size();
  if (p_.top_k > 0 && static_cast<size_t>(p_.top_k) < keep) {
    keep = p_.top_k;
    std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(), by_prob);
  } else {
    std::sort(candidates_.begin(), candidates_.end(), by_prob);
  }
  float total = 0.f;
  for (size_t i = 0; i < keep; ++i) total += candidates_[i].first;
  // top-p: the smallest prefix whose mass reaches top_p.
  if (p_.top_p < 1.f) {
    float cum = 0.f;
    for (size_t i = 0; i < keep; ++i) {
      cum += candidates_[i].first / total;
      if (cum >= p_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  // min-p: drop tokens below min_p times the most likely one.
  if (p_.min_p > 0.f) {
    const float floor = p_.min_p * candidates_[0].first;
    size_t i = 1;
    while (i < keep && candidates_[i].first >= floor) ++i;
    keep = i;
  }
  total = 0.f;
  for (size_t i = 0; i < keep; ++i) total += candidates_[i].first;
  // 24 random bits -> uniform in [0, 1): portable, unlike std distributions.
  const float u = static_cast<float>(rng_() >> 40) * (1.f / 16777216.f) * total;
  float cum = 0.f;
  for (size_t i = 0; i < keep; ++i) {
    cum += candidates_[i].first;
    if (u < cum) return candidates_[i].second;
  }
  return candidates_[keep - 1].second;
}

float LogSumExp(const float* x, int n) {
  const float mx = *std::max_element(x, x + n);
  double s = 0;
  for (int i = 0; i < n; ++i) s += std::exp(static_cast<double>(x[i] - mx));
  return mx + static_cast<float>(std::log(s));
}

float LogProb(const float* logits, int vocab_size, int32_t id) { return logits[id] - LogSumExp(logits, vocab_size); }

std::vector<std::pair<int32_t, float>> TopLogProbs(const float* logits, int vocab_size, int k) {
  k = std::clamp(k, 0, vocab_size);
  std::vector<int32_t> ids(vocab_size);
  for (int i = 0; i < vocab_size; ++i) ids[i] = i;
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  const float lse = LogSumExp(logits, vocab_size);
  std::vector<std::pair<int32_t, float>> out;
  for (int i = 0; i < k; ++i) out.emplace_back(ids[i], logits[ids[i]] - lse);
  return out;
}

}  // namespace ape
