// Continuous batching: one engine thread owns one Transformer and advances
// every admitted stream together.
//
// A stream is a DecodeSession (loaded and laid out by PrepareDecode on the
// caller's thread: Redis I/O never runs here) plus its generation options.
// The engine loop, per iteration:
//   1. takes in newly submitted streams (up to max_streams in the batch;
//      more wait in order) and drops the cancelled ones, freeing their slot;
//   2. runs ONE forward pass (Transformer::ForwardBatch: the weights are
//      read once for all its rows) with a token for every stream that has
//      one to feed, and the next prefill chunk (prefill_chunk tokens) of
//      the streams still prefilling, oldest first, as long as the pass
//      stays within kDecodeBatchMax tokens (matvec.h). A chunk that does
//      not fit (a long one, or a full batch) runs alone first, for the
//      oldest stream only;
//   3. samples each decoding stream's next token, and the first token of a
//      stream whose prompt just ended (or, score_only, hands back the
//      prompt logits and leaves); finished streams leave.
// So a running stream waits at most one chunk between two of its tokens,
// and a newcomer's prefill is spread over its chunks. Chunk boundaries
// depend only on the request (prefill_chunk and the prompt), and a chunk
// rides along only where MatMul's rows do not depend on how many run
// together, so a request's results do not depend on what else is running:
// a stream's greedy tokens equal those it gets alone (as long as at most
// kDecodeBatchMax streams decode at once).
//
// Tokens go from the engine to the stream's own queue; the consumer (a gRPC
// handler) takes them with BatchStream::Next and may block on its client as
// long as it likes: the engine never waits for a consumer.
//
// Threads: only the engine thread computes (OpenMP team per calling thread,
// threading.h); callers only prepare sessions and read queues.
#ifndef APESERVE_COMMON_PIPELINE_BATCH_DECODER_H_
#define APESERVE_COMMON_PIPELINE_BATCH_DECODER_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "common/engine/generate.h"
#include "common/engine/model.h"
#include "common/engine/transformer.h"
#include "common/pipeline/decode_pipeline.h"

namespace ape {

struct BatchDecoderOptions {
  // Streams in the batch at once (rows of one decode step); 1 to 256.
  int max_streams = 8;
  // Prompt tokens prefilled per engine iteration. 32 rows already run the
  // weight products as matrix products (FloatGemm and the batched quantized
  // kernels are near their peak from a few dozen rows on), while the stall
  // a chunk imposes on the decoding streams stays bounded by 32 tokens'
  // worth of prefill. Larger chunks buy little throughput for longer stalls:
  // at 8 streams, 32 measured more tokens/s and a lower p99 inter-token
  // latency than 64 (bench/results/load.md). 1 to 1024.
  int prefill_chunk = 32;
};

// One request in the engine, shared by the engine and its consumer.
class BatchStream {
 public:
  enum class Next { kEvent, kDone, kTimeout };
  // The next token event (kEvent), or kDone once the stream has left the
  // engine and every event was taken, or kTimeout at `until`.
  Next Wait(TokenEvent* ev, std::chrono::steady_clock::time_point until);
  // Asks the engine to drop the stream; it leaves (slot freed, reason
  // kCancelled) before the next chunk or step.
  void Cancel() { cancel_.store(true, std::memory_order_relaxed); }

  // Valid once Wait returned kDone.
  const GenerateResult& result() const { return result_; }
  const std::vector<float>& logits() const { return logits_; }  // score_only: after the prompt
  double prefill_ms() const { return prefill_ms_; }             // compute time of its chunks
  double engine_queue_ms() const { return engine_queue_ms_; }   // waiting for a batch slot

 private:
  friend class BatchDecoder;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<TokenEvent> events_;  // guarded by mu_
  bool done_ = false;              // guarded by mu_
  std::atomic<bool> cancel_{false};
  // Written by the engine before done_ is set; read by the consumer after.
  GenerateResult result_;
  std::vector<float> logits_;
  double prefill_ms_ = 0, engine_queue_ms_ = 0;
};

class BatchDecoder {
 public:
  // Starts the engine thread. `model` outlives the decoder.
  BatchDecoder(const Model& model, BatchDecoderOptions options = {});
  // Stops the engine: streams still in it end as kCancelled.
  ~BatchDecoder();
  BatchDecoder(const BatchDecoder&) = delete;
  BatchDecoder& operator=(const BatchDecoder&) = delete;

  struct Request {
    DecodeSession session;
    GenerateOptions generate;
    bool score_only = false;  // prefill and return the prompt logits, no generation
    // Called once on the engine thread when the stream leaves the batch
    // (before Wait sees kDone), e.g. to release an admission slot.
    std::function<void()> on_leave;
  };
  // INVALID_ARGUMENT for a session with no prompt left to prefill (no
  // logits to start from), no room for it in its cache, or a cache of
  // another model's shape.
  absl::StatusOr<std::shared_ptr<BatchStream>> Submit(Request request);

  // Streams in the batch, and waiting for a place in it (for metrics).
  int running() const { return running_.load(std::memory_order_relaxed); }
  int waiting() const;
  // Decode steps run and rows they computed (mean batch = rows / steps).
  int64_t steps() const { return steps_.load(std::memory_order_relaxed); }
  int64_t step_rows() const { return step_rows_.load(std::memory_order_relaxed); }
  // Prompt chunks computed inside a decode step (riding along).
  int64_t riding_chunks() const { return riding_chunks_.load(std::memory_order_relaxed); }

  const BatchDecoderOptions& options() const { return options_; }

 private:
  struct Active;
  void Loop();
  // Moves submitted streams into the batch; false when stopping.
  bool TakeIn(std::vector<std::unique_ptr<Active>>& active);
  void Step(std::vector<std::unique_ptr<Active>>& active);
  void PrefillAlone(Active& a);
  // A stream's prompt is in its cache: hands back the logits (score_only) or
  // samples its first token.
  void PromptDone(Active& a, const float* logits);
  // Samples a stream's next token from `logits` and queues its event; true
  // when the stream still needs feeding.
  bool Emit(Active& a, const float* logits);
  void Leave(Active& a, FinishReason reason);

  const Model& model_;
  const BatchDecoderOptions options_;
  Transformer tf_;             // the engine thread's only
  std::vector<float> logits_;  // [max_streams][vocab]
  std::vector<int32_t> feed_;  // the tokens a step feeds, one per stream

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Active>> submitted_;  // guarded by mu_
  bool stop_ = false;                              // guarded by mu_
  std::atomic<int> running_{0};
  std::atomic<int64_t> steps_{0}, step_rows_{0}, riding_chunks_{0};
  std::thread thread_;  // last: starts once everything above exists
};

}  // namespace ape

#endif  // APESERVE_COMMON_PIPELINE_BATCH_DECODER_H_
