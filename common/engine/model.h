// A loaded model: immutable config, read-only float32 weights, tokenizer and
// fingerprint. Shared by every request; nothing here changes after Load.
#ifndef APESERVE_COMMON_ENGINE_MODEL_H_
#define APESERVE_COMMON_ENGINE_MODEL_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/engine/tokenizer.h"

namespace ape {

// Largest head size the attention kernel holds on its stack (AttentionState);
// loading a model with larger heads fails with UNIMPLEMENTED.
constexpr int kMaxHeadDim = 256;

struct ModelConfig {
  std::string architecture = "llama";
  int dim = 0;         // residual width
  int hidden_dim = 0;  // FFN width
  int n_layers = 0;
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // key/value heads (GQA when < n_heads)
  int head_dim = 0;    // dim / n_heads
  int vocab_size = 0;
  int context_length = 0;  // trained window (positions beyond it are allowed)
  int rope_dim = 0;        // leading dims of each head that are rotated
  float rope_base = 10000.f;
  float rms_eps = 1e-5f;
  bool tied_output = true;  // classifier shares the token embedding
  // Llama-3 style per-pair frequency divisors ([rope_dim/2]); empty = none.
  std::vector<float> rope_freq_factors;

  int kv_dim() const { return n_kv_heads * head_dim; }
  int q_dim() const { return n_heads * head_dim; }
  // Parameter count (embedding and classifier counted once when tied).
  int64_t num_params() const;
};

// All matrices are row-major [out][in] (one row per output unit), so y = W x.
struct LayerWeights {
  std::vector<float> rms_att;  // [dim]
  std::vector<float> wq;       // [n_heads*head_dim][dim]
  std::vector<float> wk;       // [n_kv_heads*head_dim][dim]
  std::vector<float> wv;       // [n_kv_heads*head_dim][dim]
  std::vector<float> wo;       // [dim][n_heads*head_dim]
  std::vector<float> rms_ffn;  // [dim]
  std::vector<float> w1;       // [hidden_dim][dim]   gate
  std::vector<float> w2;       // [dim][hidden_dim]   down
  std::vector<float> w3;       // [hidden_dim][dim]   up
};

struct ModelWeights {
  std::vector<float> tok_emb;  // [vocab][dim]
  std::vector<LayerWeights> layers;
  std::vector<float> rms_final;  // [dim]
  std::vector<float> wcls;       // [vocab][dim]; empty when tied to tok_emb
  const float* classifier() const { return wcls.empty() ? tok_emb.data() : wcls.data(); }
};

class Model {
 public:
  // Loads a GGUF file (tokenizer inside) or a llama2.c checkpoint, which
  // needs `tokenizer_path`. The format is detected from the magic bytes.
  // Errors name the file and the fault; nothing here aborts on bad input.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& model_path,
                                                     const std::string& tokenizer_path = "");
  // The same from bytes (what Load maps): `what` names the model in errors;
  // `tokenizer_bytes` is a llama2.c tokenizer file (unused for GGUF). The
  // weights are copied, so the bytes need not outlive the call.
  static absl::StatusOr<std::unique_ptr<Model>> Parse(std::span<const uint8_t> model_bytes, const std::string& what,
                                                      std::span<const uint8_t> tokenizer_bytes = {},
                                                      const std::string& tokenizer_what = "tokenizer");

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  const Tokenizer& tokenizer() const { return tokenizer_; }
  // 128-bit XXH3 over the config, the tokenizer and the raw weight bytes, as
  // 32 lowercase hex digits. Identical files give identical fingerprints on
  // any machine; any change of weights, shape or vocabulary changes it.
  const std::string& fingerprint() const { return fingerprint_; }
  const std::string& path() const { return path_; }
  const std::string& format() const { return format_; }  // "gguf" or "llama2.c"
  // Human-readable description of the weights' stored types.
  const std::string& weight_types() const { return weight_types_; }
  double fingerprint_seconds() const { return fingerprint_seconds_; }
  uint64_t file_bytes() const { return file_bytes_; }

  // The canonical config string hashed into the fingerprint.
  std::string CanonicalConfig() const;

  // For tools that build models in memory (tests, benchmarks).
  static std::unique_ptr<Model> FromParts(ModelConfig config, ModelWeights weights, Tokenizer tokenizer,
                                          std::string fingerprint);

 private:
  Model() = default;
  ModelConfig config_;
  ModelWeights weights_;
  Tokenizer tokenizer_;
  std::string fingerprint_;
  std::string path_, format_, weight_types_;
  double fingerprint_seconds_ = 0;
  uint64_t file_bytes_ = 0;
  friend class ModelLoader;
};

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_MODEL_H_
