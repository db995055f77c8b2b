// The transformer against llama2.c's greedy goldens and logits, plus the
// properties APE relies on: positions are data, blocks equal single steps.
#include "common/engine/transformer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "common/engine/generate.h"
#include "tests/test_util.h"

namespace ape {
namespace {

using ::ape::testing::ReadAll;
using ::ape::testing::TestData;

class TransformerTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    SetComputeThreads(GetParam());
    auto m = Model::Load(TestData("stories260K.bin"), TestData("tok512.bin"));
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = *std::move(m);
    golden_ = nlohmann::json::parse(ReadAll(TestData("stories260K.golden.json")));
  }
  std::vector<int32_t> Iota(int n, int start = 0) {
    std::vector<int32_t> p(n);
    for (int i = 0; i < n; ++i) p[i] = start + i;
    return p;
  }
  std::unique_ptr<Model> model_;
  nlohmann::json golden_;
};

TEST_P(TransformerTest, LogitsMatchGolden) {
  const auto& lc = golden_["logits_check"];
  std::vector<int32_t> tokens = lc["tokens"];
  const int V = model_->config().vocab_size;
  for (int max_batch : {1, 2, 256}) {  // sgemv steps, small blocks, one block
    Transformer tf(*model_, max_batch);
    KvCache cache(model_->config(), 16);
    std::vector<float> logits(tokens.size() * V);
    tf.Forward(tokens, Iota(tokens.size()), cache, ApeParams{}, logits.data(), /*all_logits=*/true);
    float max_err = 0;
    for (size_t row = 0; row < tokens.size(); ++row) {
      std::vector<float> want = lc["logits"][row];
      ASSERT_EQ(want.size(), static_cast<size_t>(V));
      for (int v = 0; v < V; ++v) max_err = std::max(max_err, std::abs(logits[row * V + v] - want[v]));
      int argmax = std::max_element(&logits[row * V], &logits[row * V] + V) - &logits[row * V];
      EXPECT_EQ(argmax, lc["argmax"][row].get<int>());
    }
    EXPECT_LT(max_err, 1e-4f) << "max_batch " << max_batch;
  }
}

TEST_P(TransformerTest, GreedyGoldenCases) {
  const Tokenizer& tok = model_->tokenizer();
  for (const auto& c : golden_["cases"]) {
    std::vector<int32_t> prompt = tok.Encode(c["prompt"].get<std::string>(), true, false);
    ASSERT_EQ(prompt, c["prompt_tokens"].get<std::vector<int32_t>>());
    const int steps = c["steps"];
    GenerateOptions opt;
    opt.max_tokens = steps - static_cast<int>(prompt.size()) + 1;  // run.c's -n counts positions
    Transformer tf(*model_);
    KvCache cache(model_->config(), steps + 1);
    std::vector<float> logits(model_->config().vocab_size);
    tf.Forward(prompt, Iota(prompt.size()), cache, ApeParams{}, logits.data());
    GenerateResult r =
        Generate(tf, cache, ApeParams{}, logits, prompt, prompt.size(), opt, [](const TokenEvent&) { return true; });
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), r.tokens.begin(), r.tokens.end());
    EXPECT_EQ(all, c["tokens"].get<std::vector<int32_t>>()) << c["prompt"] << " " << steps;
    std::string text = tok.DecodeAll(std::span(prompt).subspan(1), prompt[0]) + r.text;
    EXPECT_EQ(text, c["text"].get<std::string>());
  }
}

// RoPE makes attention depend on relative positions only: shifting every
// position by the same amount leaves the logits unchanged (up to rounding).
// This would fail if anything used the slot index as the position.
TEST_P(TransformerTest, PositionsAreDataNotSlots) {
  std::vector<int32_t> tokens = golden_["logits_check"]["tokens"];
  const int V = model_->config().vocab_size;
  Transformer tf(*model_);
  std::vector<float> a(V), b(V);
  KvCache c1(model_->config(), 8), c2(model_->config(), 8);
  tf.Forward(tokens, Iota(tokens.size(), 0), c1, ApeParams{}, a.data());
  tf.Forward(tokens, Iota(tokens.size(), 37), c2, ApeParams{}, b.data());
  EXPECT_EQ(c2.pos[0], 37);
  for (int v = 0; v < V; ++v) EXPECT_NEAR(a[v], b[v], 2e-3f);
  // And a different relative layout does change them.
  std::vector<int32_t> spread = {0, 1, 2, 3, 50};
  KvCache c3(model_->config(), 8);
  tf.Forward(tokens, spread, c3, ApeParams{}, b.data());
  float diff = 0;
  for (int v = 0; v < V; ++v) diff = std::max(diff, std::abs(a[v] - b[v]));
  EXPECT_GT(diff, 1e-2f);
}

INSTANTIATE_TEST_SUITE_P(Threads, TransformerTest, ::testing::Values(1, 2));

}  // namespace
}  // namespace ape
