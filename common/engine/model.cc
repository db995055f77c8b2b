#include "common/engine/model.h"

#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/engine/byte_reader.h"
#include "common/engine/gguf.h"
#include "common/engine/mapped_file.h"
#include "common/engine/quant.h"
#include "common/engine/status_macros.h"
#include "xxhash.h"

namespace ape {

int64_t ModelConfig::num_params() const {
  int64_t per_layer = 2LL * dim + int64_t{q_dim()} * dim * 2 + 2LL * kv_dim() * dim + 3LL * hidden_dim * dim;
  if (qkv_bias) per_layer += q_dim() + 2LL * kv_dim();
  if (qk_norm) per_layer += 2LL * head_dim;
  return int64_t{vocab_size} * dim * (tied_output ? 1 : 2) + n_layers * per_layer + dim;
}

uint64_t ModelWeights::MatrixBytes() const {
  uint64_t n = tok_emb.bytes() + wcls.bytes();
  for (const LayerWeights& l : layers) {
    for (const WeightMatrix* m : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3}) n += m->bytes();
  }
  return n;
}

std::string Model::CanonicalConfig() const {
  const ModelConfig& c = config_;
  std::string s = absl::StrFormat(
      "arch=%s dim=%d hidden=%d layers=%d heads=%d kv_heads=%d head_dim=%d vocab=%d "
      "rope_dim=%d rope_base=%.9g eps=%.9g tied=%d factors=",
      c.architecture, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.rope_dim,
      c.rope_base, c.rms_eps, c.tied_output ? 1 : 0);
  for (float f : c.rope_freq_factors) absl::StrAppendFormat(&s, "%.9g,", f);
  // Added for qwen2/qwen3 and rope scaling; written only when they differ from
  // Llama's defaults, so that existing Llama fingerprints stay the same.
  if (c.rope_style == RopeStyle::kNeox) s += " rope=neox";
  if (c.rope_freq_scale != 1.f) absl::StrAppendFormat(&s, " rope_scale=%.9g", c.rope_freq_scale);
  if (c.qkv_bias) s += " qkv_bias=1";
  if (c.qk_norm) s += " qk_norm=1";
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

namespace {

// Shape limits every format shares; errors name the file.
absl::Status CheckConfig(const ModelConfig& c, const std::string& what) {
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

}  // namespace

class ModelLoader {
 public:
  // `what` names the file in errors; `tokenizer` is a llama2.c tokenizer
  // file's bytes, named `tokenizer_what`.
  // The matrices stay views into `bytes`, which `owner` keeps alive.
  static absl::StatusOr<std::unique_ptr<Model>> Llama2c(std::span<const uint8_t> bytes,
                                                        std::shared_ptr<const void> owner, const std::string& what,
                                                        std::span<const uint8_t> tokenizer,
                                                        const std::string& tokenizer_what);
  static absl::StatusOr<std::unique_ptr<Model>> Gguf(std::span<const uint8_t> bytes, std::shared_ptr<const void> owner,
                                                     const std::string& what);
  static absl::StatusOr<std::unique_ptr<Model>> Parse(std::span<const uint8_t> model_bytes,
                                                      std::shared_ptr<const void> owner, const std::string& what,
                                                      std::span<const uint8_t> tokenizer_bytes,
                                                      const std::string& tokenizer_what);

 private:
  static void Fingerprint(Model& m, const std::vector<std::span<const uint8_t>>& weight_bytes);
};

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
absl::StatusOr<std::unique_ptr<Model>> ModelLoader::Llama2c(std::span<const uint8_t> bytes,
                                                            std::shared_ptr<const void> owner, const std::string& what,
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
  // Vectors are copied; matrices stay float32 views into the file.
  auto take = [&](std::vector<float>& dst, uint64_t n) -> absl::Status {
    std::span<const uint8_t> s;
    RETURN_IF_ERROR(r.ReadSpan(n * 4, &s, "weights"));
    dst.resize(n);
    std::memcpy(dst.data(), s.data(), n * 4);
    return absl::OkStatus();
  };
  auto view = [&](WeightMatrix& dst, uint64_t rows, uint64_t cols) -> absl::Status {
    std::span<const uint8_t> s;
    RETURN_IF_ERROR(r.ReadSpan(rows * cols * 4, &s, "weights"));
    dst = WeightMatrix::View(GgmlType::kF32, s.data(), static_cast<int>(rows), static_cast<int>(cols), owner);
    return absl::OkStatus();
  };
  ModelWeights& w = m->weights_;
  w.layers.resize(L);
  RETURN_IF_ERROR(view(w.tok_emb, V, D));
  // Each per-layer array is stored for all layers at once.
  auto per_layer = [&](std::vector<float> LayerWeights::*field, uint64_t n) -> absl::Status {
    for (auto& layer : w.layers) RETURN_IF_ERROR(take(layer.*field, n));
    return absl::OkStatus();
  };
  auto per_layer_matrix = [&](WeightMatrix LayerWeights::*field, uint64_t rows, uint64_t cols) -> absl::Status {
    for (auto& layer : w.layers) RETURN_IF_ERROR(view(layer.*field, rows, cols));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(per_layer(&LayerWeights::rms_att, D));
  RETURN_IF_ERROR(per_layer_matrix(&LayerWeights::wq, D, D));
  RETURN_IF_ERROR(per_layer_matrix(&LayerWeights::wk, KV, D));
  RETURN_IF_ERROR(per_layer_matrix(&LayerWeights::wv, KV, D));
  RETURN_IF_ERROR(per_layer_matrix(&LayerWeights::wo, D, D));
  RETURN_IF_ERROR(per_layer(&LayerWeights::rms_ffn, D));
  RETURN_IF_ERROR(per_layer_matrix(&LayerWeights::w1, H, D));
  RETURN_IF_ERROR(per_layer_matrix(&LayerWeights::w2, D, H));
  RETURN_IF_ERROR(per_layer_matrix(&LayerWeights::w3, H, D));
  RETURN_IF_ERROR(take(w.rms_final, D));
  std::span<const uint8_t> legacy_freqs;  // freq_cis_real/imag: recomputed, unused
  RETURN_IF_ERROR(r.ReadSpan(uint64_t(c.context_length) * c.head_dim * 4, &legacy_freqs, "freq_cis"));
  if (!c.tied_output) RETURN_IF_ERROR(view(w.wcls, V, D));

  ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::FromLlama2c(tokenizer, c.vocab_size, tokenizer_what));
  m->format_ = "llama2.c";
  m->tokenizer_model_ = "llama2.c";
  m->weight_types_ = "F32";
  Fingerprint(*m, {bytes.subspan(28)});
  return m;
}

// --- GGUF: config from `<arch>.*` metadata, then the tensors ---------------

namespace {

// What an architecture changes in the Llama block (see ModelConfig).
struct ArchTraits {
  const char* name;
  RopeStyle rope_style;
  bool qkv_bias;
  bool qk_norm;
};
constexpr ArchTraits kArchitectures[] = {
    {"llama", RopeStyle::kInterleaved, false, false},  // Llama 1/2/3.x, Mistral 7B, TinyLlama, ...
    {"qwen2", RopeStyle::kNeox, true, false},          // Qwen2, Qwen2.5
    {"qwen3", RopeStyle::kNeox, false, true},          // Qwen3 (dense)
};

// Reads `<arch>.<key>` metadata; errors name the file and the full key.
class Hparams {
 public:
  Hparams(const GgufFile& g, std::string arch) : g_(g), prefix_(std::move(arch) + ".") {}
  bool Has(const std::string& key) const { return g_.Has(prefix_ + key); }
  // A non-negative integer; `def` when absent, or an error if `def` is -1.
  absl::StatusOr<int> Int(const std::string& key, int64_t def = -1) const {
    const std::string k = prefix_ + key;
    if (!g_.Has(k)) {
      if (def < 0) return absl::InvalidArgumentError(absl::StrCat(g_.what(), ": metadata key ", k, " is missing"));
      return static_cast<int>(def);
    }
    ASSIGN_OR_RETURN(int64_t v, g_.GetInt(k));
    if (v < 0 || v > (int64_t{1} << 30))
      return absl::InvalidArgumentError(absl::StrCat(g_.what(), ": ", k, " = ", v, " is out of range"));
    return static_cast<int>(v);
  }
  absl::StatusOr<float> Float(const std::string& key, float def) const {
    if (!g_.Has(prefix_ + key)) return def;
    ASSIGN_OR_RETURN(double v, g_.GetFloat(prefix_ + key));
    return static_cast<float>(v);
  }
  absl::StatusOr<std::string> String(const std::string& key, const std::string& def) const {
    if (!g_.Has(prefix_ + key)) return def;
    return g_.GetString(prefix_ + key);
  }

 private:
  const GgufFile& g_;
  const std::string prefix_;
};

// Rope scaling as llama.cpp reads it: rope.scaling.type (default "linear")
// and rope.scaling.factor (older files: rope.scale_linear) give a position
// scale 1/factor; "none" never scales. Llama 3.1+'s "llama3" scaling is not
// a type here: the converter stores it as the rope_freqs.weight tensor.
absl::Status ReadRopeScaling(const Hparams& h, const std::string& what, ModelConfig* c) {
  ASSIGN_OR_RETURN(std::string type, h.String("rope.scaling.type", "linear"));
  if (type != "none" && type != "linear") {
    return absl::UnimplementedError(absl::StrCat(
        what, ": rope scaling type '", type, "' is not supported (only none, linear, and llama3 frequency factors)"));
  }
  ASSIGN_OR_RETURN(float factor, h.Float("rope.scaling.factor", 0.f));
  if (factor == 0.f) { ASSIGN_OR_RETURN(factor, h.Float("rope.scale_linear", 0.f)); }
  if (!(factor >= 0.f) || !std::isfinite(factor))
    return absl::InvalidArgumentError(absl::StrCat(what, ": invalid rope scaling factor ", factor));
  c->rope_freq_scale = (type == "none" || factor == 0.f) ? 1.f : 1.f / factor;
  ASSIGN_OR_RETURN(float attn_factor, h.Float("rope.scaling.attn_factor", 1.f));
  if (attn_factor != 1.f) {
    return absl::UnimplementedError(
        absl::StrCat(what, ": rope.scaling.attn_factor ", attn_factor, " is not supported (only 1)"));
  }
  return absl::OkStatus();
}

// Hyperparameters from metadata; the vocabulary size and the tied output
// come from the tensors (LoadGgufModelParts).
absl::StatusOr<ModelConfig> ReadGgufConfig(const GgufFile& g) {
  const std::string& what = g.what();
  ASSIGN_OR_RETURN(std::string arch, g.GetString("general.architecture"));
  const ArchTraits* traits = nullptr;
  for (const ArchTraits& a : kArchitectures)
    if (arch == a.name) traits = &a;
  if (traits == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat(what, ": architecture '", arch, "' is not supported (llama, qwen2, qwen3)"));
  }
  const Hparams h(g, arch);
  ModelConfig c;
  c.architecture = arch;
  c.rope_style = traits->rope_style;
  c.qkv_bias = traits->qkv_bias;
  c.qk_norm = traits->qk_norm;
  ASSIGN_OR_RETURN(c.dim, h.Int("embedding_length"));
  ASSIGN_OR_RETURN(c.hidden_dim, h.Int("feed_forward_length"));
  ASSIGN_OR_RETURN(c.n_layers, h.Int("block_count"));
  ASSIGN_OR_RETURN(c.n_heads, h.Int("attention.head_count"));
  ASSIGN_OR_RETURN(c.n_kv_heads, h.Int("attention.head_count_kv", c.n_heads));
  ASSIGN_OR_RETURN(c.context_length, h.Int("context_length", 2048));
  ASSIGN_OR_RETURN(c.head_dim, h.Int("attention.key_length", c.n_heads ? c.dim / c.n_heads : 0));
  ASSIGN_OR_RETURN(int value_dim, h.Int("attention.value_length", c.head_dim));
  ASSIGN_OR_RETURN(c.rope_dim, h.Int("rope.dimension_count", c.head_dim));
  ASSIGN_OR_RETURN(c.rope_base, h.Float("rope.freq_base", 10000.f));
  ASSIGN_OR_RETURN(c.rms_eps, h.Float("attention.layer_norm_rms_epsilon", 1e-5f));
  ASSIGN_OR_RETURN(int experts, h.Int("expert_count", 0));
  if (experts > 0) {
    return absl::UnimplementedError(
        absl::StrCat(what, ": mixture of experts (", arch, ".expert_count = ", experts, ") is not supported"));
  }
  if (value_dim != c.head_dim) {
    return absl::UnimplementedError(
        absl::StrCat(what, ": value head size ", value_dim, " differs from key head size ", c.head_dim));
  }
  RETURN_IF_ERROR(ReadRopeScaling(h, what, &c));
  return c;
}

// Reads tensors by name, checking each shape against the config: vectors
// into float32, matrices as views in their stored type. Remembers which it
// read, their types and their raw bytes.
class TensorReader {
 public:
  TensorReader(const GgufFile& g, std::shared_ptr<const void> owner) : g_(g), owner_(std::move(owner)) {}

  bool Has(const std::string& name) const { return g_.FindTensor(name).ok(); }
  // `dst` = vector tensor `name` of `n` elements, as float32.
  absl::Status Load(const std::string& name, uint64_t rows, uint64_t n, std::vector<float>& dst) {
    ASSIGN_OR_RETURN(const GgufTensor* t, Find(name, 1, n));
    dst.resize(t->num_elements);
    return DequantizeTensor(*t, dst.data());
  }
  // `dst` = matrix tensor `name` of [rows][cols], kept in its stored type.
  absl::Status Load(const std::string& name, uint64_t rows, uint64_t cols, WeightMatrix& dst) {
    ASSIGN_OR_RETURN(const GgufTensor* t, Find(name, rows, cols));
    dst = WeightMatrix::View(static_cast<GgmlType>(t->type), t->data.data(), static_cast<int>(rows),
                             static_cast<int>(cols), owner_);
    return absl::OkStatus();
  }
  void MarkUsed(const std::string& name) { used_.insert(name); }

 private:
  // Tensor `name` with shape [rows][cols] (a vector when rows is 1) and a
  // type the kernels compute on.
  absl::StatusOr<const GgufTensor*> Find(const std::string& name, uint64_t rows, uint64_t cols) {
    ASSIGN_OR_RETURN(const GgufTensor* t, g_.FindTensor(name));
    bool shape_ok = cols == t->dims[0] && (rows == 1 ? t->dims.size() == 1 : t->dims.size() == 2 && t->dims[1] == rows);
    if (!shape_ok) {
      return absl::InvalidArgumentError(absl::StrCat(g_.what(), ": tensor ", name, " has shape [",
                                                     absl::StrJoin(t->dims, "x"), "], expected [", cols,
                                                     rows == 1 ? "" : absl::StrCat("x", rows), "]"));
    }
    // Types without kernels are refused before anything is sized from the
    // tensor (unknown types have no data: GgufFile::Parse).
    if (t->data.empty() || !IsWeightType(static_cast<GgmlType>(t->type))) {
      return absl::UnimplementedError(absl::StrCat(g_.what(), ": tensor ", name, " has type ", GgmlTypeName(t->type),
                                                   " (", t->type, "); supported: ", kSupportedTypes));
    }
    bytes_.push_back(t->data);
    ++type_counts_[GgmlTypeName(t->type)];
    used_.insert(name);
    return t;
  }

 public:
  // Like llama.cpp, a file with tensors the graph does not read is refused:
  // they belong to a feature (MoE, an extra bias, ...) we would drop.
  absl::Status CheckAllUsed(const std::string& arch) const {
    for (const GgufTensor& t : g_.tensors()) {
      if (!used_.count(t.name)) {
        return absl::UnimplementedError(
            absl::StrCat(g_.what(), ": tensor ", t.name, " is not used by this engine's ", arch, " graph"));
      }
    }
    return absl::OkStatus();
  }
  std::string TypeSummary() const {
    std::vector<std::string> types;
    for (auto& [name, count] : type_counts_) types.push_back(absl::StrCat(name, " x", count));
    return absl::StrJoin(types, ", ");
  }
  std::vector<std::span<const uint8_t>>& bytes() { return bytes_; }

 private:
  static constexpr const char* kSupportedTypes = "F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K";
  const GgufFile& g_;
  std::shared_ptr<const void> owner_;
  std::vector<std::span<const uint8_t>> bytes_;
  std::map<std::string, int> type_counts_;
  std::set<std::string> used_;
};

// One block's tensors (GGUF names blk.N.*), in the order the fingerprint
// hashes them: Llama's order, the optional parts after their matrix.
absl::Status LoadLayer(TensorReader& r, const ModelConfig& c, int l, LayerWeights& lw) {
  const uint64_t D = c.dim, H = c.hidden_dim, Q = c.q_dim(), KV = c.kv_dim(), HD = c.head_dim;
  const std::string p = absl::StrCat("blk.", l, ".");
  RETURN_IF_ERROR(r.Load(p + "attn_norm.weight", 1, D, lw.rms_att));
  RETURN_IF_ERROR(r.Load(p + "attn_q.weight", Q, D, lw.wq));
  if (c.qkv_bias) RETURN_IF_ERROR(r.Load(p + "attn_q.bias", 1, Q, lw.bq));
  RETURN_IF_ERROR(r.Load(p + "attn_k.weight", KV, D, lw.wk));
  if (c.qkv_bias) RETURN_IF_ERROR(r.Load(p + "attn_k.bias", 1, KV, lw.bk));
  RETURN_IF_ERROR(r.Load(p + "attn_v.weight", KV, D, lw.wv));
  if (c.qkv_bias) RETURN_IF_ERROR(r.Load(p + "attn_v.bias", 1, KV, lw.bv));
  if (c.qk_norm) {
    RETURN_IF_ERROR(r.Load(p + "attn_q_norm.weight", 1, HD, lw.q_norm));
    RETURN_IF_ERROR(r.Load(p + "attn_k_norm.weight", 1, HD, lw.k_norm));
  }
  RETURN_IF_ERROR(r.Load(p + "attn_output.weight", D, Q, lw.wo));
  RETURN_IF_ERROR(r.Load(p + "ffn_norm.weight", 1, D, lw.rms_ffn));
  RETURN_IF_ERROR(r.Load(p + "ffn_gate.weight", H, D, lw.w1));
  RETURN_IF_ERROR(r.Load(p + "ffn_down.weight", D, H, lw.w2));
  RETURN_IF_ERROR(r.Load(p + "ffn_up.weight", H, D, lw.w3));
  return absl::OkStatus();
}

// Llama 3.1+ frequency factors ([rope_dim/2] F32), checked before sizing
// anything from the file's dimensions.
absl::Status LoadRopeFreqs(const GgufFile& g, TensorReader& r, ModelConfig& c) {
  auto f = g.FindTensor("rope_freqs.weight");
  if (!f.ok()) return absl::OkStatus();
  if ((*f)->type != static_cast<uint32_t>(GgmlType::kF32) || (*f)->data.empty() ||
      (*f)->num_elements > static_cast<uint64_t>(kMaxHeadDim)) {
    return absl::InvalidArgumentError(
        absl::StrCat(g.what(), ": rope_freqs.weight must be F32 with at most ", kMaxHeadDim, " elements"));
  }
  c.rope_freq_factors.resize((*f)->num_elements);
  r.MarkUsed("rope_freqs.weight");
  return DequantizeTensor(**f, c.rope_freq_factors.data());
}

}  // namespace

absl::StatusOr<GgufModelParts> LoadGgufModelParts(const GgufFile& g, std::shared_ptr<const void> owner) {
  const std::string& what = g.what();
  GgufModelParts parts;
  ModelConfig& c = parts.config;
  ASSIGN_OR_RETURN(c, ReadGgufConfig(g));
  // The vocabulary size is token_embd's row count (as llama.cpp's n_vocab).
  ASSIGN_OR_RETURN(const GgufTensor* emb, g.FindTensor("token_embd.weight"));
  if (emb->dims.size() != 2)
    return absl::InvalidArgumentError(absl::StrCat(what, ": token_embd.weight is not a matrix"));
  c.vocab_size = static_cast<int>(std::min<uint64_t>(emb->dims[1], 1 << 23));
  const Hparams h(g, c.architecture);
  if (h.Has("vocab_size")) {
    ASSIGN_OR_RETURN(int v, h.Int("vocab_size"));
    if (v != c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": ", c.architecture, ".vocab_size = ", v,
                                                     " but token_embd.weight has ", c.vocab_size, " rows"));
    }
  }
  c.tied_output = !g.FindTensor("output.weight").ok();  // absent: llama.cpp reuses token_embd
  TensorReader r(g, std::move(owner));
  RETURN_IF_ERROR(LoadRopeFreqs(g, r, c));
  RETURN_IF_ERROR(CheckConfig(c, what));

  ModelWeights& w = parts.weights;
  RETURN_IF_ERROR(r.Load("token_embd.weight", c.vocab_size, c.dim, w.tok_emb));
  w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) RETURN_IF_ERROR(LoadLayer(r, c, l, w.layers[l]));
  RETURN_IF_ERROR(r.Load("output_norm.weight", 1, c.dim, w.rms_final));
  if (!c.tied_output) RETURN_IF_ERROR(r.Load("output.weight", c.vocab_size, c.dim, w.wcls));
  RETURN_IF_ERROR(r.CheckAllUsed(c.architecture));
  parts.weight_types = r.TypeSummary();
  parts.weight_bytes = std::move(r.bytes());
  return parts;
}

absl::StatusOr<std::unique_ptr<Model>> ModelLoader::Gguf(std::span<const uint8_t> bytes,
                                                         std::shared_ptr<const void> owner, const std::string& what) {
  ASSIGN_OR_RETURN(GgufFile g, GgufFile::Parse(bytes, what));
  ASSIGN_OR_RETURN(GgufModelParts parts, LoadGgufModelParts(g, std::move(owner)));
  std::unique_ptr<Model> m(new Model());
  m->config_ = std::move(parts.config);
  m->weights_ = std::move(parts.weights);
  m->weight_types_ = std::move(parts.weight_types);
  // The vocabulary: SentencePiece ("llama") or byte-level BPE ("gpt2").
  ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::FromGguf(g));
  if (m->tokenizer_.vocab_size() != m->config_.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": tokenizer has ", m->tokenizer_.vocab_size(),
                                                   " tokens but token_embd has ", m->config_.vocab_size, " rows"));
  }
  auto get_string = [&](const std::string& key) -> absl::StatusOr<std::string> {
    return g.Has(key) ? g.GetString(key) : absl::StatusOr<std::string>("");
  };
  ASSIGN_OR_RETURN(m->tokenizer_model_, get_string("tokenizer.ggml.model"));
  ASSIGN_OR_RETURN(m->tokenizer_pre_, get_string("tokenizer.ggml.pre"));
  ASSIGN_OR_RETURN(m->chat_template_, get_string("tokenizer.chat_template"));
  m->format_ = absl::StrCat("gguf v", g.version());
  Fingerprint(*m, parts.weight_bytes);
  return m;
}

bool IsGguf(std::span<const uint8_t> bytes) { return bytes.size() >= 4 && std::memcmp(bytes.data(), "GGUF", 4) == 0; }

absl::StatusOr<std::unique_ptr<Model>> ModelLoader::Parse(std::span<const uint8_t> model_bytes,
                                                          std::shared_ptr<const void> owner, const std::string& what,
                                                          std::span<const uint8_t> tokenizer_bytes,
                                                          const std::string& tokenizer_what) {
  absl::StatusOr<std::unique_ptr<Model>> m =
      IsGguf(model_bytes) ? Gguf(model_bytes, std::move(owner), what)
                          : Llama2c(model_bytes, std::move(owner), what, tokenizer_bytes, tokenizer_what);
  // Loading parsed the whole GGUF directory (a 151K-token vocabulary is
  // ~300K metadata values, ~60 MB of heap) and freed it again. glibc keeps
  // freed heap pages below its trim threshold, which an earlier free of a
  // large block can raise to 64 MB: without this, they stay resident for the
  // server's life.
  malloc_trim(0);
  if (!m.ok()) return m.status();
  (*m)->path_ = what;
  (*m)->file_bytes_ = model_bytes.size();
  return m;
}

absl::StatusOr<std::unique_ptr<Model>> Model::Parse(std::span<const uint8_t> model_bytes, const std::string& what,
                                                    std::span<const uint8_t> tokenizer_bytes,
                                                    const std::string& tokenizer_what) {
  // One copy the matrices can point into (64-byte aligned, like a mapping).
  struct alignas(64) Line {
    uint8_t b[64];
  };
  auto copy = std::make_shared<std::vector<Line>>((model_bytes.size() + 63) / 64);
  if (!model_bytes.empty()) std::memcpy(copy->data(), model_bytes.data(), model_bytes.size());
  const std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(copy->data()), model_bytes.size());
  return ModelLoader::Parse(bytes, std::move(copy), what, tokenizer_bytes, tokenizer_what);
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& model_path, const std::string& tokenizer_path) {
  ASSIGN_OR_RETURN(std::shared_ptr<MappedFile> file, MappedFile::Open(model_path));
  const std::span<const uint8_t> bytes = file->bytes();
  if (IsGguf(bytes)) return ModelLoader::Parse(bytes, std::move(file), model_path, {}, "");
  if (tokenizer_path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(model_path, ": a llama2.c checkpoint needs a tokenizer file (--tokenizer)"));
  }
  ASSIGN_OR_RETURN(auto tok_file, MappedFile::Open(tokenizer_path));
  return ModelLoader::Parse(bytes, std::move(file), model_path, tok_file->bytes(), tokenizer_path);
}

}  // namespace ape
