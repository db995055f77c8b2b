#include "common/pipeline/batch_decoder.h"

#include <algorithm>
#include <span>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/engine/matvec.h"
#include "common/engine/threading.h"
#include "common/engine/timing.h"

namespace ape {

using Clock = std::chrono::steady_clock;

BatchStream::Next BatchStream::Wait(TokenEvent* ev, Clock::time_point until) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_until(lock, until, [this] { return !events_.empty() || done_; })) return Next::kTimeout;
  if (events_.empty()) return Next::kDone;  // events always go out before the end
  *ev = std::move(events_.front());
  events_.pop_front();
  return Next::kEvent;
}

// A stream inside the engine (engine thread only).
struct BatchDecoder::Active {
  Active(const Model& model, Request r, std::shared_ptr<BatchStream> s)
      : stream(std::move(s)),
        session(std::move(r.session)),
        stepper(model, r.generate, session.history),
        score_only(r.score_only),
        on_leave(std::move(r.on_leave)),
        next_position(session.next_position) {}
  std::shared_ptr<BatchStream> stream;
  DecodeSession session;
  GenerationStepper stepper;
  const bool score_only;
  std::function<void()> on_leave;
  int32_t next_position;  // of the token to feed next
  Clock::time_point submitted = Clock::now();
  bool feeding = false;  // sampled a token that the next decode step feeds
  bool left = false;     // finished: removed after this iteration
};

BatchDecoder::BatchDecoder(const Model& model, BatchDecoderOptions options)
    : model_(model),
      options_{.max_streams = std::clamp(options.max_streams, 1, 256),
               .prefill_chunk = std::clamp(options.prefill_chunk, 1, 1024)},
      tf_(model, std::max({options_.max_streams, options_.prefill_chunk, kDecodeBatchMax})),
      logits_(static_cast<size_t>(options_.max_streams) * model.config().vocab_size),
      thread_([this] { Loop(); }) {}

BatchDecoder::~BatchDecoder() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

absl::StatusOr<std::shared_ptr<BatchStream>> BatchDecoder::Submit(Request request) {
  const DecodeSession& s = request.session;
  if (s.cache == nullptr || s.prefill_done()) {
    return absl::InvalidArgumentError("a batch stream needs prompt tokens left to prefill (its first logits)");
  }
  if (s.cache->n_layers != model_.config().n_layers || s.cache->kv_dim != model_.config().kv_dim()) {
    return absl::InvalidArgumentError("the session's cache was laid out for another model");
  }
  if (s.to_prefill_positions.size() != s.to_prefill.size() ||
      s.cache->size + static_cast<int64_t>(s.to_prefill.size() - s.prefilled) > s.cache->capacity) {
    return absl::InvalidArgumentError(
        absl::StrCat("the session's cache (", s.cache->capacity, " slots) has no room for its prompt"));
  }
  auto stream = std::make_shared<BatchStream>();
  auto active = std::make_unique<Active>(model_, std::move(request), stream);
  {
    std::lock_guard<std::mutex> lock(mu_);
    submitted_.push_back(std::move(active));
  }
  cv_.notify_all();
  return stream;
}

int BatchDecoder::waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(submitted_.size());
}

bool BatchDecoder::TakeIn(std::vector<std::unique_ptr<Active>>& active) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return stop_ || !active.empty() || !submitted_.empty(); });
  if (stop_) return false;
  while (!submitted_.empty() && static_cast<int>(active.size()) < options_.max_streams) {
    Active& a = *submitted_.front();
    a.stream->engine_queue_ms_ = MsBetween(a.submitted, Clock::now());
    active.push_back(std::move(submitted_.front()));
    submitted_.pop_front();
    running_.fetch_add(1, std::memory_order_relaxed);
  }
  return true;
}

void BatchDecoder::Leave(Active& a, FinishReason reason) {
  if (!a.stepper.done() || reason == FinishReason::kCancelled) a.stepper.Finish(reason);
  BatchStream& s = *a.stream;
  TokenEvent tail;
  const bool has_tail = a.stepper.Tail(&tail);
  s.result_ = a.stepper.TakeResult();
  // The cache goes now: the slot's memory is free before the consumer sees the end.
  a.session.cache.reset();
  if (a.on_leave) a.on_leave();
  running_.fetch_sub(1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(s.mu_);
    if (has_tail) s.events_.push_back(std::move(tail));
    s.done_ = true;
  }
  s.cv_.notify_all();
  a.left = true;
}

bool BatchDecoder::Emit(Active& a, const float* logits) {
  TokenEvent ev;
  const bool last = a.stepper.Sample(logits, &ev);
  {
    std::lock_guard<std::mutex> lock(a.stream->mu_);
    a.stream->events_.push_back(std::move(ev));
  }
  a.stream->cv_.notify_all();
  if (last) {
    Leave(a, a.stepper.result().reason);
    return false;
  }
  if (a.session.cache->size >= a.session.cache->capacity) {
    Leave(a, FinishReason::kCacheFull);
    return false;
  }
  return true;
}

// The oldest stream still prefilling gets one chunk of its own: first come,
// first served keeps the mean time to first token lowest, and every other
// stream waits at most this chunk.
void BatchDecoder::PrefillAlone(Active& a) {
  const auto t0 = Clock::now();
  PrefillChunk(tf_, a.session, options_.prefill_chunk, logits_.data());
  a.stream->prefill_ms_ += MsBetween(t0, Clock::now());
  if (a.session.prefill_done()) PromptDone(a, logits_.data());
}

void BatchDecoder::PromptDone(Active& a, const float* logits) {
  if (a.score_only) {
    a.stream->logits_.assign(logits, logits + model_.config().vocab_size);
    Leave(a, FinishReason::kLength);
    return;
  }
  a.feeding = Emit(a, logits);
}

// One iteration's computation. Every stream with a token to feed decodes it,
// and prompt chunks (prefill_chunk tokens each, oldest stream first) ride
// along in the same forward pass while the pass stays within
// kDecodeBatchMax tokens: there MatMul's rows do not depend on how many run
// together (matvec.h), so a chunk computes exactly what it computes alone,
// and the weights are read once for the decode rows and the chunks. When
// the oldest stream's chunk does not fit, it runs alone first.
void BatchDecoder::Step(std::vector<std::unique_ptr<Active>>& active) {
  const int limit = kDecodeBatchMax;  // <= tf_.max_batch()
  auto chunk_of = [&](const Active& a) {
    return static_cast<int>(
        std::min<size_t>(options_.prefill_chunk, a.session.to_prefill.size() - a.session.prefilled));
  };
  auto prefilling = [](const Active& a) { return !a.left && !a.session.prefill_done(); };
  auto feeding = [](const Active& a) { return !a.left && a.feeding; };
  const int decode_rows =
      static_cast<int>(std::count_if(active.begin(), active.end(), [&](const auto& a) { return feeding(*a); }));
  auto oldest = std::find_if(active.begin(), active.end(), [&](const auto& a) { return prefilling(*a); });
  bool ride = true;
  if (oldest != active.end() && decode_rows + chunk_of(**oldest) > limit) {
    PrefillAlone(**oldest);
    ride = false;
  }

  // The pass: decode rows first, then the chunks that fit.
  std::vector<Active*> batch;
  std::vector<Transformer::StreamTokens> rows;  // rows[b]: batch[b]'s tokens
  feed_.resize(active.size());
  int tokens = 0;
  for (size_t i = 0; i < active.size(); ++i) {
    Active& a = *active[i];
    if (!feeding(a)) continue;
    feed_[i] = a.stepper.last_token();
    batch.push_back(&a);
    rows.push_back({.tokens = {&feed_[i], 1},
                    .positions = {&a.next_position, 1},
                    .cache = a.session.cache.get(),
                    .ape = &a.session.ape});
    ++tokens;
  }
  const int decoding = static_cast<int>(batch.size());
  for (auto& p : active) {
    Active& a = *p;
    if (!ride || !prefilling(a)) continue;
    const int m = chunk_of(a);
    if (tokens + m > limit) break;  // first come, first served
    const std::span<const int32_t> t(a.session.to_prefill), pos(a.session.to_prefill_positions);
    batch.push_back(&a);
    rows.push_back({.tokens = t.subspan(a.session.prefilled, m),
                    .positions = pos.subspan(a.session.prefilled, m),
                    .cache = a.session.cache.get(),
                    .ape = &a.session.ape});
    tokens += m;
  }
  if (rows.empty()) return;
  const auto t0 = Clock::now();
  tf_.ForwardBatch(rows, logits_.data());
  const double ms = MsBetween(t0, Clock::now());
  if (decoding > 0) {
    steps_.fetch_add(1, std::memory_order_relaxed);
    step_rows_.fetch_add(decoding, std::memory_order_relaxed);
    riding_chunks_.fetch_add(static_cast<int64_t>(batch.size()) - decoding, std::memory_order_relaxed);
  }
  const size_t vocab = model_.config().vocab_size;
  for (size_t b = decoding; b < batch.size(); ++b) {
    Active& a = *batch[b];
    a.session.prefilled += rows[b].tokens.size();
    a.stream->prefill_ms_ += ms;
    if (a.session.prefill_done()) PromptDone(a, logits_.data() + b * vocab);
  }
  // Sampling, logprobs and top_logprobs scan the vocabulary once or more per
  // stream: spread over the cores (streams are independent).
  ParallelFor(decoding, /*dynamic=*/true, [&](int64_t b) {
    Active& a = *batch[b];
    ++a.next_position;
    a.feeding = Emit(a, logits_.data() + b * vocab);
  });
}

void BatchDecoder::Loop() {
  std::vector<std::unique_ptr<Active>> active;
  auto drop_left = [&] {
    active.erase(std::remove_if(active.begin(), active.end(), [](const auto& a) { return a->left; }), active.end());
  };
  while (TakeIn(active)) {
    for (auto& a : active) {
      if (a->stream->cancel_.load(std::memory_order_relaxed)) Leave(*a, FinishReason::kCancelled);
    }
    drop_left();
    Step(active);
    drop_left();
  }
  // Stopping: whatever is still here ends as cancelled.
  std::deque<std::unique_ptr<Active>> rest;
  {
    std::lock_guard<std::mutex> lock(mu_);
    rest.swap(submitted_);
  }
  for (auto& a : rest) {
    running_.fetch_add(1, std::memory_order_relaxed);  // Leave counts it out
    active.push_back(std::move(a));
  }
  for (auto& a : active) {
    if (!a->left) Leave(*a, FinishReason::kCancelled);
  }
}

}  // namespace ape
