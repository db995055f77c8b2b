// The batch decoder in process, on the real stories260K model (contexts
// given by content, no store: PrepareDecode encodes them in memory).
//
// Equality: a stream's greedy tokens in a batch must equal what the same
// request gets alone. The assertions are exact. They hold bit for bit once
// MatMul's rows do not depend on the number of rows (matvec.h,
// kDecodeBatchMax); with a matvec where float32 n == 1 (MatVec) and n > 1
// (sgemm) round differently, a stream whose top two logits are within the
// last bits of each other could flip: that shows here as a token mismatch,
// deliberately not hidden by a tolerance.
#include "common/pipeline/batch_decoder.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <thread>

#include "tests/test_util.h"

namespace ape {
namespace {

using Clock = std::chrono::steady_clock;

const char* const kDocs[] = {
    " Lily had a big red ball. She liked to play with it in the park.",
    " Tom had a dog. The dog liked to run and jump in the garden.",
    " The sun was hot. Ben and his mom went to the beach to swim.",
    " Sue saw a big cat in the tree. The cat was scared and could not get down.",
    " There was a little bird. It could not fly, so it sat on the ground and cried.",
    " Max found a shiny stone. He gave it to his friend Anna, who was very happy.",
    " The little boat went on the water. A big fish swam under it.",
    " Mia and her brother built a tall tower with blocks. Then it fell down.",
};

struct Spec {
  Spec(DecodeMode m, std::vector<int> d, int n, std::string q = " One day,")
      : mode(m), docs(std::move(d)), max_tokens(n), query(std::move(q)) {}
  DecodeMode mode;
  std::vector<int> docs;
  int max_tokens;
  std::string query;
  GenerateOptions extra;  // sampling, stop, top_logprobs (max_tokens from above)
};

struct Outcome {
  GenerateResult result;
  std::vector<TokenEvent> events;
  std::vector<float> logits;  // score only
};

class BatchDecoderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = Model::Load(testing::TestData("stories260K.bin"), testing::TestData("tok512.bin"));
    ASSERT_TRUE(m.ok());
    model_ = *std::move(m);
    // Random weights: greedy text loops without ever ending, so its streams
    // run as long as max_tokens says (stories260K's end their story).
    auto r = Model::Load(testing::TestData("families/models/tiny-random-qwen2-F32.gguf"), "");
    ASSERT_TRUE(r.ok()) << r.status();
    endless_ = *std::move(r);
  }
  // A stream of `n` tokens that does not end before (checked by the tests).
  std::shared_ptr<BatchStream> SubmitEndless(BatchDecoder& engine, int n, int seed,
                                             std::function<void()> on_leave = nullptr) {
    DecodeInput in;
    in.prefix_tokens = {1 + seed};
    in.query_tokens = {100 + seed, 200 + seed, 300 + seed};
    in.mode = DecodeMode::kSequential;
    in.generate.max_tokens = n;
    DecodeStats stats;
    auto session = PrepareDecode(*endless_, nullptr, in, n, DecodeHooks{}, &stats);
    EXPECT_TRUE(session.ok()) << session.status();
    auto stream = engine.Submit(
        {.session = *std::move(session), .generate = in.generate, .score_only = false, .on_leave = on_leave});
    EXPECT_TRUE(stream.ok()) << stream.status();
    return *stream;
  }
  std::vector<int32_t> Tok(const std::string& s, bool bos = false) { return model_->tokenizer().Encode(s, bos, false); }

  DecodeInput Input(const Spec& s) {
    DecodeInput in;
    in.prefix_tokens = Tok("Once upon a time", true);
    for (int d : s.docs) in.contexts.push_back({"", Tok(kDocs[d])});
    in.query_tokens = Tok(s.query);
    in.mode = s.mode;
    in.dtype = KvDtype::kFloat32;
    in.generate = s.extra;
    in.generate.max_tokens = s.max_tokens;
    return in;
  }

  // The request of `s`, loaded and laid out (what a handler thread does).
  BatchDecoder::Request Prepare(const Spec& s, bool score_only = false) {
    const DecodeInput in = Input(s);
    DecodeStats stats;
    auto session = PrepareDecode(*model_, nullptr, in, score_only ? 0 : s.max_tokens, DecodeHooks{}, &stats);
    EXPECT_TRUE(session.ok()) << session.status();
    return {.session = *std::move(session), .generate = in.generate, .score_only = score_only, .on_leave = nullptr};
  }
  static std::shared_ptr<BatchStream> Submit(BatchDecoder& engine, BatchDecoder::Request r) {
    auto stream = engine.Submit(std::move(r));
    EXPECT_TRUE(stream.ok()) << stream.status();
    return *stream;
  }
  std::shared_ptr<BatchStream> Submit(BatchDecoder& engine, const Spec& s, bool score_only = false) {
    return Submit(engine, Prepare(s, score_only));
  }

  static Outcome Drain(BatchStream& s) {
    Outcome o;
    TokenEvent ev;
    for (;;) {
      const auto next = s.Wait(&ev, Clock::now() + std::chrono::seconds(60));
      EXPECT_NE(next, BatchStream::Next::kTimeout);
      if (next != BatchStream::Next::kEvent) break;
      o.events.push_back(ev);
    }
    o.result = s.result();
    o.logits = s.logits();
    return o;
  }

  Outcome Alone(const Spec& s, int prefill_chunk = 64) {
    BatchDecoder engine(*model_, {.max_streams = 8, .prefill_chunk = prefill_chunk});
    auto stream = Submit(engine, s);
    return Drain(*stream);
  }

  static void ExpectSame(const Outcome& a, const Outcome& b, const std::string& what) {
    EXPECT_EQ(a.result.tokens, b.result.tokens) << what;
    EXPECT_EQ(a.result.text, b.result.text) << what;
    EXPECT_EQ(a.result.reason, b.result.reason) << what;
    ASSERT_EQ(a.events.size(), b.events.size()) << what;
    for (size_t i = 0; i < a.events.size(); ++i) {
      EXPECT_EQ(a.events[i].id, b.events[i].id) << what << " event " << i;
      EXPECT_EQ(a.events[i].text, b.events[i].text) << what << " event " << i;
      // Logprobs agree to rounding (the batch's products may round apart).
      EXPECT_NEAR(a.events[i].logprob, b.events[i].logprob, 1e-4) << what << " event " << i;
      ASSERT_EQ(a.events[i].top.size(), b.events[i].top.size()) << what;
      for (size_t k = 0; k < a.events[i].top.size(); ++k)
        EXPECT_NEAR(a.events[i].top[k].second, b.events[i].top[k].second, 1e-4) << what;
    }
  }

  // Eight requests: different documents, all three modes, different
  // lengths, a stop string, sampling with a seed, top_logprobs.
  std::vector<Spec> EightSpecs() {
    std::vector<Spec> specs = {
        {DecodeMode::kApe, {0, 1}, 40},           {DecodeMode::kParallel, {2, 3}, 25},
        {DecodeMode::kSequential, {4}, 33},       {DecodeMode::kApe, {5, 6, 7}, 12, " Then"},
        {DecodeMode::kSequential, {1, 2, 3}, 50}, {DecodeMode::kApe, {7}, 30, " The end. Once"},
        {DecodeMode::kParallel, {0, 4, 6}, 45},   {DecodeMode::kApe, {3, 5}, 20},
    };
    specs[1].extra.stop = {" the"};
    specs[3].extra.sampling.temperature = 0.8f;
    specs[3].extra.sampling.seed = 7;
    specs[3].extra.sampling.top_k = 40;
    specs[6].extra.top_logprobs = 3;
    specs[7].extra.sampling.repetition_penalty = 1.3f;
    return specs;
  }

  std::unique_ptr<Model> model_, endless_;
};

TEST_F(BatchDecoderTest, EightStreamsEqualTheirSoloRuns) {
  const std::vector<Spec> specs = EightSpecs();
  std::vector<Outcome> solo;
  for (const Spec& s : specs) solo.push_back(Alone(s));
  BatchDecoder engine(*model_, {.max_streams = 8, .prefill_chunk = 64});
  std::vector<BatchDecoder::Request> requests;
  for (const Spec& s : specs) requests.push_back(Prepare(s));
  std::vector<std::shared_ptr<BatchStream>> streams;
  for (auto& r : requests) streams.push_back(Submit(engine, std::move(r)));
  for (size_t i = 0; i < specs.size(); ++i) ExpectSame(Drain(*streams[i]), solo[i], "stream " + std::to_string(i));
  // They really shared steps: fewer steps than tokens generated.
  int64_t generated = 0;
  for (const Outcome& o : solo) generated += o.result.tokens.size();
  EXPECT_GT(engine.step_rows(), 2 * engine.steps()) << engine.steps() << " steps";
  EXPECT_LE(engine.step_rows(), generated);
  EXPECT_EQ(engine.running(), 0);
  // The finish reasons are the requests' own.
  EXPECT_EQ(solo[0].result.reason, FinishReason::kLength);
  EXPECT_EQ(solo[0].result.tokens.size(), 40u);
  EXPECT_EQ(solo[1].result.reason, FinishReason::kStopString);
}

// Streams join while others decode (and a chunked SEQUENTIAL prefill runs
// among them, its chunks riding along in the decode steps): still each
// equals its solo run, because a request's chunk boundaries depend only on
// itself, and a chunk computes the same inside a step as alone. All eight
// are submitted at once to a batch of 3: the other five join as slots free
// up, while the rest decode. (They used to be submitted 3 ms apart, which
// on a fast machine let each request finish before the next came, so no
// chunk rode along.)
TEST_F(BatchDecoderTest, LateJoinersAndSmallChunksKeepEquality) {
  const std::vector<Spec> specs = EightSpecs();
  std::vector<Outcome> solo;
  for (const Spec& s : specs) solo.push_back(Alone(s, /*prefill_chunk=*/8));
  BatchDecoder engine(*model_, {.max_streams = 3, .prefill_chunk = 8});
  std::vector<std::shared_ptr<BatchStream>> streams;
  std::vector<Outcome> got(specs.size());
  std::vector<std::thread> readers;
  for (size_t i = 0; i < specs.size(); ++i) {
    streams.push_back(Submit(engine, specs[i]));
    readers.emplace_back([&, i] { got[i] = Drain(*streams[i]); });
  }
  for (auto& t : readers) t.join();
  for (size_t i = 0; i < specs.size(); ++i) ExpectSame(got[i], solo[i], "stream " + std::to_string(i));
  // Chunks of 8 rode along with up to 3 decoding streams (11 rows <=
  // kDecodeBatchMax): the equality above covers that path.
  EXPECT_GT(engine.riding_chunks(), 0);
}

// The engine's path equals the pipeline's RunDecode (prefill in one block,
// Generate one token at a time) when the chunk covers the prompt.
TEST_F(BatchDecoderTest, SoloEqualsRunDecode) {
  for (const Spec& s : EightSpecs()) {
    if (s.mode == DecodeMode::kSequential) continue;  // prompts longer than a block are chunked differently
    DecodeStats stats;
    std::vector<TokenEvent> events;
    auto r = RunDecode(
        *model_, nullptr, Input(s), DecodeHooks{},
        [&](const TokenEvent& e) {
          events.push_back(e);
          return true;
        },
        &stats);
    ASSERT_TRUE(r.ok()) << r.status();
    ExpectSame(Alone(s, 256), Outcome{*r, events, {}}, "mode " + std::to_string(static_cast<int>(s.mode)));
  }
}

TEST_F(BatchDecoderTest, ScoreGivesThePromptLogits) {
  DecodeInput in;
  in.prefix_tokens = {5};
  in.contexts.push_back({"", std::vector<int32_t>{10, 11, 12, 13}});
  in.contexts.push_back({"", std::vector<int32_t>{20, 21}});
  in.query_tokens = {30, 31, 32};
  in.dtype = KvDtype::kFloat32;
  DecodeStats stats;
  auto want = PromptLogits(*endless_, nullptr, in, DecodeHooks{}, &stats);
  ASSERT_TRUE(want.ok()) << want.status();
  BatchDecoder engine(*endless_);
  auto decoding = SubmitEndless(engine, 300, 0);  // a stream decoding meanwhile
  auto session = PrepareDecode(*endless_, nullptr, in, 0, DecodeHooks{}, &stats);
  ASSERT_TRUE(session.ok()) << session.status();
  auto stream =
      Submit(engine, {.session = *std::move(session), .generate = {}, .score_only = true, .on_leave = nullptr});
  Outcome o = Drain(*stream);
  EXPECT_TRUE(o.events.empty());
  EXPECT_EQ(o.logits, *want);
  EXPECT_EQ(Drain(*decoding).result.tokens.size(), 300u);
}

// A cancelled stream leaves at once: its admission callback runs, the slot
// goes to a waiting stream, its reason is kCancelled, no tail is flushed.
TEST_F(BatchDecoderTest, CancelFreesTheSlot) {
  BatchDecoder engine(*endless_, {.max_streams = 2, .prefill_chunk = 64});
  std::atomic<int> left{0};
  auto a = SubmitEndless(engine, 100000, 0, [&] { ++left; });
  auto b = SubmitEndless(engine, 100000, 1, [&] { ++left; });
  auto c = SubmitEndless(engine, 5, 2, [&] { ++left; });
  TokenEvent ev;
  ASSERT_EQ(a->Wait(&ev, Clock::now() + std::chrono::seconds(30)), BatchStream::Next::kEvent);
  ASSERT_EQ(b->Wait(&ev, Clock::now() + std::chrono::seconds(30)), BatchStream::Next::kEvent);
  EXPECT_EQ(engine.running(), 2);
  EXPECT_EQ(engine.waiting(), 1);  // c waits for a place
  a->Cancel();
  Outcome oc = Drain(*c);  // c gets a's place and finishes
  EXPECT_EQ(oc.result.tokens.size(), 5u);
  Outcome oa = Drain(*a);
  EXPECT_EQ(oa.result.reason, FinishReason::kCancelled);
  EXPECT_GT(c->engine_queue_ms(), 0);
  EXPECT_EQ(engine.running(), 1);  // b runs on
  b->Cancel();
  Outcome ob = Drain(*b);
  EXPECT_EQ(ob.result.reason, FinishReason::kCancelled);
  EXPECT_GT(ob.result.tokens.size(), oc.result.tokens.size());
  EXPECT_LT(ob.result.tokens.size(), 100000u);
  EXPECT_EQ(left.load(), 3);
  EXPECT_EQ(engine.running(), 0);
}

// Streams still in the engine when it stops end as cancelled.
TEST_F(BatchDecoderTest, StoppingEndsStreams) {
  std::shared_ptr<BatchStream> s;
  {
    BatchDecoder engine(*endless_, {.max_streams = 1});
    s = SubmitEndless(engine, 100000, 0);
    SubmitEndless(engine, 100000, 1);  // never gets in
    TokenEvent ev;
    ASSERT_EQ(s->Wait(&ev, Clock::now() + std::chrono::seconds(30)), BatchStream::Next::kEvent);
  }
  EXPECT_EQ(Drain(*s).result.reason, FinishReason::kCancelled);
}

TEST_F(BatchDecoderTest, RefusesASessionWithNothingToPrefill) {
  BatchDecoder engine(*model_);
  BatchDecoder::Request empty;  // no session at all
  EXPECT_EQ(engine.Submit(std::move(empty)).status().code(), absl::StatusCode::kInvalidArgument);
  BatchDecoder::Request r = Prepare({DecodeMode::kApe, {0}, 4});
  r.session.prefilled = r.session.to_prefill.size();  // claims the prompt is in: no logits to start from
  EXPECT_EQ(engine.Submit(std::move(r)).status().code(), absl::StatusCode::kInvalidArgument);
  // A session laid out for another model.
  BatchDecoder other(*endless_);
  EXPECT_EQ(other.Submit(Prepare({DecodeMode::kApe, {0}, 4})).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ape
