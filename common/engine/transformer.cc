#include "common/engine/transformer.h"

#include "common/engine/matvec.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace ape {

namespace {
void RmsNorm(float* out, const float* x, const float* w, int n, float eps) {
  float ss = 0.f;
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  const float scale = 1.f / std::sqrt(ss / n + eps);
  for (int i = 0; i < n; ++i) out[i] = w[i] * (scale * x[i]);
}
}  // namespace

void MatMul(const float* x, int n, int in, const float* w, int out, float* y, int ldy) {
  if (n == 1) {
    MatVec(w, x, y, out, in);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.f, x, in, w, in, 0.f, y, ldy);
  }
}

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
  // Pair i of each head rotates by pos * base^(-2i/rope_dim) (/ factor_i).
  inv_freq_.resize(c_.rope_dim / 2);
  for (int i = 0; i < c_.rope_dim / 2; ++i) {
    inv_freq_[i] = 1.0f / std::pow(c_.rope_base, (2 * i) / static_cast<float>(c_.rope_dim));
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

// Rotates consecutive pairs (2i, 2i+1) of the first rope_dim dims of every
// head (llama2.c / GGML "normal" RoPE) by angle pos * inv_freq[i].
void Transformer::Rope(float* x, int n, int n_heads, int row_stride, const int32_t* positions) {
  const int hd = c_.head_dim;
  for (int t = 0; t < n; ++t) {
    float* row = x + static_cast<size_t>(t) * row_stride;
    for (int i = 0; i < c_.rope_dim / 2; ++i) {
      const float angle = positions[t] * inv_freq_[i];
      const float cs = std::cos(angle), sn = std::sin(angle);
      for (int h = 0; h < n_heads; ++h) {
        float* p = row + h * hd + 2 * i;
        const float a = p[0], b = p[1];
        p[0] = a * cs - b * sn;
        p[1] = a * sn + b * cs;
      }
    }
  }
}

void Transformer::ForwardBlock(const int32_t* tokens, const int32_t* positions, int n, KvCache& cache,
                               const ApeParams& ape, float* logits, bool all_logits) {
  const ModelWeights& w = model_.weights();
  const int dim = c_.dim, qd = c_.q_dim(), kvd = c_.kv_dim(), hid = c_.hidden_dim;
  const int first_slot = cache.size;

  // Token embeddings; record each slot's position.
  for (int t = 0; t < n; ++t) {
    std::memcpy(&x_[static_cast<size_t>(t) * dim], &w.tok_emb[static_cast<size_t>(tokens[t]) * dim],
                dim * sizeof(float));
    cache.pos[first_slot + t] = positions[t];
  }

  for (int l = 0; l < c_.n_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    // Attention: norm, project (K/V straight into the cache), rotate, attend.
    for (int t = 0; t < n; ++t) RmsNorm(&xb_[t * dim], &x_[t * dim], lw.rms_att.data(), dim, c_.rms_eps);
    MatMul(xb_.data(), n, dim, lw.wq.data(), qd, q_.data(), qd);
    float* k = cache.key(l, first_slot);
    float* v = cache.value(l, first_slot);
    MatMul(xb_.data(), n, dim, lw.wk.data(), kvd, k, kvd);
    MatMul(xb_.data(), n, dim, lw.wv.data(), kvd, v, kvd);
    Rope(q_.data(), n, c_.n_heads, qd, positions);
    Rope(k, n, c_.n_kv_heads, kvd, positions);
    ApeAttention(q_.data(), n, first_slot, cache, l, c_.n_heads, c_.n_kv_heads, c_.head_dim, ape, att_.data());
    MatMul(att_.data(), n, qd, lw.wo.data(), dim, xb2_.data(), dim);
    for (size_t i = 0; i < static_cast<size_t>(n) * dim; ++i) x_[i] += xb2_[i];

    // Feed-forward: norm, SwiGLU, down projection, residual.
    for (int t = 0; t < n; ++t) RmsNorm(&xb_[t * dim], &x_[t * dim], lw.rms_ffn.data(), dim, c_.rms_eps);
    MatMul(xb_.data(), n, dim, lw.w1.data(), hid, hb_.data(), hid);
    MatMul(xb_.data(), n, dim, lw.w3.data(), hid, hb2_.data(), hid);
    for (size_t i = 0; i < static_cast<size_t>(n) * hid; ++i) {
      const float g = hb_[i];
      hb_[i] = g / (1.f + std::exp(-g)) * hb2_[i];
    }
    MatMul(hb_.data(), n, hid, lw.w2.data(), dim, xb2_.data(), dim);
    for (size_t i = 0; i < static_cast<size_t>(n) * dim; ++i) x_[i] += xb2_[i];
  }
  cache.size += n;

  if (logits == nullptr) return;
  // Final norm and classifier, for the last row or all rows.
  const int first_row = all_logits ? 0 : n - 1;
  const int rows = n - first_row;
  for (int t = first_row; t < n; ++t)
    RmsNorm(&xb_[(t - first_row) * dim], &x_[t * dim], w.rms_final.data(), dim, c_.rms_eps);
  MatMul(xb_.data(), rows, dim, w.classifier(), c_.vocab_size, logits, c_.vocab_size);
}

}  // namespace ape
