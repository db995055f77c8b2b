// Probes the benchmarks share, measured in the same run as what they are
// compared with (the machine is shared and noisy): memory read bandwidth
// (what decode, which reads every weight once per token, can reach) and the
// best sgemm throughput (what prefill, a matrix product, can reach).
// Header-only: each bench binary compiles its own copy.
#ifndef APESERVE_BENCH_BENCH_UTIL_H_
#define APESERVE_BENCH_BENCH_UTIL_H_

#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <utility>
#include <vector>

#include "common/engine/matvec.h"
#include "common/engine/model.h"
#include "common/engine/threading.h"
#include "common/engine/weight_matrix.h"

extern "C" void openblas_set_num_threads(int);
extern "C" char* openblas_get_corename(void);

namespace ape::bench {

inline double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Bytes a decoded token reads from the weights: every layer matrix and the
// classifier in their stored types; the embedding contributes one row
// unless it is the classifier too.
inline double WeightBytesPerToken(const ModelWeights& w) {
  return double(w.MatrixBytes() - (w.wcls.empty() ? 0 : w.tok_emb.bytes()));
}

// Reads `bytes` bytes with 32-byte AVX loads as 4 interleaved streams (one
// per quarter, as the kernels read 4 rows): faster here than one stream, or
// than either with software prefetch, so kernels are compared with the most
// the memory gave. Returns a value so nothing is optimized away.
inline int64_t StreamRead(const uint8_t* p, size_t bytes) {
  const size_t quarter = bytes / 4 / 64 * 64;
  const uint8_t* q[4] = {p, p + quarter, p + 2 * quarter, p + 3 * quarter};
  __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  for (size_t i = 0; i < quarter; i += 64) {
    for (int k = 0; k < 4; ++k) {
      s[k] = _mm256_add_epi64(s[k], _mm256_load_si256(reinterpret_cast<const __m256i*>(q[k] + i)));
      s[k] = _mm256_add_epi64(s[k], _mm256_load_si256(reinterpret_cast<const __m256i*>(q[k] + i + 32)));
    }
  }
  const __m256i t = _mm256_add_epi64(_mm256_add_epi64(s[0], s[1]), _mm256_add_epi64(s[2], s[3]));
  return _mm256_extract_epi64(t, 0) + _mm256_extract_epi64(t, 1) + _mm256_extract_epi64(t, 2) +
         _mm256_extract_epi64(t, 3);
}

// A 64-byte aligned buffer for ReadSeconds.
class ReadBuffer {
 public:
  explicit ReadBuffer(size_t bytes) : bytes_(bytes / 512 * 512), storage_(bytes_ + 64, 1) {
    base_ = reinterpret_cast<const uint8_t*>((reinterpret_cast<uintptr_t>(storage_.data()) + 63) & ~uintptr_t{63});
  }
  const uint8_t* data() const { return base_; }
  size_t size() const { return bytes_; }

 private:
  size_t bytes_;
  std::vector<uint8_t> storage_;
  const uint8_t* base_;
};

// Seconds to read the buffer once on the compute threads, each its share
// (one piece per thread).
inline double ReadSeconds(const ReadBuffer& buf) {
  static volatile int64_t sink = 0;
  const int threads = ComputeThreads();
  const size_t chunk = buf.size() / threads / 128 * 128;
  const double t0 = Now();
  ParallelFor(threads, /*dynamic=*/true, [&](int64_t t) { sink = sink + StreamRead(buf.data() + t * chunk, chunk); });
  return (Now() - t0) * buf.size() / (chunk * threads);
}

// Best read bandwidth of `reps` passes over `bytes`, GB/s, on the compute threads.
inline double ReadBandwidthGBs(size_t bytes, int reps) {
  ReadBuffer buf(bytes);
  double best = 1e30;
  for (int i = 0; i < reps; ++i) best = std::min(best, ReadSeconds(buf));
  return buf.size() / best / 1e9;
}

// sgemm throughput at a model's prefill shapes: y[m][out] = x[m][in] W[out][in]^T
// for each {out, in} of `shapes`, best of `reps`, GFLOP/s. Two ways: OpenBLAS
// on its own threads (ComputeThreads() of them; the engine keeps OpenBLAS at
// one thread otherwise) and the engine's MatMul (float32 weights: one-thread
// sgemm on bands of rows across the compute threads, or FloatGemm where
// OpenBLAS runs generic kernels: BlasHasCpuKernels). `best` is the larger.
struct SgemmProbe {
  double openblas_threads = 0, engine_bands = 0;
  double best() const { return std::max(openblas_threads, engine_bands); }
};

inline SgemmProbe MeasureSgemm(const std::vector<std::pair<int, int>>& shapes, int m, int reps) {
  SgemmProbe probe;
  std::vector<WeightMatrix> ws;
  std::vector<std::vector<float>> xs, ys;
  double flops = 0;
  for (auto [out, in] : shapes) {
    std::vector<float> w(static_cast<size_t>(out) * in);
    for (size_t i = 0; i < w.size(); ++i) w[i] = 0.02f * static_cast<float>(static_cast<int>(i % 97) - 48) / 48;
    ws.push_back(WeightMatrix::FromFloats(std::move(w), out, in));
    xs.emplace_back(static_cast<size_t>(m) * in, 0.01f);
    ys.emplace_back(static_cast<size_t>(m) * out);
    flops += 2.0 * m * out * in;
  }
  auto run = [&](bool openblas) {
    double best = 1e30;
    for (int rep = 0; rep < reps; ++rep) {
      const double t0 = Now();
      for (size_t i = 0; i < ws.size(); ++i) {
        const WeightMatrix& w = ws[i];
        if (openblas) {
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, w.rows, w.cols, 1.f, xs[i].data(), w.cols,
                      reinterpret_cast<const float*>(w.data), w.cols, 0.f, ys[i].data(), w.rows);
        } else {
          MatMul(xs[i].data(), m, w, ys[i].data(), w.rows);
        }
      }
      best = std::min(best, Now() - t0);
    }
    return flops / best / 1e9;
  };
  openblas_set_num_threads(ComputeThreads());
  probe.openblas_threads = run(true);
  openblas_set_num_threads(1);
  probe.engine_bands = run(false);
  return probe;
}

}  // namespace ape::bench

#endif  // APESERVE_BENCH_BENCH_UTIL_H_
