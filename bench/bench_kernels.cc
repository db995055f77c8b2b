// Kernel microbenchmark: DotRows over a whole weight matrix per type, at the
// TinyLlama FFN shapes (5632 x 2048 and 2048 x 5632) or those --shapes
// names, on 1 and 2 threads, against the memory read bandwidth measured in
// the same run.
//
// Decode reads every weight once per token, so a kernel is as fast as it
// can be when it streams weights at the memory's read bandwidth. Each
// matrix is copied enough times to total --weights_mib and the copies are
// visited in turn, so every product reads its weights from memory, not from
// the cache. The machine is shared and noisy: every measurement (the
// bandwidths included) is repeated in --rounds round-robin passes over all
// of them, and each keeps its best, so a quiet moment helps them all alike.
// Results go to stdout as markdown tables. A second table times a prefill
// (--prefill_tokens tokens through the first shape) one token at a time with
// DotRows and in tiles with DotRowsBatch. A third times float weights'
// prefill kernel (FloatGemm) against OpenBLAS sgemm at --gemm_tokens.
#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "common/engine/gguf.h"
#include "common/engine/quant.h"
#include "common/engine/quantize_model.h"
#include "common/engine/threading.h"

ABSL_FLAG(int, rounds, 7, "round-robin passes over all measurements; each reports its best");
ABSL_FLAG(int, weights_mib, 384,
          "weight copies per matrix, MiB (12x the 32 MiB last-level cache, so few reads hit it)");
ABSL_FLAG(int, bandwidth_mib, 1024, "buffer for the read-bandwidth measurement, MiB");
ABSL_FLAG(std::string, isa, "", "force the kernels of this ISA (avx2, avx512-vnni); empty: detected");
ABSL_FLAG(int, prefill_tokens, 512, "tokens of the prefill measurement (DotRowsBatch); 0 skips it");
ABSL_FLAG(std::string, gemm_tokens, "17,32,64,256",
          "token counts of the float prefill table (FloatGemm vs OpenBLAS); empty skips it");
ABSL_FLAG(std::string, types, "F32,F16,BF16,Q8_0,Q4_0,Q4_K,Q6_K", "weight types to measure");
ABSL_FLAG(std::string, shapes, "5632x2048,2048x5632",
          "matrices as ROWSxCOLS, comma-separated (Qwen2.5-0.5B's: 896x896,128x896,4864x896,896x4864,151936x896); "
          "the prefill table uses the first");

namespace ape {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Best time of `reps` runs of body().
template <typename Body>
double BestSeconds(int reps, const Body& body) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto start = Clock::now();
    body();
    best = std::min(best, Seconds(start, Clock::now()));
  }
  return best;
}

struct Matrix {
  GgmlType type;
  int rows, cols;
  size_t row_bytes;
  int copies;
  std::vector<uint8_t> data;  // `copies` copies of the rows, back to back
  std::vector<uint8_t> act;
};

Matrix MakeMatrix(GgmlType type, int rows, int cols, size_t total_bytes, std::mt19937& rng) {
  Matrix m{type, rows, cols, GgmlRowBytes(static_cast<uint32_t>(type), cols), 0, {}, {}};
  const size_t bytes = m.row_bytes * rows;
  m.copies = static_cast<int>(std::max<size_t>(2, total_bytes / bytes));
  m.data.resize(bytes * m.copies);
  std::normal_distribution<float> normal(0.f, 0.02f);
  std::vector<float> row(cols);
  for (int r = 0; r < rows; ++r) {
    for (float& v : row) v = normal(rng);
    QuantizeRow(type, row.data(), m.data.data() + r * m.row_bytes, cols);
  }
  for (int c = 1; c < m.copies; ++c) std::memcpy(m.data.data() + c * bytes, m.data.data(), bytes);
  std::vector<float> x(cols);
  for (float& v : x) v = normal(rng) * 50;
  m.act.resize(ActivationBytes(type, cols));
  PrepareActivations(type, x.data(), cols, m.act.data());
  return m;
}

// Seconds per matrix-vector product on `threads` threads (the rows split in
// equal runs, multiples of 4), over one pass through all copies.
double MatVecSeconds(const Matrix& m, int threads) {
  SetComputeThreads(threads);
  std::vector<float> y(m.rows);
  const int per_thread = (m.rows / threads + 3) / 4 * 4;
  const size_t bytes = m.row_bytes * m.rows;
  const auto start = Clock::now();
  for (int c = 0; c < m.copies; ++c) {
    const uint8_t* w = m.data.data() + c * bytes;
    ParallelFor(threads, /*dynamic=*/false, [&](int64_t t) {
      const int begin = static_cast<int>(t) * per_thread, end = std::min(m.rows, begin + per_thread);
      if (begin < end) {
        DotRows(m.type, w + begin * m.row_bytes, m.row_bytes, end - begin, m.act.data(), m.cols, y.data() + begin);
      }
    });
  }
  return Seconds(start, Clock::now()) / m.copies;
}

// Prefill of `tokens` tokens through the first copy of m (it sits in the
// cache after the first run): milliseconds per matrix for DotRows one token
// at a time and for DotRowsBatch, on `threads` threads splitting the rows.
struct PrefillTimes {
  double per_token_ms, batch_ms;
};

PrefillTimes PrefillMs(const Matrix& m, int tokens, int threads, int reps, std::mt19937& rng) {
  SetComputeThreads(threads);
  const size_t act_bytes = ActivationBytes(m.type, m.cols);
  std::vector<uint8_t> act(act_bytes * tokens);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(m.cols);
  for (int j = 0; j < tokens; ++j) {
    for (float& v : x) v = normal(rng);
    PrepareActivations(m.type, x.data(), m.cols, act.data() + j * act_bytes);
  }
  std::vector<float> y(static_cast<size_t>(tokens) * m.rows);
  const int per_thread = (m.rows / threads + 3) / 4 * 4;
  auto split = [&](auto body) {
    ParallelFor(threads, /*dynamic=*/false, [&](int64_t t) {
      const int begin = static_cast<int>(t) * per_thread, end = std::min(m.rows, begin + per_thread);
      if (begin < end) body(begin, end);
    });
  };
  const uint8_t* w = m.data.data();
  PrefillTimes times;
  times.per_token_ms =
      1e3 * BestSeconds(reps, [&] {
        split([&](int begin, int end) {
          for (int j = 0; j < tokens; ++j) {
            DotRows(m.type, w + begin * m.row_bytes, m.row_bytes, end - begin, act.data() + j * act_bytes, m.cols,
                    y.data() + static_cast<size_t>(j) * m.rows + begin);
          }
        });
      });
  times.batch_ms = 1e3 * BestSeconds(reps, [&] {
                     split([&](int begin, int end) {
                       DotRowsBatch(m.type, w + begin * m.row_bytes, m.row_bytes, end - begin, act.data(), act_bytes,
                                    tokens, m.cols, y.data() + begin, m.rows);
                     });
                   });
  return times;
}

// Float prefill: FloatGemm (MatMul's kernel for F16 from 17 tokens on, for
// F32 and BF16 up to kFloatGemmMaxTokens) against OpenBLAS sgemm (one thread) on
// the same bands of rows, F16/BF16 bands converted to float32 first (what
// MatMul did before FloatGemm). Both on 2 threads taking bands of 64 rows
// as they free up, alternated `reps` times, best of each.
struct GemmTimes {
  double float_gemm_s, sgemm_s;
};

GemmTimes GemmSeconds(const Matrix& m, int tokens, int reps, std::mt19937& rng) {
  SetComputeThreads(2);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(tokens) * m.cols), y(static_cast<size_t>(tokens) * m.rows);
  for (float& v : x) v = normal(rng);
  constexpr int kBand = 64;
  const int tasks = (m.rows + kBand - 1) / kBand;
  const uint8_t* w = m.data.data();
  auto float_gemm = [&] {
    ParallelFor(tasks, /*dynamic=*/true, [&](int64_t task) {
      const int r0 = static_cast<int>(task) * kBand, rows = std::min(kBand, m.rows - r0);
      FloatGemm(m.type, w + r0 * m.row_bytes, m.row_bytes, rows, x.data(), m.cols, tokens, m.cols, y.data() + r0,
                m.rows);
    });
  };
  auto sgemm = [&] {
    ParallelFor(tasks, /*dynamic=*/true, [&](int64_t task) {
      const int r0 = static_cast<int>(task) * kBand, rows = std::min(kBand, m.rows - r0);
      const float* wf = reinterpret_cast<const float*>(w + r0 * m.row_bytes);
      thread_local std::vector<float> band;
      if (m.type != GgmlType::kF32) {
        band.resize(static_cast<size_t>(rows) * m.cols);
        for (int r = 0; r < rows; ++r)
          DequantizeRow(m.type, w + (r0 + r) * m.row_bytes, band.data() + static_cast<size_t>(r) * m.cols, m.cols);
        wf = band.data();
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tokens, rows, m.cols, 1.f, x.data(), m.cols, wf, m.cols, 0.f,
                  y.data() + r0, m.rows);
    });
  };
  GemmTimes t{1e30, 1e30};
  for (int i = 0; i < reps; ++i) {
    t.float_gemm_s = std::min(t.float_gemm_s, BestSeconds(1, float_gemm));
    t.sgemm_s = std::min(t.sgemm_s, BestSeconds(1, sgemm));
  }
  return t;
}

std::vector<GgmlType> ParseTypes(const std::string& list) {
  std::vector<GgmlType> types;
  for (absl::string_view name : absl::StrSplit(list, ',', absl::SkipEmpty())) {
    auto t = ParseQuantizeType(std::string(name));
    if (!t.ok()) {
      std::fprintf(stderr, "%s\n", t.status().ToString().c_str());
      std::exit(2);
    }
    types.push_back(*t);
  }
  return types;
}

std::vector<std::pair<int, int>> ParseShapes(const std::string& list) {
  std::vector<std::pair<int, int>> shapes;
  for (absl::string_view shape : absl::StrSplit(list, ',', absl::SkipEmpty())) {
    std::pair<absl::string_view, absl::string_view> rc = absl::StrSplit(shape, absl::MaxSplits('x', 1));
    int rows = 0, cols = 0;
    if (!absl::SimpleAtoi(rc.first, &rows) || !absl::SimpleAtoi(rc.second, &cols) || rows <= 0 || cols <= 0) {
      std::fprintf(stderr, "bad shape '%s': want ROWSxCOLS\n", std::string(shape).c_str());
      std::exit(2);
    }
    shapes.emplace_back(rows, cols);
  }
  return shapes;
}

int Run() {
  const int rounds = absl::GetFlag(FLAGS_rounds);
  if (!absl::GetFlag(FLAGS_isa).empty() && !ForceKernelIsaForTesting(absl::GetFlag(FLAGS_isa).c_str())) {
    std::fprintf(stderr, "this CPU has no %s kernels\n", absl::GetFlag(FLAGS_isa).c_str());
    return 2;
  }
  const size_t bw_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_bandwidth_mib)) << 20;
  const bench::ReadBuffer buffer(bw_bytes);

  std::mt19937 rng(1);
  const size_t total = static_cast<size_t>(absl::GetFlag(FLAGS_weights_mib)) << 20;
  std::vector<Matrix> matrices;
  const std::vector<std::pair<int, int>> shapes = ParseShapes(absl::GetFlag(FLAGS_shapes));
  for (GgmlType type : ParseTypes(absl::GetFlag(FLAGS_types))) {
    for (auto [rows, cols] : shapes) {
      if (cols % GgmlBlockElements(static_cast<uint32_t>(type)) != 0) continue;  // (no such matrix of this type)
      matrices.push_back(MakeMatrix(type, rows, cols, total, rng));
    }
  }

  // Round-robin: bandwidth (1 and 2 threads), then every matrix on 1 and 2.
  double bw_s[3] = {0, 1e30, 1e30};
  std::vector<std::array<double, 3>> best(matrices.size(), {0, 1e30, 1e30});
  for (int round = 0; round < rounds; ++round) {
    for (int threads : {1, 2}) {
      SetComputeThreads(threads);
      bw_s[threads] = std::min(bw_s[threads], bench::ReadSeconds(buffer));
    }
    for (size_t i = 0; i < matrices.size(); ++i) {
      for (int threads : {1, 2}) best[i][threads] = std::min(best[i][threads], MatVecSeconds(matrices[i], threads));
    }
  }
  const double bw1 = buffer.size() / bw_s[1] / 1e9, bw2 = buffer.size() / bw_s[2] / 1e9;

  std::printf(
      "kernels: %s; memory read bandwidth (%zu MiB, AVX loads, 4 streams): 1 thread %.1f GB/s, 2 threads %.1f GB/s\n",
      KernelIsa(), bw_bytes >> 20, bw1, bw2);
  std::printf("best of %d rounds\n\n", rounds);
  std::printf("| type | rows x cols | MB | 1 thread GB/s | %% of 1-thread bw | 2 threads GB/s | %% of 2-thread bw |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|\n");
  for (size_t i = 0; i < matrices.size(); ++i) {
    const Matrix& m = matrices[i];
    const double gb = m.row_bytes * m.rows / 1e9;
    const double gbs1 = gb / best[i][1], gbs2 = gb / best[i][2];
    std::printf("| %s | %d x %d | %.1f | %.1f | %.0f%% | %.1f | %.0f%% |\n",
                GgmlTypeName(static_cast<uint32_t>(m.type)), m.rows, m.cols, gb * 1e3, gbs1, 100 * gbs1 / bw1, gbs2,
                100 * gbs2 / bw2);
  }
  std::fflush(stdout);

  std::vector<int> gemm_tokens;
  for (absl::string_view t : absl::StrSplit(absl::GetFlag(FLAGS_gemm_tokens), ',', absl::SkipEmpty())) {
    int v = 0;
    if (!absl::SimpleAtoi(t, &v) || v <= 0) {
      std::fprintf(stderr, "bad --gemm_tokens entry '%s'\n", std::string(t).c_str());
      return 2;
    }
    gemm_tokens.push_back(v);
  }
  bool gemm_header = false;
  for (const Matrix& m : matrices) {
    if (m.type != GgmlType::kF32 && m.type != GgmlType::kF16 && m.type != GgmlType::kBF16) continue;
    for (int tokens : gemm_tokens) {
      if (!gemm_header) {
        std::printf(
            "\nFloat prefill on 2 threads, GFLOP/s: FloatGemm against OpenBLAS sgemm on the same bands "
            "(F16/BF16 converted to float32 first), alternated, best of %d:\n\n",
            std::min(rounds, 5));
        std::printf("| type | rows x cols | tokens | FloatGemm | OpenBLAS | FloatGemm / OpenBLAS |\n");
        std::printf("|---|---|---:|---:|---:|---:|\n");
        gemm_header = true;
      }
      const GemmTimes t = GemmSeconds(m, tokens, std::min(rounds, 5), rng);
      const double gflop = 2.0 * m.rows * m.cols * tokens / 1e9;
      std::printf("| %s | %d x %d | %d | %.1f | %.1f | %.2fx |\n", GgmlTypeName(static_cast<uint32_t>(m.type)), m.rows,
                  m.cols, tokens, gflop / t.float_gemm_s, gflop / t.sgemm_s, t.sgemm_s / t.float_gemm_s);
      std::fflush(stdout);
    }
  }

  const int tokens = absl::GetFlag(FLAGS_prefill_tokens);
  if (tokens <= 0) return 0;
  if (shapes.empty()) return 0;
  std::printf("\nPrefill of %d tokens through %d x %d, ms (DotRows per token vs DotRowsBatch):\n\n", tokens,
              shapes[0].first, shapes[0].second);
  std::printf(
      "| type | 1 thread per token | 1 thread batch | speed-up | 2 threads per token | 2 threads batch | speed-up |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
  for (const Matrix& m : matrices) {
    if (m.rows != shapes[0].first || m.cols != shapes[0].second) continue;
    const PrefillTimes one = PrefillMs(m, tokens, 1, std::min(rounds, 3), rng);
    const PrefillTimes two = PrefillMs(m, tokens, 2, std::min(rounds, 3), rng);
    std::printf("| %s | %.0f | %.0f | %.1fx | %.0f | %.0f | %.1fx |\n", GgmlTypeName(static_cast<uint32_t>(m.type)),
                one.per_token_ms, one.batch_ms, one.per_token_ms / one.batch_ms, two.per_token_ms, two.batch_ms,
                two.per_token_ms / two.batch_ms);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace ape

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return ape::Run();
}
