#include "common/engine/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>

namespace ape {
namespace {

std::vector<float> Logits() { return {1.f, 3.f, 2.f, 3.f, -1.f, 0.5f}; }

TEST(SamplerTest, GreedyIsArgmaxLowestIdOnTies) {
  Sampler s(SamplingParams{}, 6);
  auto l = Logits();
  EXPECT_EQ(s.Sample(l.data(), {}), 1);
}

TEST(SamplerTest, SeededSamplingIsDeterministicAndFollowsTheDistribution) {
  SamplingParams p;
  p.temperature = 1.f;
  p.seed = 42;
  Sampler a(p, 6), b(p, 6);
  std::map<int, int> counts;
  for (int i = 0; i < 4000; ++i) {
    auto la = Logits(), lb = Logits();
    int x = a.Sample(la.data(), {});
    EXPECT_EQ(x, b.Sample(lb.data(), {}));
    ++counts[x];
  }
  // p(1) = e^3 / sum ~= 0.383; expect within a few standard deviations.
  double z = 0;
  for (float v : Logits()) z += std::exp(v);
  EXPECT_NEAR(counts[1] / 4000.0, std::exp(3.0) / z, 0.03);
  EXPECT_GT(counts[4], 0);
}

TEST(SamplerTest, TopKTopPMinPRestrict) {
  SamplingParams p;
  p.temperature = 1.f;
  p.top_k = 2;
  Sampler k(p, 6);
  for (int i = 0; i < 200; ++i) {
    auto l = Logits();
    int x = k.Sample(l.data(), {});
    EXPECT_TRUE(x == 1 || x == 3);
  }
  p.top_k = 0;
  p.top_p = 0.05f;  // only the single most likely token
  Sampler tp(p, 6);
  for (int i = 0; i < 50; ++i) {
    auto l = Logits();
    EXPECT_EQ(tp.Sample(l.data(), {}), 1);
  }
  p.top_p = 1.f;
  p.min_p = 0.5f;  // keeps tokens with p >= 0.5 * p_max: ids 1, 3 (ratio 1) and 2 (e^-1 < 0.5: dropped)
  Sampler mp(p, 6);
  for (int i = 0; i < 200; ++i) {
    auto l = Logits();
    int x = mp.Sample(l.data(), {});
    EXPECT_TRUE(x == 1 || x == 3);
  }
}

TEST(SamplerTest, RepetitionPenaltyDemotesSeenTokens) {
  SamplingParams p;
  p.repetition_penalty = 2.f;
  Sampler s(p, 6);
  auto l = Logits();
  std::vector<int32_t> hist = {1, 3};
  EXPECT_EQ(s.Sample(l.data(), hist), 2);  // 3/2 = 1.5 < 2
}

TEST(SamplerTest, ValidationNamesTheField) {
  SamplingParams p;
  p.top_p = 0;
  EXPECT_NE(ValidateSamplingParams(p).message().find("top_p"), std::string::npos);
  p = {};
  p.temperature = -1;
  EXPECT_NE(ValidateSamplingParams(p).message().find("temperature"), std::string::npos);
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams{}).ok());
}

TEST(LogProbTest, MatchesDirectComputation) {
  auto l = Logits();
  double z = 0;
  for (float v : l) z += std::exp(v);
  EXPECT_NEAR(LogProb(l.data(), 6, 2), 2.0 - std::log(z), 1e-6);
  auto top = TopLogProbs(l.data(), 6, 3);
  ASSERT_EQ(top.size(), 3u);
  EXPECT_EQ(top[0].first, 1);
  EXPECT_EQ(top[1].first, 3);
  EXPECT_EQ(top[2].first, 2);
}

}  // namespace
}  // namespace ape
