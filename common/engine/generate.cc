#include "common/engine/generate.h"

#include <algorithm>
#include <chrono>

namespace ape {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kLength: return "length";
    case FinishReason::kEos: return "eos";
    case FinishReason::kStopString: return "stop";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kCacheFull: return "cache_full";
  }
  return "unknown";
}

size_t SafePrefixLength(const std::string& text, const std::vector<std::string>& stop) {
  size_t n = text.size();
  // Hold back an incomplete UTF-8 sequence at the end.
  size_t i = n, back = 0;
  while (i > 0 && back < 4 && (static_cast<unsigned char>(text[i - 1]) & 0xC0) == 0x80) {
    --i;
    ++back;
  }
  if (i > 0) {
    unsigned char lead = static_cast<unsigned char>(text[i - 1]);
    size_t want = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    if (want > 1 && back + 1 < want) n = i - 1;
  }
  // Hold back the longest suffix that is a proper prefix of a stop string.
  size_t hold = 0;
  for (const auto& s : stop) {
    for (size_t k = std::min(s.size() - 1, n); k > hold; --k) {
      if (text.compare(n - k, k, s, 0, k) == 0) {
        hold = k;
        break;
      }
    }
  }
  return n - hold;
}

GenerationStepper::GenerationStepper(const Model& model, const GenerateOptions& options, std::vector<int32_t> history)
    : tok_(model.tokenizer()),
      vocab_(model.config().vocab_size),
      options_(options),
      sampler_(options.sampling, vocab_),
      work_(vocab_),
      history_(std::move(history)) {
  if (options_.max_tokens <= 0) Finish(FinishReason::kLength);
}

bool GenerationStepper::Sample(const float* logits, TokenEvent* ev) {
  if (done_) return true;
  const auto now = std::chrono::steady_clock::now();
  if (result_.tokens.empty()) t_first_ = now;
  // Sample from a copy; logprobs come from the raw distribution.
  std::copy(logits, logits + vocab_, work_.begin());
  const int32_t id = sampler_.Sample(work_.data(), history_);
  *ev = TokenEvent();
  ev->id = id;
  ev->logprob = LogProb(logits, vocab_, id);
  if (options_.top_logprobs > 0) ev->top = TopLogProbs(logits, vocab_, options_.top_logprobs);
  const int32_t prev = history_.empty() ? -1 : history_.back();
  history_.push_back(id);
  result_.tokens.push_back(id);
  result_.decode_seconds = std::chrono::duration<double>(now - t_first_).count();
  const bool end_token = tok_.IsEndOfGeneration(id) || id == tok_.bos_id();  // BOS: llama2.c models end with it
  if (!end_token) pending_ += tok_.Decode(prev, id);

  // Release text, stopping at the first stop string.
  size_t stop_at = std::string::npos;
  for (const auto& s : options_.stop) {
    size_t p = pending_.find(s);
    if (p != std::string::npos && p < stop_at) stop_at = p;
  }
  const size_t release = stop_at != std::string::npos ? stop_at
                         : end_token                  ? pending_.size()
                                                      : SafePrefixLength(pending_, options_.stop);
  ev->text = pending_.substr(0, release);
  pending_.erase(0, release);
  result_.text += ev->text;
  if (stop_at != std::string::npos) {
    Finish(FinishReason::kStopString);
  } else if (end_token) {
    Finish(FinishReason::kEos);
  } else if (static_cast<int>(result_.tokens.size()) >= options_.max_tokens) {
    Finish(FinishReason::kLength);
  }
  return done_;
}

void GenerationStepper::Finish(FinishReason reason) {
  result_.reason = reason;
  done_ = true;
}

bool GenerationStepper::Tail(TokenEvent* ev) {
  if (pending_.empty() || result_.reason == FinishReason::kStopString || result_.reason == FinishReason::kCancelled)
    return false;
  *ev = TokenEvent();
  ev->id = -1;
  ev->text = std::move(pending_);
  pending_.clear();
  result_.text += ev->text;
  return true;
}

GenerateResult Generate(Transformer& transformer, KvCache& cache, const ApeParams& ape, std::vector<float> logits,
                        std::vector<int32_t> history, int32_t next_position, const GenerateOptions& options,
                        const TokenCallback& on_token) {
  GenerationStepper stepper(transformer.model(), options, std::move(history));
  TokenEvent ev;
  while (!stepper.done()) {
    const bool last = stepper.Sample(logits.data(), &ev);
    if (!on_token(ev)) {
      stepper.Finish(FinishReason::kCancelled);
      break;
    }
    if (last) break;
    if (cache.size >= cache.capacity) {
      stepper.Finish(FinishReason::kCacheFull);
      break;
    }
    // Feed the token back at the next position.
    const int32_t id = stepper.last_token();
    const int32_t pos = next_position++;
    transformer.Forward({&id, 1}, {&pos, 1}, cache, ape, logits.data());
  }
  if (stepper.Tail(&ev)) on_token(ev);
  return stepper.TakeResult();
}

}  // namespace ape
