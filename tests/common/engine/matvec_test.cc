// MatVec and MatMul against a plain double-precision loop, over edge sizes
// and thread counts.
#include "common/engine/matvec.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "common/engine/transformer.h"

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
      for (int n : {1, 3}) {
        std::vector<float> w(size_t(out) * in), x(size_t(n) * in), y(size_t(n) * out), ref(y.size());
        for (auto& v : w) v = u(rng);
        for (auto& v : x) v = u(rng);
        if (n == 1)
          MatVec(w.data(), x.data(), y.data(), out, in);
        else
          MatMul(x.data(), n, in, w.data(), out, y.data(), out);
        Reference(w, x.data(), ref.data(), n, out, in);
        for (size_t i = 0; i < y.size(); ++i)
          ASSERT_NEAR(y[i], ref[i], 1e-4f * std::sqrt(float(in))) << out << "x" << in << " n=" << n << " t=" << threads;
      }
    }
  }
}

}  // namespace
}  // namespace ape
