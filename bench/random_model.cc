#include "bench/random_model.h"

#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/engine/quantize_model.h"

namespace ape::bench {

absl::StatusOr<ModelConfig> ShapeByName(const std::string& name) {
  ModelConfig c;
  c.rope_base = 10000.f;
  if (name == "qwen2.5-0.5b") {  // Qwen2.5-0.5B dims (llama attention, no biases)
    c.dim = 896;
    c.hidden_dim = 4864;
    c.n_layers = 24;
    c.n_heads = 14;
    c.n_kv_heads = 2;
    c.vocab_size = 151936;
  } else if (name == "llama-3.2-1b") {
    c.dim = 2048;
    c.hidden_dim = 8192;
    c.n_layers = 16;
    c.n_heads = 32;
    c.n_kv_heads = 8;
    c.vocab_size = 128256;
  } else if (name == "tinyllama-1.1b") {
    c.dim = 2048;
    c.hidden_dim = 5632;
    c.n_layers = 22;
    c.n_heads = 32;
    c.n_kv_heads = 4;
    c.vocab_size = 32000;
  } else if (name == "small") {
    c.dim = 256;
    c.hidden_dim = 768;
    c.n_layers = 4;
    c.n_heads = 8;
    c.n_kv_heads = 2;
    c.vocab_size = 512;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown shape ", name));
  }
  c.head_dim = c.dim / c.n_heads;
  c.rope_dim = c.head_dim;
  c.context_length = 4096;
  return c;
}

std::unique_ptr<Model> RandomModel(const ModelConfig& c, uint64_t seed, GgmlType type) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 0.02f);
  auto fill = [&](std::vector<float>& v, size_t n, float constant = 0.f) {
    v.resize(n);
    if (constant != 0.f) {
      std::fill(v.begin(), v.end(), constant);
      return;
    }
    // Cheap pseudo-random fill: a few thousand normals tiled (timing only).
    static std::vector<float> pool;
    if (pool.empty()) {
      pool.resize(4099);
      for (auto& x : pool) x = nd(rng);
    }
    for (size_t i = 0; i < n; ++i) v[i] = pool[(i * 7 + seed) % pool.size()];
  };
  ModelWeights w;
  const size_t D = c.dim, H = c.hidden_dim, Q = c.q_dim(), KV = c.kv_dim();
  auto matrix = [&](size_t rows, size_t cols) {
    std::vector<float> v;
    fill(v, rows * cols);
    if (type == GgmlType::kF32) return WeightMatrix::FromFloats(std::move(v), rows, cols);
    // As apectl quantize: rows that are not whole blocks of a K type take
    // llama.cpp's fallback type (Q5_0 for Q4_K, Q5_1 for Q5_K, Q8_0 for Q6_K).
    const GgmlType t = MatrixTypeFor(type, cols).value_or(GgmlType::kF32);
    if (t == GgmlType::kF32) return WeightMatrix::FromFloats(std::move(v), rows, cols);
    return WeightMatrix::Quantized(t, v, rows, cols);
  };
  w.tok_emb = matrix(c.vocab_size, D);
  w.layers.resize(c.n_layers);
  for (auto& l : w.layers) {
    fill(l.rms_att, D, 1.f);
    fill(l.rms_ffn, D, 1.f);
    l.wq = matrix(Q, D);
    l.wk = matrix(KV, D);
    l.wv = matrix(KV, D);
    l.wo = matrix(D, Q);
    l.w1 = matrix(H, D);
    l.w2 = matrix(D, H);
    l.w3 = matrix(H, D);
  }
  fill(w.rms_final, D, 1.f);
  // A byte-level llama2.c-format vocabulary of c.vocab_size pieces.
  std::string tok;
  auto put_i32 = [&](int32_t v) { tok.append(reinterpret_cast<const char*>(&v), 4); };
  auto put_f32 = [&](float v) { tok.append(reinterpret_cast<const char*>(&v), 4); };
  put_i32(16);
  for (int i = 0; i < c.vocab_size; ++i) {
    std::string piece = i == 0    ? "<unk>"
                        : i == 1  ? "<s>"
                        : i == 2  ? "</s>"
                        : i < 259 ? absl::StrFormat("<0x%02X>", i - 3)
                                  : absl::StrCat("t", i);
    put_f32(0.f);
    put_i32(static_cast<int32_t>(piece.size()));
    tok += piece;
  }
  auto t = Tokenizer::FromLlama2c({reinterpret_cast<const uint8_t*>(tok.data()), tok.size()}, c.vocab_size, "random");
  return Model::FromParts(c, std::move(w), *std::move(t), absl::StrFormat("%032x", seed));
}

}  // namespace ape::bench
