// The Llama transformer (float32 activations, weights in their stored type): RMSNorm, RoPE at caller-chosen positions,
// grouped-query attention (APE-aware), SwiGLU, tied or untied classifier.
// The architectures differ only in the attention input (ModelConfig):
//   llama  interleaved RoPE, optional Llama-3 frequency factors
//   qwen2  Q/K/V biases, NEOX RoPE
//   qwen3  per-head RMSNorm of Q and K before NEOX RoPE
// Every weight product goes through MatMul (matvec.h).
//
// Thread contract: a Transformer is bound to one model and one call at a
// time (it owns the scratch); the Model it points to is shared read-only.
// One call may serve several requests: ForwardBatch advances many streams
// (each with its own KvCache) by one token or a chunk of their prompt.
// Parallelism inside a call comes from the engine's pool (ParallelFor,
// threading.h; OpenBLAS runs one thread per band of rows).
#ifndef APESERVE_COMMON_ENGINE_TRANSFORMER_H_
#define APESERVE_COMMON_ENGINE_TRANSFORMER_H_

#include <cstdint>
#include <span>
#include <vector>

#include "common/engine/ape_attention.h"
#include "common/engine/kv_cache.h"
#include "common/engine/matvec.h"
#include "common/engine/model.h"
#include "common/engine/threading.h"

namespace ape {

class Transformer {
 public:
  // `max_batch`: tokens per internal block; scratch is sized for it here,
  // so Forward allocates nothing.
  explicit Transformer(const Model& model, int max_batch = 256);

  // Runs `tokens` (with their RoPE `positions`) and appends their K/V to
  // `cache` at slots cache.size.. onward. Row logits go to `logits`:
  // the last token's [vocab] when all_logits is false, else [n][vocab].
  // Preconditions (checked by callers): cache has room, ids < vocab.
  void Forward(std::span<const int32_t> tokens, std::span<const int32_t> positions, KvCache& cache,
               const ApeParams& ape, float* logits, bool all_logits = false);

  // One step of several independent streams, sharing every weight product:
  // a decode step (one token each), possibly with chunks of prompts riding
  // along. Stream b runs its tokens (with their RoPE positions) against its
  // own *cache (their K/V go to slots cache->size.. onward, and the cache
  // grows by that many) with its own attention (*ape); the logits after its
  // last token go to logits + b * vocab. Each stream's result equals what
  // Forward computes for its tokens alone as far as MatMul's rows are
  // independent of the number of rows (matvec.h: up to kDecodeBatchMax in
  // all); norms, RoPE and attention run per stream exactly as there.
  // Preconditions (checked by callers): tokens.size() == positions.size()
  // >= 1, at most max_batch() tokens in all, every cache has room, ids <
  // vocab, no cache twice.
  struct StreamTokens {
    std::span<const int32_t> tokens;
    std::span<const int32_t> positions;
    KvCache* cache = nullptr;
    const ApeParams* ape = nullptr;
  };
  void ForwardBatch(std::span<const StreamTokens> streams, float* logits);

  const Model& model() const { return model_; }
  int max_batch() const { return max_batch_; }

 private:
  void ForwardBlock(const int32_t* tokens, const int32_t* positions, int n, KvCache& cache, const ApeParams& ape,
                    float* logits, bool all_logits);
  void FeedForward(const LayerWeights& lw, int n);
  void QueryKeyValue(const LayerWeights& lw, int n, const int32_t* positions, float* k, float* v);
  void Rope(float* x, int n, int n_heads, int row_stride, const int32_t* positions);

  const Model& model_;
  const ModelConfig& c_;
  const int max_batch_;
  std::vector<float> inv_freq_;  // [rope_dim/2] RoPE angle per unit of position
  // Scratch, [max_batch][width] each.
  std::vector<float> x_, xb_, xb2_, q_, att_, hb_, hb2_;
  // [max_batch][kv_dim] each: a batch's K and V rows before they go to
  // their streams' caches (each stream's rows at its own slots).
  std::vector<float> kb_, vb_;
  std::vector<int32_t> positions_;  // [max_batch] a batch's positions
};

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_TRANSFORMER_H_
