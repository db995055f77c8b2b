#include "common/pipeline/batch_decoder.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
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
      tf_(model, std::max(options_.max_streams, options_.prefill_chunk)),
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

// The oldest stream still prefilling gets one chunk: first come, first
// served keeps the mean time to first token lowest, and every other stream
// waits at most this chunk.
void BatchDecoder::PrefillOne(std::vector<std::unique_ptr<Active>>& active) {
  auto it =
      std::find_if(active.begin(), active.end(), [](const auto& a) { return !a->left && !a->session.prefill_done(); });
  if (it == active.end()) return;
  Active& a = **it;
  const auto t0 = Clock::now();
  PrefillChunk(tf_, a.session, options_.prefill_chunk, logits_.data());
  a.stream->prefill_ms_ += MsBetween(t0, Clock::now());
  if (!a.session.prefill_done()) return;
  if (a.score_only) {
    a.stream->logits_.assign(logits_.begin(), logits_.begin() + model_.config().vocab_size);
    Leave(a, FinishReason::kLength);
    return;
  }
  a.feeding = Emit(a, logits_.data());
}

void BatchDecoder::DecodeStep(std::vector<std::unique_ptr<Active>>& active) {
  std::vector<Active*> batch;
  std::vector<Transformer::DecodeRow> rows;
  for (auto& a : active) {
    if (a->left || !a->feeding) continue;
    batch.push_back(a.get());
    rows.push_back({.token = a->stepper.last_token(),
                    .position = a->next_position,
                    .cache = a->session.cache.get(),
                    .ape = &a->session.ape});
  }
  if (rows.empty()) return;
  tf_.ForwardDecodeBatch(rows, logits_.data());
  steps_.fetch_add(1, std::memory_order_relaxed);
  step_rows_.fetch_add(static_cast<int64_t>(rows.size()), std::memory_order_relaxed);
  const size_t vocab = model_.config().vocab_size;
  // Sampling, logprobs and top_logprobs scan the vocabulary once or more per
  // stream: spread over the cores (streams are independent).
  ParallelFor(static_cast<int64_t>(batch.size()), /*dynamic=*/true, [&](int64_t b) {
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
    PrefillOne(active);
    DecodeStep(active);
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
