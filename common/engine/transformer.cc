#include "common/engine/transformer.h"

#include "common/engine/matvec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace ape {

namespace {
// As GGML computes it (the sum of squares in double, the scale in float),
// so that activations quantized to 8 bits afterwards round like llama.cpp's.
void RmsNorm(float* out, const float* x, const float* w, int n, float eps) {
  double ss = 0;
  for (int i = 0; i < n; ++i) ss += static_cast<double>(x[i] * x[i]);
  const float mean = static_cast<float>(ss / n);
  const float scale = 1.f / std::sqrt(mean + eps);
  for (int i = 0; i < n; ++i) out[i] = (x[i] * scale) * w[i];
}

// x[rows][width] += bias[width].
void AddBias(float* x, int rows, int width, const float* bias) {
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < width; ++i) x[static_cast<size_t>(r) * width + i] += bias[i];
}
}  // namespace

Transformer::Transformer(const Model& model, int max_batch)
    : model_(model), c_(model.config()), max_batch_(std::max(1, max_batch)) {
  const size_t b = max_batch_;
  x_.resize(b * c_.dim);
  xb_.resize(b * std::max(c_.dim, c_.q_dim()));
  xb2_.resize(b * c_.dim);
  q_.resize(b * c_.q_dim());
  att_.resize(b * c_.q_dim());
  hb_.resize(b * c_.hidden_dim);
  hb2_.resize(b * c_.hidden_dim);
  kb_.resize(b * c_.kv_dim());
  vb_.resize(b * c_.kv_dim());
  positions_.resize(b);
  // Pair i of each head rotates by pos * scale * base^(-2i/rope_dim) / factor_i.
  inv_freq_.resize(c_.rope_dim / 2);
  for (int i = 0; i < c_.rope_dim / 2; ++i) {
    inv_freq_[i] = c_.rope_freq_scale / std::pow(c_.rope_base, (2 * i) / static_cast<float>(c_.rope_dim));
    if (!c_.rope_freq_factors.empty()) inv_freq_[i] /= c_.rope_freq_factors[i];
  }
}

void Transformer::Forward(std::span<const int32_t> tokens, std::span<const int32_t> positions, KvCache& cache,
                          const ApeParams& ape, float* logits, bool all_logits) {
  const int n = static_cast<int>(tokens.size());
  for (int start = 0; start < n; start += max_batch_) {
    const int m = std::min(max_batch_, n - start);
    const bool last_block = start + m == n;
    float* block_logits =
        all_logits ? logits + static_cast<size_t>(start) * c_.vocab_size : (last_block ? logits : nullptr);
    ForwardBlock(tokens.data() + start, positions.data() + start, m, cache, ape, block_logits, all_logits);
  }
}

// Rotates pair i of the first rope_dim dims of every head by angle
// pos * inv_freq[i]. The pair is (2i, 2i+1) for interleaved RoPE (llama2.c,
// GGML "normal") and (i, i + rope_dim/2) for NEOX RoPE (HF rotate_half).
void Transformer::Rope(float* x, int n, int n_heads, int row_stride, const int32_t* positions) {
  const int hd = c_.head_dim, half = c_.rope_dim / 2;
  const bool neox = c_.rope_style == RopeStyle::kNeox;
  const int stride = neox ? 1 : 2;      // first dim of pair i is stride * i
  const int partner = neox ? half : 1;  // its second dim is partner further
  for (int t = 0; t < n; ++t) {
    float* row = x + static_cast<size_t>(t) * row_stride;
    for (int i = 0; i < half; ++i) {
      const float angle = positions[t] * inv_freq_[i];
      const float cs = std::cos(angle), sn = std::sin(angle);
      for (int h = 0; h < n_heads; ++h) {
        float* p = row + h * hd + stride * i;
        const float a = p[0], b = p[partner];
        p[0] = a * cs - b * sn;
        p[partner] = a * sn + b * cs;
      }
    }
  }
}

// The attention input of `n` rows (normed, in xb_): Q ([n][n_heads][head_dim])
// into q_, K and V ([n][n_kv_heads][head_dim]) straight into the cache at
// `k` and `v`. Then, as the architecture asks: Q/K/V biases (qwen2), RMSNorm
// of every Q and K head (qwen3), and RoPE of Q and K at `positions`.
void Transformer::QueryKeyValue(const LayerWeights& lw, int n, const int32_t* positions, float* k, float* v) {
  const int qd = c_.q_dim(), kvd = c_.kv_dim();
  MatMul(xb_.data(), n, lw.wq, q_.data(), qd);
  MatMul(xb_.data(), n, lw.wk, k, kvd);
  MatMul(xb_.data(), n, lw.wv, v, kvd);
  if (c_.qkv_bias) {
    AddBias(q_.data(), n, qd, lw.bq.data());
    AddBias(k, n, kvd, lw.bk.data());
    AddBias(v, n, kvd, lw.bv.data());
  }
  if (c_.qk_norm) {
    const int hd = c_.head_dim;
    for (int i = 0; i < n * c_.n_heads; ++i) RmsNorm(&q_[i * hd], &q_[i * hd], lw.q_norm.data(), hd, c_.rms_eps);
    for (int i = 0; i < n * c_.n_kv_heads; ++i) RmsNorm(&k[i * hd], &k[i * hd], lw.k_norm.data(), hd, c_.rms_eps);
  }
  Rope(q_.data(), n, c_.n_heads, qd, positions);
  Rope(k, n, c_.n_kv_heads, kvd, positions);
}

// Feed-forward of the `n` rows of x_: norm, SwiGLU, down projection, residual.
void Transformer::FeedForward(const LayerWeights& lw, int n) {
  const int dim = c_.dim, hid = c_.hidden_dim;
  for (int t = 0; t < n; ++t) RmsNorm(&xb_[t * dim], &x_[t * dim], lw.rms_ffn.data(), dim, c_.rms_eps);
  MatMul(xb_.data(), n, lw.w1, hb_.data(), hid);
  MatMul(xb_.data(), n, lw.w3, hb2_.data(), hid);
  for (size_t i = 0; i < static_cast<size_t>(n) * hid; ++i) {
    const float g = hb_[i];
    hb_[i] = g / (1.f + std::exp(-g)) * hb2_[i];
  }
  MatMul(hb_.data(), n, lw.w2, xb2_.data(), dim);
  for (size_t i = 0; i < static_cast<size_t>(n) * dim; ++i) x_[i] += xb2_[i];
}

void Transformer::ForwardBlock(const int32_t* tokens, const int32_t* positions, int n, KvCache& cache,
                               const ApeParams& ape, float* logits, bool all_logits) {
  const ModelWeights& w = model_.weights();
  const int dim = c_.dim;
  const int first_slot = cache.size;

  // Token embeddings; record each slot's position.
  for (int t = 0; t < n; ++t) {
    w.tok_emb.RowToFloat(tokens[t], &x_[static_cast<size_t>(t) * dim]);
    cache.pos[first_slot + t] = positions[t];
  }

  for (int l = 0; l < c_.n_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    // Attention: norm, Q/K/V (K/V straight into the cache), attend, project.
    for (int t = 0; t < n; ++t) RmsNorm(&xb_[t * dim], &x_[t * dim], lw.rms_att.data(), dim, c_.rms_eps);
    QueryKeyValue(lw, n, positions, cache.key(l, first_slot), cache.value(l, first_slot));
    ApeAttention(q_.data(), n, first_slot, cache, l, c_.n_heads, c_.n_kv_heads, c_.head_dim, ape, att_.data());
    MatMul(att_.data(), n, lw.wo, xb2_.data(), dim);
    for (size_t i = 0; i < static_cast<size_t>(n) * dim; ++i) x_[i] += xb2_[i];

    FeedForward(lw, n);
  }
  cache.size += n;

  if (logits == nullptr) return;
  // Final norm and classifier, for the last row or all rows.
  const int first_row = all_logits ? 0 : n - 1;
  const int rows = n - first_row;
  for (int t = first_row; t < n; ++t)
    RmsNorm(&xb_[(t - first_row) * dim], &x_[t * dim], w.rms_final.data(), dim, c_.rms_eps);
  MatMul(xb_.data(), rows, w.classifier(), logits, c_.vocab_size);
}

// The layout is ForwardBlock's with n = all the streams' tokens, except
// where the streams differ: K/V are computed into kb_/vb_ and then copied
// to each stream's cache at its own slots, attention runs per stream (its
// rows, its cache, its APE block), and the classifier runs on each stream's
// last row.
void Transformer::ForwardBatch(std::span<const StreamTokens> streams, float* logits) {
  const ModelWeights& w = model_.weights();
  const int dim = c_.dim, qd = c_.q_dim(), kvd = c_.kv_dim();
  const size_t kv_bytes = sizeof(float) * kvd;
  int n = 0;
  for (const StreamTokens& s : streams) {
    for (size_t t = 0; t < s.tokens.size(); ++t, ++n) {
      w.tok_emb.RowToFloat(s.tokens[t], &x_[static_cast<size_t>(n) * dim]);
      positions_[n] = s.positions[t];
      s.cache->pos[s.cache->size + t] = s.positions[t];
    }
  }
  for (int l = 0; l < c_.n_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    for (int b = 0; b < n; ++b) RmsNorm(&xb_[b * dim], &x_[b * dim], lw.rms_att.data(), dim, c_.rms_eps);
    QueryKeyValue(lw, n, positions_.data(), kb_.data(), vb_.data());
    int row = 0;
    for (const StreamTokens& s : streams) {
      KvCache& cache = *s.cache;
      const int m = static_cast<int>(s.tokens.size());
      for (int t = 0; t < m; ++t) {
        std::memcpy(cache.key(l, cache.size + t), &kb_[static_cast<size_t>(row + t) * kvd], kv_bytes);
        std::memcpy(cache.value(l, cache.size + t), &vb_[static_cast<size_t>(row + t) * kvd], kv_bytes);
      }
      ApeAttention(&q_[static_cast<size_t>(row) * qd], m, cache.size, cache, l, c_.n_heads, c_.n_kv_heads, c_.head_dim,
                   *s.ape, &att_[static_cast<size_t>(row) * qd]);
      row += m;
    }
    MatMul(att_.data(), n, lw.wo, xb2_.data(), dim);
    for (size_t i = 0; i < static_cast<size_t>(n) * dim; ++i) x_[i] += xb2_[i];
    FeedForward(lw, n);
  }
  int last = -1, b = 0;
  for (const StreamTokens& s : streams) {
    last += static_cast<int>(s.tokens.size());
    s.cache->size += static_cast<int>(s.tokens.size());
    RmsNorm(&xb_[static_cast<size_t>(b++) * dim], &x_[static_cast<size_t>(last) * dim], w.rms_final.data(), dim,
            c_.rms_eps);
  }
  MatMul(xb_.data(), b, w.classifier(), logits, c_.vocab_size);
}

}  // namespace ape
