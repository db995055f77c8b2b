#include "common/engine/matvec.h"

#include <cblas.h>

#include <algorithm>
#include <string_view>
#include <vector>

#include "common/engine/quant.h"
#include "common/engine/threading.h"

extern "C" char* openblas_get_corename(void);

namespace ape {
namespace {

// Matrices smaller than this (elements) run on the calling thread: not
// worth waking the pool for.
constexpr int64_t kParallelElements = int64_t{1} << 16;

// Each token's activations in the type's partner form (float32 types use x
// as it is), then every task takes a band of rows and runs all tokens over
// it. One token: bands of 16 rows (many small tasks balance the threads);
// several: 64 rows, so each band's weights are read once while DotRowsBatch
// passes the tokens over them from the cache.
void DotRowsMatMul(const float* x, int n, const WeightMatrix& w, float* y, int ldy) {
  const uint8_t* acts = reinterpret_cast<const uint8_t*>(x);
  size_t act_stride = static_cast<size_t>(w.cols) * sizeof(float);
  if (ActivationType(w.type) != GgmlType::kF32) {
    act_stride = ActivationBytes(w.type, w.cols);
    thread_local std::vector<uint8_t> act;
    if (act.size() < act_stride * n) act.resize(act_stride * n);
    for (int t = 0; t < n; ++t)
      PrepareActivations(w.type, x + static_cast<size_t>(t) * w.cols, w.cols, act.data() + t * act_stride);
    acts = act.data();  // (a pointer, not the thread_local: the pool's threads have their own)
  }
  const int band_rows = n == 1 ? 16 : 64;
  const int tasks = (w.rows + band_rows - 1) / band_rows;
  auto band = [&](int64_t task) {
    const int r0 = static_cast<int>(task) * band_rows, rows = std::min(band_rows, w.rows - r0);
    DotRowsBatch(w.type, w.row(r0), w.row_bytes, rows, acts, act_stride, n, w.cols, y + r0, ldy);
  };
  if (static_cast<int64_t>(w.rows) * w.cols >= kParallelElements) {
    ParallelFor(tasks, /*dynamic=*/false, band);
  } else {
    for (int task = 0; task < tasks; ++task) band(task);
  }
}

// Many tokens, F32/BF16 weights: OpenBLAS sgemm on one thread per band of
// rows (OpenBLAS is kept at one thread, threading.h), the bands split across
// the compute threads. BF16 bands are converted to float32 first, into a
// per-thread tile. Bands are wide enough for sgemm to run at full speed and
// narrow enough (a few per thread) to balance the threads.
void SgemmMatMul(const float* x, int n, const WeightMatrix& w, float* y, int ldy) {
  const int threads = ComputeThreads();
  int band_rows = std::max(64, (w.rows + 2 * threads - 1) / (2 * threads));
  // Converted bands: at most 4 MB of float32 per thread.
  if (w.type != GgmlType::kF32) band_rows = std::min(band_rows, std::max(64, (1 << 20) / w.cols));
  band_rows = (band_rows + 15) / 16 * 16;
  const int tasks = (w.rows + band_rows - 1) / band_rows;
  ParallelFor(tasks, /*dynamic=*/true, [&](int64_t task) {
    const int r0 = static_cast<int>(task) * band_rows, rows = std::min(band_rows, w.rows - r0);
    const float* wf = reinterpret_cast<const float*>(w.row(r0));
    if (w.type != GgmlType::kF32) {
      thread_local std::vector<float> tile;
      if (tile.size() < static_cast<size_t>(rows) * w.cols) tile.resize(static_cast<size_t>(rows) * w.cols);
      for (int r = 0; r < rows; ++r)
        DequantizeRow(w.type, w.row(r0 + r), tile.data() + static_cast<size_t>(r) * w.cols, w.cols);
      wf = tile.data();
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, rows, w.cols, 1.f, x, w.cols, wf, w.cols, 0.f, y + r0, ldy);
  });
}

// Many tokens, float weights in their own type: FloatGemm on bands of 64
// rows (many bands, handed out as threads free up, balance the threads).
void FloatGemmMatMul(const float* x, int n, const WeightMatrix& w, float* y, int ldy) {
  constexpr int kBandRows = 64;
  const int tasks = (w.rows + kBandRows - 1) / kBandRows;
  ParallelFor(tasks, /*dynamic=*/true, [&](int64_t task) {
    const int r0 = static_cast<int>(task) * kBandRows, rows = std::min(kBandRows, w.rows - r0);
    FloatGemm(w.type, w.row(r0), w.row_bytes, rows, x, w.cols, n, w.cols, y + r0, ldy);
  });
}

}  // namespace

bool BlasHasCpuKernels() {
  static const bool known = [] {
    const std::string_view core = openblas_get_corename();
    for (std::string_view k : {"Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids"})
      if (core == k) return true;
    return false;
  }();
  return known;
}

void MatMul(const float* x, int n, const WeightMatrix& w, float* y, int ldy) {
  if (n <= kDecodeBatchMax || ActivationType(w.type) != GgmlType::kF32) {
    DotRowsMatMul(x, n, w, y, ldy);
  } else if (w.type == GgmlType::kF16 || n <= kFloatGemmMaxTokens || !BlasHasCpuKernels()) {
    FloatGemmMatMul(x, n, w, y, ldy);
  } else {
    SgemmMatMul(x, n, w, y, ldy);
  }
}

}  // namespace ape
