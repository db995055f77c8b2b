#include "common/engine/model.h"

#include <chrono>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/engine/byte_reader.h"
#include "common/engine/gguf.h"
#include "common/engine/mapped_file.h"
#include "common/engine/status_macros.h"
#include "xxhash.h"

namespace ape {

int64_t ModelConfig::num_params() const {
  int64_t per_layer = 2LL * dim + int64_t{q_dim()} * dim * 2 + 2LL * kv_dim() * dim + 3LL * hidden_dim * dim;
  return int64_t{vocab_size} * dim * (tied_output ? 1 : 2) + n_layers * per_layer + dim;
}

std::string Model::CanonicalConfig() const {
  const ModelConfig& c = config_;
  std::string s = absl::StrFormat(
      "arch=%s dim=%d hidden=%d layers=%d heads=%d kv_heads=%d head_dim=%d vocab=%d "
      "rope_dim=%d rope_base=%.9g eps=%.9g tied=%d factors=",
      c.architecture, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.rope_dim,
      c.rope_base, c.rms_eps, c.tied_output ? 1 : 0);
  for (float f : c.rope_freq_factors) absl::StrAppendFormat(&s, "%.9g,", f);
  return s;
}

std::unique_ptr<Model> Model::FromParts(ModelConfig config, ModelWeights weights, Tokenizer tokenizer,
                                        std::string fingerprint) {
  std::unique_ptr<Model> m(new Model());
  m->config_ = std::move(config);
  m->weights_ = std::move(weights);
  m->tokenizer_ = std::move(tokenizer);
  m->fingerprint_ = std::move(fingerprint);
  m->format_ = "memory";
  return m;
}

class ModelLoader {
 public:
  // `what` names the file in errors; `tokenizer` is a llama2.c tokenizer
  // file's bytes, named `tokenizer_what`.
  static absl::StatusOr<std::unique_ptr<Model>> Llama2c(std::span<const uint8_t> bytes, const std::string& what,
                                                        std::span<const uint8_t> tokenizer,
                                                        const std::string& tokenizer_what);
  static absl::StatusOr<std::unique_ptr<Model>> Gguf(std::span<const uint8_t> bytes, const std::string& what);

 private:
  static absl::Status CheckConfig(const ModelConfig& c, const std::string& what);
  static void Fingerprint(Model& m, const std::vector<std::span<const uint8_t>>& weight_bytes);
};

absl::Status ModelLoader::CheckConfig(const ModelConfig& c, const std::string& what) {
  auto bad = [&](const std::string& m) { return absl::InvalidArgumentError(absl::StrCat(what, ": ", m)); };
  if (c.dim <= 0 || c.dim > (1 << 16)) return bad(absl::StrCat("invalid dim ", c.dim));
  if (c.hidden_dim <= 0 || c.hidden_dim > (1 << 18)) return bad(absl::StrCat("invalid hidden_dim ", c.hidden_dim));
  if (c.n_layers <= 0 || c.n_layers > 1024) return bad(absl::StrCat("invalid layer count ", c.n_layers));
  if (c.n_heads <= 0 || c.n_heads > 1024) return bad(absl::StrCat("invalid head count ", c.n_heads));
  if (c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads != 0) {
    return bad(absl::StrCat("KV head count ", c.n_kv_heads, " does not divide head count ", c.n_heads));
  }
  if (c.head_dim <= 0 || c.head_dim % 2 != 0 || c.head_dim > 1024)
    return bad(absl::StrCat("invalid head_dim ", c.head_dim));
  if (c.head_dim > kMaxHeadDim) {
    return absl::UnimplementedError(
        absl::StrCat(what, ": head_dim ", c.head_dim, " is above the ", kMaxHeadDim, " this engine supports"));
  }
  if (c.rope_dim <= 0 || c.rope_dim > c.head_dim || c.rope_dim % 2 != 0)
    return bad(absl::StrCat("invalid rope dimension ", c.rope_dim));
  if (c.vocab_size <= 3 || c.vocab_size > (1 << 22)) return bad(absl::StrCat("invalid vocab size ", c.vocab_size));
  if (!(c.rms_eps > 0) || !(c.rope_base > 0)) return bad("RMS epsilon and rope base must be positive");
  if (!c.rope_freq_factors.empty() && c.rope_freq_factors.size() != static_cast<size_t>(c.rope_dim / 2)) {
    return bad(absl::StrCat("rope_freqs has ", c.rope_freq_factors.size(), " entries, expected ", c.rope_dim / 2));
  }
  return absl::OkStatus();
}

void ModelLoader::Fingerprint(Model& m, const std::vector<std::span<const uint8_t>>& weight_bytes) {
  auto t0 = std::chrono::steady_clock::now();
  XXH3_state_t* st = XXH3_createState();
  XXH3_128bits_reset(st);
  std::string head = absl::StrCat("apeserve-model-fingerprint-v1\n", m.CanonicalConfig(), "\n");
  XXH3_128bits_update(st, head.data(), head.size());
  std::string tok = m.tokenizer_.CanonicalBytes();
  XXH3_128bits_update(st, tok.data(), tok.size());
  for (auto b : weight_bytes) XXH3_128bits_update(st, b.data(), b.size());
  XXH128_hash_t h = XXH3_128bits_digest(st);
  XXH3_freeState(st);
  m.fingerprint_ = absl::StrFormat("%016x%016x", h.high64, h.low64);
  m.fingerprint_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// llama2.c checkpoint: 7 x int32 header (dim, hidden_dim, n_layers, n_heads,
// n_kv_heads, vocab_size, seq_len; negative vocab_size = untied classifier),
// then float32 arrays in llama2.c's order (see TransformerWeights in run.c).
absl::StatusOr<std::unique_ptr<Model>> ModelLoader::Llama2c(std::span<const uint8_t> bytes, const std::string& what,
                                                            std::span<const uint8_t> tokenizer,
                                                            const std::string& tokenizer_what) {
  ByteReader r(bytes, what);
  int32_t h[7];
  for (auto& x : h) RETURN_IF_ERROR(r.Read(&x, "llama2.c header"));
  std::unique_ptr<Model> m(new Model());
  ModelConfig& c = m->config_;
  c.dim = h[0];
  c.hidden_dim = h[1];
  c.n_layers = h[2];
  c.n_heads = h[3];
  c.n_kv_heads = h[4];
  c.tied_output = h[5] > 0;
  c.vocab_size = h[5] > 0 ? h[5] : -static_cast<int64_t>(h[5]) > (1 << 22) ? 0 : -h[5];
  c.context_length = h[6];
  c.head_dim = c.n_heads > 0 ? c.dim / c.n_heads : 0;
  c.rope_dim = c.head_dim;
  if (c.n_heads > 0 && c.dim % c.n_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": dim ", c.dim, " is not a multiple of n_heads ", c.n_heads));
  }
  if (c.context_length <= 0 || c.context_length > (1 << 24)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": invalid seq_len ", c.context_length));
  }
  RETURN_IF_ERROR(CheckConfig(c, what));

  const uint64_t D = c.dim, H = c.hidden_dim, L = c.n_layers, V = c.vocab_size, KV = c.kv_dim();
  const uint64_t floats = V * D + L * D + L * D * D + 2 * L * D * KV + L * D * D + L * D + 3 * L * D * H + D +
                          uint64_t(c.context_length) * c.head_dim + (c.tied_output ? 0 : V * D);
  const uint64_t expected = 28 + floats * 4;
  if (bytes.size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": llama2.c file is ", bytes.size(), " bytes but its header (dim ", c.dim, ", layers ", c.n_layers,
        ", vocab ", c.vocab_size, ") implies ", expected, bytes.size() < expected ? "; the file is truncated" : ""));
  }
  auto take = [&](std::vector<float>& dst, uint64_t n) -> absl::Status {
    std::span<const uint8_t> s;
    RETURN_IF_ERROR(r.ReadSpan(n * 4, &s, "weights"));
    dst.resize(n);
    std::memcpy(dst.data(), s.data(), n * 4);
    return absl::OkStatus();
  };
  ModelWeights& w = m->weights_;
  w.layers.resize(L);
  RETURN_IF_ERROR(take(w.tok_emb, V * D));
  // Each per-layer array is stored for all layers at once.
  auto per_layer = [&](std::vector<float> LayerWeights::*field, uint64_t n) -> absl::Status {
    for (auto& layer : w.layers) RETURN_IF_ERROR(take(layer.*field, n));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(per_layer(&LayerWeights::rms_att, D));
  RETURN_IF_ERROR(per_layer(&LayerWeights::wq, D * D));
  RETURN_IF_ERROR(per_layer(&LayerWeights::wk, KV * D));
  RETURN_IF_ERROR(per_layer(&LayerWeights::wv, KV * D));
  RETURN_IF_ERROR(per_layer(&LayerWeights::wo, D * D));
  RETURN_IF_ERROR(per_layer(&LayerWeights::rms_ffn, D));
  RETURN_IF_ERROR(per_layer(&LayerWeights::w1, H * D));
  RETURN_IF_ERROR(per_layer(&LayerWeights::w2, D * H));
  RETURN_IF_ERROR(per_layer(&LayerWeights::w3, H * D));
  RETURN_IF_ERROR(take(w.rms_final, D));
  std::span<const uint8_t> legacy_freqs;  // freq_cis_real/imag: recomputed, unused
  RETURN_IF_ERROR(r.ReadSpan(uint64_t(c.context_length) * c.head_dim * 4, &legacy_freqs, "freq_cis"));
  if (!c.tied_output) RETURN_IF_ERROR(take(w.wcls, V * D));

  ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::FromLlama2c(tokenizer, c.vocab_size, tokenizer_what));
  m->format_ = "llama2.c";
  m->weight_types_ = "F32";
  Fingerprint(*m, {bytes.subspan(28)});
  return m;
}

absl::StatusOr<std::unique_ptr<Model>> ModelLoader::Gguf(std::span<const uint8_t> bytes, const std::string& what) {
  ASSIGN_OR_RETURN(GgufFile g, GgufFile::Parse(bytes, what));
  ASSIGN_OR_RETURN(std::string arch, g.GetString("general.architecture"));
  if (arch != "llama") {
    return absl::UnimplementedError(absl::StrCat(what, ": architecture '", arch, "' is not supported (only 'llama')"));
  }
  std::unique_ptr<Model> m(new Model());
  ModelConfig& c = m->config_;
  auto get_int = [&](const std::string& key, int64_t def, bool required) -> absl::StatusOr<int> {
    if (!g.Has(key)) {
      if (required) return absl::InvalidArgumentError(absl::StrCat(what, ": metadata key ", key, " is missing"));
      return static_cast<int>(def);
    }
    ASSIGN_OR_RETURN(int64_t v, g.GetInt(key));
    if (v < 0 || v > (int64_t{1} << 30))
      return absl::InvalidArgumentError(absl::StrCat(what, ": ", key, " = ", v, " is out of range"));
    return static_cast<int>(v);
  };
  ASSIGN_OR_RETURN(c.dim, get_int("llama.embedding_length", 0, true));
  ASSIGN_OR_RETURN(c.hidden_dim, get_int("llama.feed_forward_length", 0, true));
  ASSIGN_OR_RETURN(c.n_layers, get_int("llama.block_count", 0, true));
  ASSIGN_OR_RETURN(c.n_heads, get_int("llama.attention.head_count", 0, true));
  ASSIGN_OR_RETURN(c.n_kv_heads, get_int("llama.attention.head_count_kv", c.n_heads, false));
  ASSIGN_OR_RETURN(c.context_length, get_int("llama.context_length", 2048, false));
  ASSIGN_OR_RETURN(c.head_dim, get_int("llama.attention.key_length", c.n_heads ? c.dim / c.n_heads : 0, false));
  ASSIGN_OR_RETURN(c.rope_dim, get_int("llama.rope.dimension_count", c.head_dim, false));
  if (g.Has("llama.rope.freq_base")) {
    ASSIGN_OR_RETURN(double b, g.GetFloat("llama.rope.freq_base"));
    c.rope_base = static_cast<float>(b);
  }
  if (g.Has("llama.attention.layer_norm_rms_epsilon")) {
    ASSIGN_OR_RETURN(double e, g.GetFloat("llama.attention.layer_norm_rms_epsilon"));
    c.rms_eps = static_cast<float>(e);
  }
  ASSIGN_OR_RETURN(const GgufTensor* emb, g.FindTensor("token_embd.weight"));
  if (emb->dims.size() != 2)
    return absl::InvalidArgumentError(absl::StrCat(what, ": token_embd.weight is not a matrix"));
  c.vocab_size = static_cast<int>(std::min<uint64_t>(emb->dims[1], 1 << 23));
  c.tied_output = !g.FindTensor("output.weight").ok();
  if (auto f = g.FindTensor("rope_freqs.weight"); f.ok()) {
    // Checked before sizing anything from the file's dimensions.
    if ((*f)->type != static_cast<uint32_t>(GgmlType::kF32) || (*f)->data.empty() ||
        (*f)->num_elements > static_cast<uint64_t>(kMaxHeadDim)) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": rope_freqs.weight must be F32 with at most ", kMaxHeadDim, " elements"));
    }
    c.rope_freq_factors.resize((*f)->num_elements);
    RETURN_IF_ERROR(DequantizeTensor(**f, c.rope_freq_factors.data()));
  }
  RETURN_IF_ERROR(CheckConfig(c, what));

  std::vector<std::span<const uint8_t>> hashed;
  std::map<std::string, int> type_counts;
  auto load = [&](const std::string& name, uint64_t rows, uint64_t cols, std::vector<float>& dst) -> absl::Status {
    ASSIGN_OR_RETURN(const GgufTensor* t, g.FindTensor(name));
    bool shape_ok = cols == t->dims[0] && (rows == 1 ? t->dims.size() == 1 : t->dims.size() == 2 && t->dims[1] == rows);
    if (!shape_ok) {
      std::string dims = absl::StrJoin(t->dims, "x");
      return absl::InvalidArgumentError(absl::StrCat(what, ": tensor ", name, " has shape [", dims, "], expected [",
                                                     cols, rows == 1 ? "" : absl::StrCat("x", rows), "]"));
    }
    // An unsupported type has no data (GgufFile::Parse): refuse it before
    // allocating for its dimensions.
    if (t->data.empty()) {
      return absl::UnimplementedError(absl::StrCat(what, ": tensor ", name, " has type ", GgmlTypeName(t->type), " (",
                                                   t->type, "); supported: F32, F16, BF16, Q8_0"));
    }
    dst.resize(t->num_elements);
    RETURN_IF_ERROR(DequantizeTensor(*t, dst.data()));
    hashed.push_back(t->data);
    ++type_counts[GgmlTypeName(t->type)];
    return absl::OkStatus();
  };
  const uint64_t D = c.dim, H = c.hidden_dim, Q = c.q_dim(), KV = c.kv_dim();
  ModelWeights& w = m->weights_;
  RETURN_IF_ERROR(load("token_embd.weight", c.vocab_size, D, w.tok_emb));
  w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    LayerWeights& lw = w.layers[l];
    std::string p = absl::StrCat("blk.", l, ".");
    RETURN_IF_ERROR(load(p + "attn_norm.weight", 1, D, lw.rms_att));
    RETURN_IF_ERROR(load(p + "attn_q.weight", Q, D, lw.wq));
    RETURN_IF_ERROR(load(p + "attn_k.weight", KV, D, lw.wk));
    RETURN_IF_ERROR(load(p + "attn_v.weight", KV, D, lw.wv));
    RETURN_IF_ERROR(load(p + "attn_output.weight", D, Q, lw.wo));
    RETURN_IF_ERROR(load(p + "ffn_norm.weight", 1, D, lw.rms_ffn));
    RETURN_IF_ERROR(load(p + "ffn_gate.weight", H, D, lw.w1));
    RETURN_IF_ERROR(load(p + "ffn_down.weight", D, H, lw.w2));
    RETURN_IF_ERROR(load(p + "ffn_up.weight", H, D, lw.w3));
  }
  RETURN_IF_ERROR(load("output_norm.weight", 1, D, w.rms_final));
  if (!c.tied_output) RETURN_IF_ERROR(load("output.weight", c.vocab_size, D, w.wcls));

  ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::FromGguf(g));
  if (m->tokenizer_.vocab_size() != c.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": tokenizer has ", m->tokenizer_.vocab_size(),
                                                   " tokens but token_embd has ", c.vocab_size, " rows"));
  }
  m->format_ = absl::StrCat("gguf v", g.version());
  std::vector<std::string> types;
  for (auto& [name, count] : type_counts) types.push_back(absl::StrCat(name, " x", count));
  m->weight_types_ = absl::StrJoin(types, ", ");
  Fingerprint(*m, hashed);
  return m;
}

bool IsGguf(std::span<const uint8_t> bytes) { return bytes.size() >= 4 && std::memcmp(bytes.data(), "GGUF", 4) == 0; }

absl::StatusOr<std::unique_ptr<Model>> Model::Parse(std::span<const uint8_t> model_bytes, const std::string& what,
                                                    std::span<const uint8_t> tokenizer_bytes,
                                                    const std::string& tokenizer_what) {
  absl::StatusOr<std::unique_ptr<Model>> m =
      IsGguf(model_bytes) ? ModelLoader::Gguf(model_bytes, what)
                          : ModelLoader::Llama2c(model_bytes, what, tokenizer_bytes, tokenizer_what);
  if (!m.ok()) return m.status();
  (*m)->path_ = what;
  (*m)->file_bytes_ = model_bytes.size();
  return m;
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& model_path, const std::string& tokenizer_path) {
  ASSIGN_OR_RETURN(auto file, MappedFile::Open(model_path));
  if (IsGguf(file->bytes())) return Parse(file->bytes(), model_path);
  if (tokenizer_path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(model_path, ": a llama2.c checkpoint needs a tokenizer file (--tokenizer)"));
  }
  ASSIGN_OR_RETURN(auto tok_file, MappedFile::Open(tokenizer_path));
  return Parse(file->bytes(), model_path, tok_file->bytes(), tokenizer_path);
}

}  // namespace ape
