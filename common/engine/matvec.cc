#include "common/engine/matvec.h"

#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "common/engine/quant.h"
#include "common/engine/threading.h"

namespace ape {
namespace {

inline float HorizontalSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// Rows r..r+3 of W against x; two accumulators per row hide FMA latency.
inline void FourRows(const float* w, const float* x, float* y, int r, int in) {
  const float* w0 = w + static_cast<long>(r) * in;
  const float* w1 = w0 + in;
  const float* w2 = w1 + in;
  const float* w3 = w2 + in;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int i = 0;
  for (; i + 16 <= in; i += 16) {
    const __m256 xa = _mm256_loadu_ps(x + i), xb = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xa, a0);
    b0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i + 8), xb, b0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xa, a1);
    b1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i + 8), xb, b1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xa, a2);
    b2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i + 8), xb, b2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xa, a3);
    b3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i + 8), xb, b3);
  }
  float s0 = HorizontalSum(_mm256_add_ps(a0, b0)), s1 = HorizontalSum(_mm256_add_ps(a1, b1));
  float s2 = HorizontalSum(_mm256_add_ps(a2, b2)), s3 = HorizontalSum(_mm256_add_ps(a3, b3));
  for (; i < in; ++i) {
    s0 += w0[i] * x[i];
    s1 += w1[i] * x[i];
    s2 += w2[i] * x[i];
    s3 += w3[i] * x[i];
  }
  y[r] = s0;
  y[r + 1] = s1;
  y[r + 2] = s2;
  y[r + 3] = s3;
}

inline void OneRow(const float* w, const float* x, float* y, int r, int in) {
  const float* w0 = w + static_cast<long>(r) * in;
  __m256 a = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= in; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), _mm256_loadu_ps(x + i), a);
  float s = HorizontalSum(a);
  for (; i < in; ++i) s += w0[i] * x[i];
  y[r] = s;
}

}  // namespace

void MatVec(const float* w, const float* x, float* y, int out, int in) {
  const int blocks = out / 4;
  // Small matrices are not worth waking the team for.
  if (static_cast<long>(out) * in >= (1 << 16)) {
    ParallelFor(blocks, /*dynamic=*/false, [&](int64_t b) { FourRows(w, x, y, 4 * static_cast<int>(b), in); });
  } else {
    for (int b = 0; b < blocks; ++b) FourRows(w, x, y, 4 * b, in);
  }
  for (int r = blocks * 4; r < out; ++r) OneRow(w, x, y, r, in);
}

namespace {

constexpr int kRowsPerTask = 16;       // DotRows rows per parallel task
constexpr int kRowsPerBatchTask = 64;  // DotRowsBatch rows per parallel task

// Each token's activations in the type's partner form, then every task
// takes a band of rows and runs all tokens over it.
void DotRowsMatMul(const float* x, int n, const WeightMatrix& w, float* y, int ldy) {
  const size_t act_bytes = ActivationBytes(w.type, w.cols);
  thread_local std::vector<uint8_t> act;
  if (act.size() < act_bytes * n) act.resize(act_bytes * n);
  // (A pointer, not the thread_local itself: the team's threads have their own.)
  uint8_t* const acts = act.data();
  for (int t = 0; t < n; ++t)
    PrepareActivations(w.type, x + static_cast<size_t>(t) * w.cols, w.cols, acts + t * act_bytes);
  // One token: bands of kRowsPerTask rows; several: wider bands, each run
  // through DotRowsBatch (weights unpacked once per tile of tokens).
  const int band_rows = n == 1 ? kRowsPerTask : kRowsPerBatchTask;
  const int tasks = (w.rows + band_rows - 1) / band_rows;
  auto band = [&](int64_t task) {
    const int r0 = static_cast<int>(task) * band_rows, rows = std::min(band_rows, w.rows - r0);
    if (n == 1) {
      DotRows(w.type, w.row(r0), w.row_bytes, rows, acts, w.cols, y + r0);
    } else {
      DotRowsBatch(w.type, w.row(r0), w.row_bytes, rows, acts, act_bytes, n, w.cols, y + r0, ldy);
    }
  };
  if (static_cast<int64_t>(w.rows) * w.cols >= (1 << 16)) {
    ParallelFor(tasks, /*dynamic=*/false, band);
  } else {
    for (int task = 0; task < tasks; ++task) band(task);
  }
}

// Many tokens: bands of rows converted to float32 (in parallel), each
// multiplied with sgemm into its columns of y.
void ConvertedMatMul(const float* x, int n, const WeightMatrix& w, float* y, int ldy) {
  constexpr size_t kTileFloats = size_t{4} << 20;  // 16 MB of float32 rows
  const int tile_rows = static_cast<int>(std::clamp<size_t>(kTileFloats / w.cols, 64, w.rows));
  thread_local std::vector<float> tile;
  if (tile.size() < static_cast<size_t>(tile_rows) * w.cols) tile.resize(static_cast<size_t>(tile_rows) * w.cols);
  for (int r0 = 0; r0 < w.rows; r0 += tile_rows) {
    const int rows = std::min(tile_rows, w.rows - r0);
    float* t = tile.data();
    ParallelFor(rows, /*dynamic=*/false,
                [&](int64_t r) { DequantizeRow(w.type, w.row(r0 + static_cast<int>(r)), t + r * w.cols, w.cols); });
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, rows, w.cols, 1.f, x, w.cols, t, w.cols, 0.f, y + r0, ldy);
  }
}

}  // namespace

void MatMul(const float* x, int n, const WeightMatrix& w, float* y, int ldy) {
  const auto* wf = reinterpret_cast<const float*>(w.data);
  if (w.type == GgmlType::kF32) {
    if (n == 1) {
      MatVec(wf, x, y, w.rows, w.cols);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, w.rows, w.cols, 1.f, x, w.cols, wf, w.cols, 0.f, y, ldy);
    }
  } else if (n <= kDotRowsMaxTokens || ActivationType(w.type) != GgmlType::kF32) {
    DotRowsMatMul(x, n, w, y, ldy);
  } else {
    ConvertedMatMul(x, n, w, y, ldy);
  }
}

}  // namespace ape
