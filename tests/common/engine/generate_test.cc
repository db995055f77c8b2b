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

// The stepper driven by hand (as the batch decoder drives it: sample, hand
// the event over, feed the token) gives Generate's events and result; the
// tail of held-back text comes last; max_tokens 0 ends at once.
TEST_F(GenerateTest, StepperDrivenByHandEqualsGenerate) {
  GenerateOptions opt;
  opt.max_tokens = 30;
  opt.stop = {"xyz"};  // holds back text ending in "x" or "xy"
  opt.top_logprobs = 2;
  opt.sampling.temperature = 0.7f;
  opt.sampling.seed = 3;
  std::vector<TokenEvent> want_events;
  GenerateResult want = Run(opt, &want_events);

  std::vector<int32_t> prompt = model_->tokenizer().Encode("Once upon a time", true, false);
  std::vector<int32_t> pos(prompt.size());
  for (size_t i = 0; i < pos.size(); ++i) pos[i] = i;
  Transformer tf(*model_);
  KvCache cache(model_->config(), 300);
  std::vector<float> logits(model_->config().vocab_size);
  tf.Forward(prompt, pos, cache, ApeParams{}, logits.data());
  GenerationStepper stepper(*model_, opt, prompt);
  std::vector<TokenEvent> events;
  int32_t next = static_cast<int32_t>(prompt.size());
  TokenEvent ev;
  while (!stepper.Sample(logits.data(), &ev)) {
    events.push_back(ev);
    const int32_t id = stepper.last_token();
    tf.Forward({&id, 1}, {&next, 1}, cache, ApeParams{}, logits.data());
    ++next;
  }
  events.push_back(ev);
  if (stepper.Tail(&ev)) events.push_back(ev);
  const GenerateResult& got = stepper.result();
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.text, want.text);
  EXPECT_EQ(got.reason, want.reason);
  ASSERT_EQ(events.size(), want_events.size());
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].id, want_events[i].id);
    EXPECT_EQ(events[i].text, want_events[i].text);
    EXPECT_EQ(events[i].logprob, want_events[i].logprob);
    EXPECT_EQ(events[i].top, want_events[i].top);
  }
  EXPECT_GT(got.decode_seconds, 0);

  opt.max_tokens = 0;
  GenerationStepper none(*model_, opt, prompt);
  EXPECT_TRUE(none.done());
  EXPECT_EQ(none.result().reason, FinishReason::kLength);
  EXPECT_FALSE(none.Tail(&ev));
}

}  // namespace
}  // namespace ape
