// The transformer against llama2.c's greedy goldens and logits, plus the
// properties APE relies on: positions are data, blocks equal single steps.
#include "common/engine/transformer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "common/engine/generate.h"
#include "common/engine/gguf.h"
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

// ForwardBatch: B streams, each with its own cache, positions (APE reuses
// them: slot != position) and attention (an APE block, or none), advanced
// in one call by one token (a decode row) or a few (a prompt chunk riding
// along). Each stream must get exactly what Forward gives for its tokens
// alone: the caches the same K/V and positions, the last token the same
// logits (MatMul's rows do not depend on how many run together up to
// kDecodeBatchMax; norms, RoPE and attention run per stream). Run on
// llama2.c (interleaved RoPE), qwen2 (biases), qwen3 (head norms) in
// float32 and Q8_0.
TEST(ForwardBatchTest, StreamsEqualForwardAlone) {
  const std::vector<std::pair<std::string, std::string>> models = {
      {"stories260K.bin", "tok512.bin"},
      {"families/models/tiny-random-qwen2-F32.gguf", ""},
      {"families/models/tiny-random-qwen3-Q8_0.gguf", ""},
  };
  for (const auto& [file, tok] : models) {
    SCOPED_TRACE(file);
    auto m = Model::Load(TestData(file), tok.empty() ? "" : TestData(tok));
    ASSERT_TRUE(m.ok()) << m.status();
    const Model& model = **m;
    const int V = model.config().vocab_size;
    constexpr int kStreams = 5;
    // Stream s: a prompt of 3 + s tokens at positions starting 10 * s, the
    // middle ones an APE block with T and S depending on s.
    std::vector<std::unique_ptr<KvCache>> solo, batched;
    std::vector<ApeParams> ape(kStreams);
    std::vector<float> scratch(V);
    Transformer tf(model);
    for (int s = 0; s < kStreams; ++s) {
      std::vector<int32_t> prompt, pos;
      for (int i = 0; i < 3 + s; ++i) {
        prompt.push_back((7 + 13 * s + 5 * i) % V);
        pos.push_back(10 * s + (i == 2 + s ? 1 : i));  // the last token reuses position 10s+1
      }
      if (s % 2 == 1)
        ape[s] = {.context_begin = 1, .context_end = 2 + s, .temperature = 0.5f + 0.1f * s, .scale = 0.8f};
      for (auto* caches : {&solo, &batched}) {
        caches->push_back(std::make_unique<KvCache>(model.config(), 16));
        tf.Forward(prompt, pos, *caches->back(), ape[s], scratch.data());
      }
    }
    for (int b : {1, kStreams}) {
      std::vector<Transformer::StreamTokens> rows;
      std::vector<std::vector<int32_t>> tokens(b), positions(b);
      std::vector<float> want(static_cast<size_t>(b) * V), got(static_cast<size_t>(b) * V);
      for (int s = 0; s < b; ++s) {
        for (int t = 0; t <= (s + b) % 3; ++t) {  // 1 to 3 tokens
          tokens[s].push_back((31 * s + 7 * t + 3) % V);
          positions[s].push_back(40 + s + t);
        }
        tf.Forward(tokens[s], positions[s], *solo[s], ape[s], &want[static_cast<size_t>(s) * V]);
        rows.push_back({.tokens = tokens[s], .positions = positions[s], .cache = batched[s].get(), .ape = &ape[s]});
      }
      tf.ForwardBatch(rows, got.data());
      for (int s = 0; s < b; ++s) {
        SCOPED_TRACE(::testing::Message() << "stream " << s << " of " << b);
        const KvCache &a = *solo[s], &c = *batched[s];
        ASSERT_EQ(a.size, c.size);
        for (int slot = 0; slot < a.size; ++slot) {
          ASSERT_EQ(a.pos[slot], c.pos[slot]);
          for (int l = 0; l < model.config().n_layers; ++l) {
            ASSERT_EQ(0, std::memcmp(a.key(l, slot), c.key(l, slot), sizeof(float) * a.kv_dim)) << "slot " << slot;
            ASSERT_EQ(0, std::memcmp(a.value(l, slot), c.value(l, slot), sizeof(float) * a.kv_dim)) << "slot " << slot;
          }
        }
        EXPECT_EQ(0,
                  std::memcmp(&want[static_cast<size_t>(s) * V], &got[static_cast<size_t>(s) * V], sizeof(float) * V));
      }
    }
  }
}

// NEOX RoPE rotates pairs (i, i + d/2) where interleaved RoPE rotates
// (2i, 2i+1): the same rotation of permuted dimensions. So permuting every Q
// and K head (rows of wq/wk, and bq/bk and the head norms) into interleaved
// order and switching the style must leave the logits unchanged; llama.cpp's
// converter applies this permutation to Llama's Q/K. Checked on the qwen2
// fixture (biases) and the qwen3 one (head norms).
TEST(RopeStyleTest, NeoxEqualsInterleavedOfPermutedHeads) {
  for (const char* name : {"tiny-random-qwen2-F32", "tiny-random-qwen3-F32"}) {
    const std::string bytes = ReadAll(TestData(std::string("families/models/") + name + ".gguf"));
    auto g = GgufFile::Parse({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}, name);
    ASSERT_TRUE(g.ok()) << g.status();
    auto parts = LoadGgufModelParts(*g);
    ASSERT_TRUE(parts.ok()) << parts.status();
    ModelConfig c = parts->config;
    ASSERT_EQ(c.rope_style, RopeStyle::kNeox);
    ASSERT_EQ(c.rope_dim, c.head_dim);
    const int hd = c.head_dim, half = hd / 2;
    // Rows of `m` ([heads*hd][cols]): interleaved row 2i+j <- NEOX row i+j*half.
    auto permute = [&](const std::vector<float>& m, int cols) {
      std::vector<float> out(m.size());
      for (size_t h = 0; h < m.size() / (static_cast<size_t>(hd) * cols); ++h)
        for (int i = 0; i < half; ++i)
          for (int j = 0; j < 2; ++j)
            std::copy_n(&m[(h * hd + i + j * half) * cols], cols, &out[(h * hd + 2 * i + j) * cols]);
      return out;
    };
    ModelWeights w = parts->weights;
    auto permute_matrix = [&](const WeightMatrix& m) {
      return WeightMatrix::FromFloats(permute(m.ToFloats(), m.cols), m.rows, m.cols);
    };
    for (LayerWeights& l : w.layers) {
      l.wq = permute_matrix(l.wq);
      l.wk = permute_matrix(l.wk);
      if (c.qkv_bias) {
        l.bq = permute(l.bq, 1);
        l.bk = permute(l.bk, 1);
      }
      if (c.qk_norm) {
        l.q_norm = permute(l.q_norm, 1);
        l.k_norm = permute(l.k_norm, 1);
      }
    }
    auto neox = Model::FromParts(c, parts->weights, Tokenizer(), "neox");
    c.rope_style = RopeStyle::kInterleaved;
    auto interleaved = Model::FromParts(c, std::move(w), Tokenizer(), "interleaved");
    const std::vector<int32_t> tokens = {1, 300, 7, 42, 511, 260, 99, 13};
    const std::vector<int32_t> positions = {0, 1, 2, 3, 4, 5, 6, 200};  // a gap: large angles too
    const int V = c.vocab_size;
    std::vector<float> a(tokens.size() * V), b(tokens.size() * V);
    Transformer ta(*neox), tb(*interleaved);
    KvCache ca(c, 8), cb(c, 8);
    ta.Forward(tokens, positions, ca, ApeParams{}, a.data(), /*all_logits=*/true);
    tb.Forward(tokens, positions, cb, ApeParams{}, b.data(), /*all_logits=*/true);
    float diff = 0;
    for (size_t i = 0; i < a.size(); ++i) diff = std::max(diff, std::abs(a[i] - b[i]));
    EXPECT_LT(diff, 1e-5f) << name;
    // And the style matters: the unpermuted weights with interleaved RoPE differ.
    auto wrong = Model::FromParts(c, parts->weights, Tokenizer(), "wrong");
    Transformer tw(*wrong);
    KvCache cw(c, 8);
    tw.Forward(tokens, positions, cw, ApeParams{}, b.data(), /*all_logits=*/true);
    diff = 0;
    for (size_t i = 0; i < a.size(); ++i) diff = std::max(diff, std::abs(a[i] - b[i]));
    EXPECT_GT(diff, 1e-2f) << name;
  }
}

}  // namespace
}  // namespace ape
