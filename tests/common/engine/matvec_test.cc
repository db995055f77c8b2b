// MatMul against a plain double-precision loop, over edge sizes, thread
// counts and weight types (each type against its own dequantized values, so
// this checks the products, not the quantization); and decode batches:
// MatMul's rows bit-identical for every token count up to kDecodeBatchMax,
// and for quantized types in prefill too.
#include "common/engine/matvec.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "common/engine/quant.h"
#include "common/engine/threading.h"

namespace ape {
namespace {

void Reference(const std::vector<float>& w, const float* x, float* y, int n, int out, int in) {
  for (int t = 0; t < n; ++t)
    for (int o = 0; o < out; ++o) {
      double s = 0;
      for (int i = 0; i < in; ++i) s += double(w[size_t(o) * in + i]) * x[size_t(t) * in + i];
      y[size_t(t) * out + o] = static_cast<float>(s);
    }
}

TEST(MatVecTest, MatchesReferenceAcrossShapesAndThreads) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (int threads : {1, 2}) {
    SetComputeThreads(threads);
    for (auto [out, in] : std::vector<std::pair<int, int>>{
             {1, 1}, {3, 7}, {4, 16}, {5, 17}, {33, 100}, {512, 64}, {1027, 515}, {64, 4099}}) {
      // One token, a decode batch, FloatGemm (17..48 tokens), OpenBLAS (49 on).
      for (int n : {1, 3, kDecodeBatchMax + 1, kFloatGemmMaxTokens, kFloatGemmMaxTokens + 1}) {
        std::vector<float> w(size_t(out) * in), x(size_t(n) * in), y(size_t(n) * out), ref(y.size());
        for (auto& v : w) v = u(rng);
        for (auto& v : x) v = u(rng);
        MatMul(x.data(), n, WeightMatrix::FromFloats(w, out, in), y.data(), out);
        Reference(w, x.data(), ref.data(), n, out, in);
        for (size_t i = 0; i < y.size(); ++i)
          ASSERT_NEAR(y[i], ref[i], 1e-4f * std::sqrt(float(in))) << out << "x" << in << " n=" << n << " t=" << threads;
      }
    }
  }
}

// Both paths of MatMul for stored types (DotRowsBatch for decode batches;
// for prefill, FloatGemm for F16 and for BF16 up to kFloatGemmMaxTokens,
// then converted bands + sgemm, DotRowsBatch for the others) against the double loop over the dequantized
// matrix. Types whose dot products quantize the activations (Q8_0, Q4_0 with
// Q8_0 blocks of 32; Q4_K, Q6_K with Q8_K blocks of 256) are allowed the
// error that rounding brings: half a step (block max / 127) per element,
// times |w|.
TEST(MatVecTest, StoredTypesMatchTheirDequantizedValues) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int threads : {1, 2}) {
    SetComputeThreads(threads);
    for (GgmlType type :
         {GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kQ4_K, GgmlType::kQ6_K}) {
      for (auto [out, in] : std::vector<std::pair<int, int>>{{7, 256}, {70, 512}, {301, 1024}}) {
        std::vector<float> values(size_t(out) * in);
        for (auto& v : values) v = nd(rng);
        const WeightMatrix w = WeightMatrix::Quantized(type, values, out, in);
        const std::vector<float> wf = w.ToFloats();
        const int block = ActivationType(type) == GgmlType::kQ8_K ? 256 : 32;
        for (int n : {1, 3, kDecodeBatchMax, kDecodeBatchMax + 1, kFloatGemmMaxTokens + 1}) {
          std::vector<float> x(size_t(n) * in), y(size_t(n) * out), ref(y.size());
          for (auto& v : x) v = nd(rng);
          MatMul(x.data(), n, w, y.data(), out);
          Reference(wf, x.data(), ref.data(), n, out, in);
          const bool quantized_x = ActivationType(type) != GgmlType::kF32;
          for (int t = 0; t < n; ++t) {
            for (int o = 0; o < out; ++o) {
              double bound = 1e-4 * std::sqrt(double(in));
              if (quantized_x) {
                for (int b = 0; b < in; b += block) {
                  float amax = 0, wsum = 0;
                  for (int i = b; i < b + block; ++i) {
                    amax = std::max(amax, std::abs(x[size_t(t) * in + i]));
                    wsum += std::abs(wf[size_t(o) * in + i]);
                  }
                  bound += wsum * amax / 127 * 0.5 * 1.01;
                }
              }
              ASSERT_NEAR(y[size_t(t) * out + o], ref[size_t(t) * out + o], bound)
                  << GgmlTypeName(static_cast<uint32_t>(type)) << " " << out << "x" << in << " n=" << n
                  << " threads=" << threads;
            }
          }
        }
      }
    }
  }
}

// A stream decoded in a batch must get exactly what it gets alone: for every
// type, MatMul of n = 1..kDecodeBatchMax tokens gives each token's row
// bit-identical to MatMul of that token alone, on 1 and 2 threads (the
// matrix is large enough to be split across threads, with a ragged last
// band).
TEST(MatVecTest, DecodeBatchRowsBitIdenticalToOneToken) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int out = 301, in = 1024;
  for (GgmlType type : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ8_0, GgmlType::kQ4_0,
                        GgmlType::kQ4_K, GgmlType::kQ6_K}) {
    std::vector<float> values(size_t(out) * in);
    for (auto& v : values) v = nd(rng);
    const WeightMatrix w = WeightMatrix::Quantized(type, values, out, in);
    std::vector<float> x(size_t(kDecodeBatchMax) * in);
    for (auto& v : x) v = nd(rng);
    for (int threads : {1, 2}) {
      SetComputeThreads(threads);
      std::vector<float> alone(size_t(kDecodeBatchMax) * out);
      for (int t = 0; t < kDecodeBatchMax; ++t) MatMul(&x[size_t(t) * in], 1, w, &alone[size_t(t) * out], out);
      for (int n = 1; n <= kDecodeBatchMax; ++n) {
        const int ldy = out + 5;
        std::vector<float> y(size_t(n) * ldy, -7.f);
        MatMul(x.data(), n, w, y.data(), ldy);
        for (int t = 0; t < n; ++t) {
          for (int o = 0; o < out; ++o) {
            ASSERT_EQ(y[size_t(t) * ldy + o], alone[size_t(t) * out + o])
                << GgmlTypeName(static_cast<uint32_t>(type)) << " n=" << n << " token " << t << " row " << o
                << " threads=" << threads;
          }
          for (int o = out; o < ldy; ++o) ASSERT_EQ(y[size_t(t) * ldy + o], -7.f) << "padding written";
        }
      }
    }
  }
}

// A prompt's numbers equal what its tokens get decoded one at a time
// (matvec.h): quantized types run prefill through the same kernels, so
// MatMul of more than kDecodeBatchMax tokens (here 40, enough for several
// token groups and a ragged last one) is bit-identical to one token at a
// time, on 1 and 2 threads, with rows of an odd block count.
TEST(MatVecTest, PrefillRowsOfQuantizedTypesBitIdenticalToOneToken) {
  std::mt19937 rng(12);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int out = 150, n = 40;
  for (GgmlType type : {GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kQ4_K, GgmlType::kQ6_K}) {
    const int in = GgmlBlockElements(static_cast<uint32_t>(type)) == 256 ? 2304 : 2336;
    std::vector<float> values(size_t(out) * in);
    for (auto& v : values) v = nd(rng);
    const WeightMatrix w = WeightMatrix::Quantized(type, values, out, in);
    std::vector<float> x(size_t(n) * in);
    for (auto& v : x) v = nd(rng);
    for (int threads : {1, 2}) {
      SetComputeThreads(threads);
      std::vector<float> alone(size_t(n) * out), y(size_t(n) * out);
      for (int t = 0; t < n; ++t) MatMul(&x[size_t(t) * in], 1, w, &alone[size_t(t) * out], out);
      MatMul(x.data(), n, w, y.data(), out);
      for (size_t i = 0; i < y.size(); ++i) {
        ASSERT_EQ(y[i], alone[i]) << GgmlTypeName(static_cast<uint32_t>(type)) << " token " << i / out << " row "
                                  << i % out << " threads=" << threads;
      }
    }
  }
}

}  // namespace
}  // namespace ape
