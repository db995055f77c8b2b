#include "common/engine/generate.h"

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

GenerateResult Generate(Transformer& transformer, KvCache& cache, const ApeParams& ape, std::vector<float> logits,
                        std::vector<int32_t> history, int32_t next_position, const GenerateOptions& options,
                        const TokenCallback& on_token) {
  const Tokenizer& tok = transformer.model().tokenizer();
  const int vocab = transformer.model().config().vocab_size;
  Sampler sampler(options.sampling, vocab);
  std::vector<float> work(vocab);
  GenerateResult result;
  std::string pending;  // decoded but not yet released text
  auto t_first = std::chrono::steady_clock::now();

  for (int step = 0; step < options.max_tokens; ++step) {
    if (step == 1) t_first = std::chrono::steady_clock::now();
    // Sample from a copy; logprobs come from the raw distribution.
    work = logits;
    const int32_t id = sampler.Sample(work.data(), history);
    TokenEvent ev;
    ev.id = id;
    ev.logprob = LogProb(logits.data(), vocab, id);
    if (options.top_logprobs > 0) ev.top = TopLogProbs(logits.data(), vocab, options.top_logprobs);
    const int32_t prev = history.empty() ? -1 : history.back();
    history.push_back(id);
    result.tokens.push_back(id);
    const bool end_token = tok.IsEndOfGeneration(id) || id == tok.bos_id();  // BOS: llama2.c models end with it
    if (!end_token) pending += tok.Decode(prev, id);

    // Release text, stopping at the first stop string.
    size_t stop_at = std::string::npos;
    for (const auto& s : options.stop) {
      size_t p = pending.find(s);
      if (p != std::string::npos && p < stop_at) stop_at = p;
    }
    size_t release = stop_at != std::string::npos ? stop_at
                     : end_token                  ? pending.size()
                                                  : SafePrefixLength(pending, options.stop);
    ev.text = pending.substr(0, release);
    pending.erase(0, release);
    result.text += ev.text;
    if (!on_token(ev)) {
      result.reason = FinishReason::kCancelled;
      break;
    }
    if (stop_at != std::string::npos) {
      result.reason = FinishReason::kStopString;
      break;
    }
    if (end_token) {
      result.reason = FinishReason::kEos;
      break;
    }
    if (step + 1 == options.max_tokens) {
      result.reason = FinishReason::kLength;
      break;
    }
    if (cache.size >= cache.capacity) {
      result.reason = FinishReason::kCacheFull;
      break;
    }
    // Feed the token back at the next position.
    const int32_t pos = next_position++;
    transformer.Forward({&id, 1}, {&pos, 1}, cache, ape, logits.data());
  }
  if (!pending.empty() && result.reason != FinishReason::kStopString && result.reason != FinishReason::kCancelled) {
    TokenEvent tail;  // flush text held back at the very end
    tail.id = -1;
    tail.text = pending;
    result.text += pending;
    on_token(tail);
  }
  result.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_first).count();
  return result;
}

}  // namespace ape
