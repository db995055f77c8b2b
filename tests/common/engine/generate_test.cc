#include "common/engine/generate.h"

#include <gtest/gtest.h>

#include "tests/test_util.h"

namespace ape {
namespace {

TEST(SafePrefixTest, HoldsBackStopPrefixesAndPartialUtf8) {
  EXPECT_EQ(SafePrefixLength("hello wor", {"world"}), 6u);
  EXPECT_EQ(SafePrefixLength("hello", {"xyz"}), 5u);
  EXPECT_EQ(SafePrefixLength("ab\xe6\x97", {}), 2u);      // 3-byte char, 2 bytes present
  EXPECT_EQ(SafePrefixLength("ab\xe6\x97\xa5", {}), 5u);  // complete
}

class GenerateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = Model::Load(testing::TestData("stories260K.bin"), testing::TestData("tok512.bin"));
    ASSERT_TRUE(m.ok());
    model_ = *std::move(m);
  }
  GenerateResult Run(const GenerateOptions& opt, std::vector<TokenEvent>* events) {
    std::vector<int32_t> prompt = model_->tokenizer().Encode("Once upon a time", true, false);
    std::vector<int32_t> pos(prompt.size());
    for (size_t i = 0; i < pos.size(); ++i) pos[i] = i;
    Transformer tf(*model_);
    KvCache cache(model_->config(), 300);
    std::vector<float> logits(model_->config().vocab_size);
    tf.Forward(prompt, pos, cache, ApeParams{}, logits.data());
    return Generate(tf, cache, ApeParams{}, logits, prompt, prompt.size(), opt, [&](const TokenEvent& e) {
      events->push_back(e);
      return true;
    });
  }
  std::unique_ptr<Model> model_;
};

TEST_F(GenerateTest, StopStringEndsTheStreamAndIsExcluded) {
  GenerateOptions opt;
  opt.max_tokens = 100;
  std::vector<TokenEvent> base_events;
  GenerateResult base = Run(opt, &base_events);
  ASSERT_EQ(base.reason, FinishReason::kLength);
  // Greedy continues ", there was a little girl named Lily. ..."
  opt.stop = {"girl"};
  std::vector<TokenEvent> events;
  GenerateResult r = Run(opt, &events);
  EXPECT_EQ(r.reason, FinishReason::kStopString);
  EXPECT_EQ(r.text, base.text.substr(0, base.text.find("girl")));
  std::string streamed;
  for (auto& e : events) streamed += e.text;
  EXPECT_EQ(streamed, r.text);
  EXPECT_LT(r.tokens.size(), base.tokens.size());
}

TEST_F(GenerateTest, MaxTokensAndCancel) {
  GenerateOptions opt;
  opt.max_tokens = 7;
  std::vector<TokenEvent> events;
  GenerateResult r = Run(opt, &events);
  EXPECT_EQ(r.reason, FinishReason::kLength);
  EXPECT_EQ(r.tokens.size(), 7u);
  // The streamed text equals the detokenized ids.
  std::vector<int32_t> prompt = model_->tokenizer().Encode("Once upon a time", true, false);
  EXPECT_EQ(r.text, model_->tokenizer().DecodeAll(r.tokens, prompt.back()));
  int calls = 0;
  opt.max_tokens = 50;
  std::vector<int32_t> p2 = prompt;
  Transformer tf(*model_);
  KvCache cache(model_->config(), 100);
  std::vector<float> logits(model_->config().vocab_size);
  std::vector<int32_t> pos = {0, 1, 2, 3, 4};
  tf.Forward(prompt, pos, cache, ApeParams{}, logits.data());
  GenerateResult c =
      Generate(tf, cache, ApeParams{}, logits, prompt, 5, opt, [&](const TokenEvent&) { return ++calls < 3; });
  EXPECT_EQ(c.reason, FinishReason::kCancelled);
  EXPECT_EQ(calls, 3);
}

}  // namespace
}  // namespace ape
