// A loaded model: immutable config, read-only weights (matrices in the
// file's type, memory-mapped; vectors as float32), tokenizer and
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
#include "common/engine/weight_matrix.h"

namespace ape {

class GgufFile;

// Largest head size the attention kernel holds on its stack (AttentionState);
// loading a model with larger heads fails with UNIMPLEMENTED.
constexpr int kMaxHeadDim = 256;

// How RoPE pairs the dimensions of a head (GGML's two rope modes). Pair i
// (i < rope_dim/2) rotates by pos * rope_freq_scale * base^(-2i/rope_dim) / factor_i.
enum class RopeStyle {
  // Pairs (2i, 2i+1): GGML "normal" rope, llama2.c and GGUF `llama` files
  // (the converter permutes HF's Q/K rows so that this pairing is right).
  kInterleaved,
  // Pairs (i, i + rope_dim/2): GGML "neox" rope, HF's rotate_half; `qwen2`,
  // `qwen3` (their Q/K rows are stored unpermuted).
  kNeox,
};

struct ModelConfig {
  // GGUF general.architecture: llama, qwen2, qwen3 ("llama" for llama2.c).
  std::string architecture = "llama";
  int dim = 0;         // residual width
  int hidden_dim = 0;  // FFN width
  int n_layers = 0;
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // key/value heads (GQA when < n_heads)
  int head_dim = 0;    // <arch>.attention.key_length, else dim / n_heads
  int vocab_size = 0;
  int context_length = 0;  // trained window (positions beyond it are allowed)
  int rope_dim = 0;        // leading dims of each head that are rotated
  float rope_base = 10000.f;
  RopeStyle rope_style = RopeStyle::kInterleaved;
  // Linear position scaling (rope.scaling.type "linear"): 1 / rope.scaling.factor.
  float rope_freq_scale = 1.f;
  float rms_eps = 1e-5f;
  bool tied_output = true;  // classifier shares the token embedding
  bool qkv_bias = false;    // Q, K, V projections add a bias (qwen2)
  bool qk_norm = false;     // per-head RMSNorm of Q and K before RoPE (qwen3)
  // Llama-3 style per-pair frequency divisors ([rope_dim/2]); empty = none.
  std::vector<float> rope_freq_factors;

  int kv_dim() const { return n_kv_heads * head_dim; }
  int q_dim() const { return n_heads * head_dim; }
  // Parameter count (embedding and classifier counted once when tied).
  int64_t num_params() const;
};

// All matrices are row-major [out][in] (one row per output unit), so y = W x;
// they keep the file's type (weight_matrix.h). Vectors are float32.
struct LayerWeights {
  std::vector<float> rms_att;  // [dim]
  WeightMatrix wq;             // [n_heads*head_dim][dim]
  WeightMatrix wk;             // [n_kv_heads*head_dim][dim]
  WeightMatrix wv;             // [n_kv_heads*head_dim][dim]
  WeightMatrix wo;             // [dim][n_heads*head_dim]
  std::vector<float> rms_ffn;  // [dim]
  WeightMatrix w1;             // [hidden_dim][dim]   gate
  WeightMatrix w2;             // [dim][hidden_dim]   down
  WeightMatrix w3;             // [hidden_dim][dim]   up
  // Present only when the config says so (empty otherwise).
  std::vector<float> bq;      // [n_heads*head_dim]      qkv_bias
  std::vector<float> bk;      // [n_kv_heads*head_dim]   qkv_bias
  std::vector<float> bv;      // [n_kv_heads*head_dim]   qkv_bias
  std::vector<float> q_norm;  // [head_dim], shared by all query heads   qk_norm
  std::vector<float> k_norm;  // [head_dim], shared by all KV heads      qk_norm
};

struct ModelWeights {
  WeightMatrix tok_emb;  // [vocab][dim]
  std::vector<LayerWeights> layers;
  std::vector<float> rms_final;  // [dim]
  WeightMatrix wcls;             // [vocab][dim]; empty when tied to tok_emb
  const WeightMatrix& classifier() const { return wcls.empty() ? tok_emb : wcls; }
  // Bytes of all matrices (what decoding one token reads) and of everything.
  uint64_t MatrixBytes() const;
};

class Model {
 public:
  // Loads a GGUF file (tokenizer inside) or a llama2.c checkpoint, which
  // needs `tokenizer_path`. The format is detected from the magic bytes.
  // Errors name the file and the fault; nothing here aborts on bad input.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& model_path,
                                                     const std::string& tokenizer_path = "");
  // The same from bytes: `what` names the model in errors; `tokenizer_bytes`
  // is a llama2.c tokenizer file (unused for GGUF). The bytes are copied
  // once into a buffer the model owns, so they need not outlive the call.
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
  const std::string& format() const { return format_; }  // "gguf vN" or "llama2.c"
  // GGUF tokenizer.ggml.model ("llama" = SentencePiece, "gpt2" = byte-level
  // BPE) and tokenizer.ggml.pre; "llama2.c" and "" for llama2.c checkpoints.
  const std::string& tokenizer_model() const { return tokenizer_model_; }
  const std::string& tokenizer_pre() const { return tokenizer_pre_; }
  // GGUF tokenizer.chat_template (a Jinja template), "" when the file has none.
  const std::string& chat_template() const { return chat_template_; }
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
  std::string tokenizer_model_, tokenizer_pre_, chat_template_;
  double fingerprint_seconds_ = 0;
  uint64_t file_bytes_ = 0;
  friend class ModelLoader;
};

// The architecture-dependent part of a GGUF file: the config from
// `<arch>.*` metadata and the weights (matrices as views into the file's
// bytes, vectors as float32), without the tokenizer.
// Model::Parse builds a Model from it; tests of the forward pass use it
// directly (with Model::FromParts), so they do not depend on the vocabulary.
struct GgufModelParts {
  ModelConfig config;
  ModelWeights weights;
  std::string weight_types;  // stored types, e.g. "F16 x14, F32 x5"
  // The raw bytes of every tensor read, in load order (views into the
  // file's span): what the fingerprint hashes.
  std::vector<std::span<const uint8_t>> weight_bytes;
};

// Reads architectures llama, qwen2 and qwen3. Errors name the file and the
// fault: an unknown architecture, rope scaling (yarn, longrope), tensor type
// or an unused tensor (a feature this engine would silently drop) is
// UNIMPLEMENTED; a missing tensor is NOT_FOUND; inconsistent metadata or
// shapes are INVALID_ARGUMENT. The matrices point into the file's bytes:
// `owner` keeps them alive (the mapping); with none, the caller must keep
// the bytes alive as long as the parts.
absl::StatusOr<GgufModelParts> LoadGgufModelParts(const GgufFile& gguf, std::shared_ptr<const void> owner = nullptr);

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_MODEL_H_
