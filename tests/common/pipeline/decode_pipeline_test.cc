// The decode pipeline in process (no store: contexts encoded in memory):
// the special cases of APE.md section 3 on the real stories260K model.
#include "common/pipeline/decode_pipeline.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "common/engine/sampler.h"
#include "tests/test_util.h"

namespace ape {
namespace {

class DecodePipelineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = Model::Load(testing::TestData("stories260K.bin"), testing::TestData("tok512.bin"));
    ASSERT_TRUE(m.ok());
    model_ = *std::move(m);
  }
  std::vector<int32_t> Tok(const std::string& s, bool bos = false) { return model_->tokenizer().Encode(s, bos, false); }
  DecodeInput Input(DecodeMode mode, const std::vector<std::string>& contexts, float T, float S) {
    DecodeInput in;
    in.prefix_tokens = Tok("Once upon a time", true);
    for (const auto& c : contexts) in.contexts.push_back({"", Tok(c)});
    in.query_tokens = Tok("One day, Lily");
    in.mode = mode;
    in.temperature = T;
    in.scale = S;
    in.dtype = KvDtype::kFloat32;
    return in;
  }
  std::vector<float> LogSoftmax(std::vector<float> l) {
    float mx = *std::max_element(l.begin(), l.end());
    double z = 0;
    for (float v : l) z += std::exp(v - mx);
    for (float& v : l) v = v - mx - std::log(z);
    return l;
  }
  std::vector<float> Logits(const DecodeInput& in) {
    DecodeStats st;
    auto l = PromptLogits(*model_, nullptr, in, &st);
    EXPECT_TRUE(l.ok()) << l.status();
    return LogSoftmax(*l);
  }
  GenerateResult Greedy(DecodeInput in, int n, std::vector<float>* logprobs) {
    in.generate.max_tokens = n;
    DecodeStats st;
    auto r = RunDecode(*model_, nullptr, in, DecodeHooks{}, [&](const TokenEvent& e) {
      if (e.id >= 0) logprobs->push_back(e.logprob);
      return true;
    }, &st);
    EXPECT_TRUE(r.ok()) << r.status();
    return *r;
  }
  std::unique_ptr<Model> model_;
};

// T = S = 1 with ONE context is sequential encoding (APE.md section 3).
TEST_F(DecodePipelineTest, OneContextUnitTSEqualsSequential) {
  const std::vector<std::string> ctx = {" there was a girl named Lily. She had a big red ball."};
  auto ape = Logits(Input(DecodeMode::kApe, ctx, 1.f, 1.f));
  auto seq = Logits(Input(DecodeMode::kSequential, ctx, 1.f, 1.f));
  float max_diff = 0;
  for (size_t i = 0; i < ape.size(); ++i) max_diff = std::max(max_diff, std::abs(ape[i] - seq[i]));
  EXPECT_LT(max_diff, 1e-4f);
  // And along a generated continuation.
  std::vector<float> lp_ape, lp_seq;
  GenerateResult a = Greedy(Input(DecodeMode::kApe, ctx, 1.f, 1.f), 20, &lp_ape);
  GenerateResult s = Greedy(Input(DecodeMode::kSequential, ctx, 1.f, 1.f), 20, &lp_seq);
  EXPECT_EQ(a.tokens, s.tokens);
  ASSERT_EQ(lp_ape.size(), lp_seq.size());
  for (size_t i = 0; i < lp_ape.size(); ++i) EXPECT_NEAR(lp_ape[i], lp_seq[i], 1e-4f) << i;
  // With T, S away from 1 the answer does change.
  auto other = Logits(Input(DecodeMode::kApe, ctx, 0.5f, 0.7f));
  float diff = 0;
  for (size_t i = 0; i < ape.size(); ++i) diff = std::max(diff, std::abs(ape[i] - other[i]));
  EXPECT_GT(diff, 1e-2f);
}

TEST_F(DecodePipelineTest, OutputIsInvariantToContextOrder) {
  std::vector<std::string> ctx = {" Lily had a red ball.", " Tom liked to run in the park with his big dog.",
                                  " The sun was hot.", " Mom made a cake."};
  std::vector<float> first = Logits(Input(DecodeMode::kApe, ctx, 0.8f, 0.9f));
  std::vector<float> lp0;
  GenerateResult g0 = Greedy(Input(DecodeMode::kApe, ctx, 0.8f, 0.9f), 12, &lp0);
  std::sort(ctx.begin(), ctx.end());
  int perms = 0;
  do {
    auto l = Logits(Input(DecodeMode::kApe, ctx, 0.8f, 0.9f));
    for (size_t i = 0; i < l.size(); ++i) ASSERT_NEAR(l[i], first[i], 1e-4f);
    ++perms;
  } while (std::next_permutation(ctx.begin(), ctx.end()) && perms < 8);
  std::reverse(ctx.begin(), ctx.end());
  std::vector<float> lp1;
  EXPECT_EQ(Greedy(Input(DecodeMode::kApe, ctx, 0.8f, 0.9f), 12, &lp1).tokens, g0.tokens);
}

TEST_F(DecodePipelineTest, ParallelIsApeAtUnitTS) {
  std::vector<std::string> ctx = {" Lily had a red ball.", " Tom liked to run."};
  auto p = Logits(Input(DecodeMode::kParallel, ctx, 0.3f, 0.4f));  // T, S ignored
  auto a = Logits(Input(DecodeMode::kApe, ctx, 1.f, 1.f));
  for (size_t i = 0; i < p.size(); ++i) ASSERT_NEAR(p[i], a[i], 1e-5f);
}

TEST_F(DecodePipelineTest, UsageCountsTokens) {
  DecodeInput in = Input(DecodeMode::kApe, {" Lily had a red ball.", " Tom ran."}, 0.9f, 0.9f);
  in.generate.max_tokens = 3;
  DecodeStats st;
  auto r = RunDecode(*model_, nullptr, in, DecodeHooks{}, [](const TokenEvent&) { return true; }, &st);
  ASSERT_TRUE(r.ok());
  const int want = in.prefix_tokens.size() + in.contexts[0].tokens->size() + in.contexts[1].tokens->size() + in.query_tokens.size();
  EXPECT_EQ(st.prompt_tokens, want);
  EXPECT_EQ(st.cached_tokens, 0);  // no store: everything encoded here
  EXPECT_EQ(st.encoded_tokens, want - static_cast<int>(in.query_tokens.size()));
  EXPECT_EQ(r->tokens.size(), 3u);
}

}  // namespace
}  // namespace ape
