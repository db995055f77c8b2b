// The decode pipeline in process: the special cases of APE.md section 3 on
// the real stories260K model (no store: contexts encoded in memory), and the
// loading path against a private redis-server (hooks, limits, checks before
// any I/O).
#include "common/pipeline/decode_pipeline.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/engine/sampler.h"
#include "common/kv/cache_key.h"
#include "tests/process_util.h"
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
    auto l = PromptLogits(*model_, nullptr, in, DecodeHooks{}, &st);
    EXPECT_TRUE(l.ok()) << l.status();
    return LogSoftmax(*l);
  }
  GenerateResult Greedy(DecodeInput in, int n, std::vector<float>* logprobs) {
    in.generate.max_tokens = n;
    DecodeStats st;
    auto r = RunDecode(
        *model_, nullptr, in, DecodeHooks{},
        [&](const TokenEvent& e) {
          if (e.id >= 0) logprobs->push_back(e.logprob);
          return true;
        },
        &st);
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
  auto r = RunDecode(
      *model_, nullptr, in, DecodeHooks{}, [](const TokenEvent&) { return true; }, &st);
  ASSERT_TRUE(r.ok());
  const int want =
      in.prefix_tokens.size() + in.contexts[0].tokens->size() + in.contexts[1].tokens->size() + in.query_tokens.size();
  EXPECT_EQ(st.prompt_tokens, want);
  EXPECT_EQ(st.cached_tokens, 0);  // no store: everything encoded here
  EXPECT_EQ(st.encoded_tokens, want - static_cast<int>(in.query_tokens.size()));
  EXPECT_EQ(r->tokens.size(), 3u);
}

// Validation comes before any I/O: a store nobody listens on is never asked.
TEST_F(DecodePipelineTest, InvalidInputIsRefusedBeforeTheStore) {
  RedisConfig nowhere;
  nowhere.port = testing::FreePort();
  RedisStore down(nowhere);
  DecodeInput in = Input(DecodeMode::kApe, {" Lily had a red ball."}, 0.9f, 0.9f);
  in.contexts.push_back({"ape:v1:kv:00112233445566778899aabbccddeeff", std::nullopt});
  DecodeStats st;
  EXPECT_EQ(PromptLogits(*model_, &down, in, DecodeHooks{}, &st).status().code(), absl::StatusCode::kUnavailable);
  for (DecodeMode mode : {DecodeMode::kApe, DecodeMode::kParallel, DecodeMode::kSequential}) {
    DecodeInput bad = in;
    bad.mode = mode;
    bad.query_tokens.clear();
    auto s = PromptLogits(*model_, &down, bad, DecodeHooks{}, &st);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << s.status();
    EXPECT_NE(s.status().message().find("query is empty"), std::string::npos) << s.status();
    auto r = RunDecode(
        *model_, &down, bad, DecodeHooks{}, [](const TokenEvent&) { return true; }, &st);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  }
  DecodeInput bad = in;
  bad.contexts[0].tokens->clear();
  EXPECT_EQ(PromptLogits(*model_, &down, bad, DecodeHooks{}, &st).status().code(), absl::StatusCode::kInvalidArgument);
  bad = in;
  bad.contexts[1].key = "not-a-key";
  EXPECT_EQ(PromptLogits(*model_, &down, bad, DecodeHooks{}, &st).status().code(), absl::StatusCode::kInvalidArgument);
}

// PromptLogits is RunDecode's path up to the first token: the same
// distribution, the same hooks (cancellation, encoding through
// remote_encode) and the same limits.
class DecodePipelineStoreTest : public DecodePipelineTest {
 protected:
  void SetUp() override {
    DecodePipelineTest::SetUp();
    ASSERT_TRUE(redis_.ok());
    store_ = std::make_unique<RedisStore>(*ParseRedisUri(redis_.uri()));
  }
  // Encodes two contexts after "Once upon a time" (float32) into the store:
  // enc_ is the request, prefix_key_ and keys_ the keys it got.
  void EncodeTwoContexts(KvDtype dtype = KvDtype::kFloat32) {
    enc_.prefix_tokens = Tok("Once upon a time", true);
    enc_.contexts = {Tok(" Lily had a red ball."), Tok(" Tom liked to run in the park with his big dog.")};
    enc_.dtype = dtype;
    auto out = EncodeContexts(*model_, *store_, enc_);
    ASSERT_TRUE(out.ok()) << out.status();
    prefix_key_ = out->prefix.key;
    keys_.clear();
    for (const auto& c : out->contexts) keys_.push_back(c.key);
  }
  // `in` runs with max_kv_slots = need and is refused (RESOURCE_EXHAUSTED,
  // returned) with need - 1.
  absl::Status ExpectKvSlotLimitIs(DecodeInput in, int64_t need) {
    const auto run = [&] {
      DecodeStats st;
      return RunDecode(
          *model_, store_.get(), in, DecodeHooks{}, [](const TokenEvent&) { return true; }, &st);
    };
    in.max_kv_slots = need;
    auto ok = run();
    EXPECT_TRUE(ok.ok()) << ok.status();
    in.max_kv_slots = need - 1;
    auto over = run();
    EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
    return over.status();
  }
  // An APE request over the encoded contexts, by key.
  DecodeInput ByKey(float T, float S) {
    DecodeInput in = Input(DecodeMode::kApe, {}, T, S);
    for (const auto& k : keys_) in.contexts.push_back({k, std::nullopt});
    return in;
  }

  testing::RedisServer redis_;
  std::unique_ptr<RedisStore> store_;
  EncodeInput enc_;
  std::string prefix_key_;
  std::vector<std::string> keys_;
};

TEST_F(DecodePipelineStoreTest, PromptLogitsSharesRunDecodesHooks) {
  DecodeInput in = Input(DecodeMode::kApe, {" Lily had a red ball.", " Tom ran."}, 0.8f, 0.9f);
  int remote_calls = 0;
  DecodeHooks hooks;
  hooks.remote_encode = [&](const EncodeInput& e) {
    ++remote_calls;
    return EncodeContexts(*model_, *store_, e).status();
  };
  DecodeStats first;
  auto logits = PromptLogits(*model_, store_.get(), in, hooks, &first);
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_EQ(remote_calls, 1);
  EXPECT_EQ(first.cached_tokens, 0);
  EXPECT_GT(first.encoded_tokens, 0);
  // Now cached: read back, nothing encoded, and RunDecode's first token has
  // the same log-probability.
  std::vector<float> lp;
  in.generate.max_tokens = 1;
  DecodeStats second;
  auto r = RunDecode(
      *model_, store_.get(), in, hooks,
      [&](const TokenEvent& e) {
        if (e.id >= 0) lp.push_back(e.logprob);
        return true;
      },
      &second);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(remote_calls, 1);
  EXPECT_EQ(second.cached_tokens, first.encoded_tokens);
  EXPECT_EQ(second.encoded_tokens, 0);
  ASSERT_EQ(lp.size(), 1u);
  EXPECT_NEAR(LogSoftmax(*logits)[r->tokens[0]], lp[0], 1e-4f);
  // Cancellation is checked on both paths.
  hooks.cancelled = [] { return true; };
  EXPECT_EQ(PromptLogits(*model_, store_.get(), in, hooks, &second).status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(RunDecode(
                *model_, store_.get(), in, hooks, [](const TokenEvent&) { return true; }, &second)
                .status()
                .code(),
            absl::StatusCode::kCancelled);
  DecodeInput fresh = Input(DecodeMode::kApe, {" A new story about a cat."}, 0.8f, 0.9f);
  EXPECT_EQ(PromptLogits(*model_, store_.get(), fresh, hooks, &second).status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(remote_calls, 1);  // cancelled before encoding
}

// Key-only contexts are measured once loaded: max_kv_slots holds for them too.
TEST_F(DecodePipelineStoreTest, KvSlotLimitAppliesToContextsGivenByKey) {
  ASSERT_NO_FATAL_FAILURE(EncodeTwoContexts());
  const EncodeInput& enc = enc_;
  DecodeInput in = ByKey(0.9f, 0.9f);
  in.generate.max_tokens = 4;
  const int64_t need =
      enc.prefix_tokens.size() + enc.contexts[0].size() + enc.contexts[1].size() + in.query_tokens.size() + 4;
  for (DecodeMode mode : {DecodeMode::kApe, DecodeMode::kSequential}) {
    in.mode = mode;
    ExpectKvSlotLimitIs(in, need).IgnoreError();  // (its expectations are the check)
  }
}

// Float16 and int8 entries are used in place at half the bytes of float32
// slots or less, so the budget (in float32 slots) counts them half; computed
// slots count whole.
TEST_F(DecodePipelineStoreTest, KvSlotLimitCountsFloat16AndInt8EntriesHalf) {
  for (KvDtype dtype : {KvDtype::kFloat16, KvDtype::kInt8}) {
    ASSERT_NO_FATAL_FAILURE(EncodeTwoContexts(dtype));
    const EncodeInput& enc = enc_;
    DecodeInput in = ByKey(0.9f, 0.9f);
    in.dtype = dtype;
    in.generate.max_tokens = 4;
    const int64_t cached = enc.prefix_tokens.size() + enc.contexts[0].size() + enc.contexts[1].size();
    const int64_t need = (cached + 1) / 2 + in.query_tokens.size() + 4;
    const absl::Status over = ExpectKvSlotLimitIs(in, need);
    EXPECT_NE(over.message().find("half"), std::string::npos) << over;
  }
}

// int8 entries (a byte a value and a scale per head, kv_cache.h) answer as
// float32 ones do, within their rounding: the same greedy tokens, and a
// next-token distribution within KL 1e-3 and total variation 0.02 of
// float32's (this model's heads are 8 wide, so a scale covers only 8
// values), yet not the very same numbers (they were read as int8).
TEST_F(DecodePipelineStoreTest, Int8EntriesAnswerAsFloat32OnesWithinRounding) {
  std::vector<std::vector<float>> logits;
  std::vector<std::vector<int32_t>> tokens;
  for (KvDtype dtype : {KvDtype::kFloat32, KvDtype::kInt8}) {
    ASSERT_NO_FATAL_FAILURE(EncodeTwoContexts(dtype));
    DecodeInput in = ByKey(0.8f, 0.9f);
    in.dtype = dtype;
    DecodeStats st;
    auto l = PromptLogits(*model_, store_.get(), in, DecodeHooks{}, &st);
    ASSERT_TRUE(l.ok()) << l.status();
    EXPECT_GT(st.cached_tokens, 0);
    EXPECT_EQ(st.encoded_tokens, 0);
    logits.push_back(LogSoftmax(*l));
    in.generate.max_tokens = 12;
    auto r = RunDecode(
        *model_, store_.get(), in, DecodeHooks{}, [](const TokenEvent&) { return true; }, &st);
    ASSERT_TRUE(r.ok()) << r.status();
    tokens.push_back(r->tokens);
  }
  float worst = 0.f, kl = 0.f, tv = 0.f;
  for (size_t i = 0; i < logits[0].size(); ++i) {
    worst = std::max(worst, std::abs(logits[0][i] - logits[1][i]));
    const float p = std::exp(logits[0][i]), q = std::exp(logits[1][i]);
    kl += p * (logits[0][i] - logits[1][i]);
    tv += 0.5f * std::abs(p - q);
  }
  EXPECT_GT(worst, 0.f);  // read as int8, not as float32
  EXPECT_LT(kl, 1e-3f);   // measured 1.9e-4 (float16 entries: 1e-7)
  EXPECT_LT(tv, 0.02f);   // measured 0.009
  EXPECT_EQ(tokens[0], tokens[1]);
}

// Key-only contexts are measured once loaded: max_positions holds for them too
// (APE: prefix + longest context + query + generated; SEQUENTIAL: all of it).
TEST_F(DecodePipelineStoreTest, PositionLimitAppliesToContextsGivenByKey) {
  ASSERT_NO_FATAL_FAILURE(EncodeTwoContexts());
  const EncodeInput& enc = enc_;
  DecodeInput in = ByKey(0.9f, 0.9f);
  // The same key twice: read once, used twice.
  in.contexts.push_back(in.contexts.back());
  in.generate.max_tokens = 4;
  const int64_t lp = enc.prefix_tokens.size(), lq = in.query_tokens.size();
  const int64_t longest = std::max(enc.contexts[0].size(), enc.contexts[1].size());
  const int64_t all = enc.contexts[0].size() + 2 * enc.contexts[1].size();
  for (auto [mode, span] :
       {std::pair{DecodeMode::kApe, lp + longest + lq + 4}, std::pair{DecodeMode::kSequential, lp + all + lq + 4}}) {
    in.mode = mode;
    in.max_positions = span;
    DecodeStats st;
    auto ok = RunDecode(
        *model_, store_.get(), in, DecodeHooks{}, [](const TokenEvent&) { return true; }, &st);
    EXPECT_TRUE(ok.ok()) << ok.status();
    in.max_positions = span - 1;
    auto over = RunDecode(
        *model_, store_.get(), in, DecodeHooks{}, [](const TokenEvent&) { return true; }, &st);
    EXPECT_EQ(over.status().code(), absl::StatusCode::kInvalidArgument) << over.status();
  }
}

// ---- Untrusted store: anyone who can write to Redis ---------------------------
// Entries are checked against the request, the model and the key they were
// read from; what cannot be used is never copied, never answered from, never
// deleted; our own damaged entries are rewritten by the next request that
// has their content.
class UntrustedStoreTest : public DecodePipelineStoreTest {
 protected:
  void SetUp() override {
    DecodePipelineStoreTest::SetUp();
    ASSERT_NO_FATAL_FAILURE(EncodeTwoContexts());
  }
  // The request over both contexts by text, and its logits computed with no
  // store at all (the answer a healthy system gives).
  DecodeInput ByText() {
    DecodeInput in = Input(DecodeMode::kApe, {}, 0.8f, 0.9f);
    for (const auto& c : enc_.contexts) in.contexts.push_back({"", c});
    return in;
  }
  void ExpectHealthyAnswer(const DecodeInput& in) {
    DecodeStats st;
    auto got = PromptLogits(*model_, store_.get(), in, DecodeHooks{}, &st);
    ASSERT_TRUE(got.ok()) << got.status();
    std::vector<float> want = Logits(in), have = LogSoftmax(*got);
    float max_diff = 0;
    for (size_t i = 0; i < want.size(); ++i) max_diff = std::max(max_diff, std::abs(want[i] - have[i]));
    EXPECT_LT(max_diff, 1e-4f);
  }
  // A sealed block (valid checksum) with the given header and tokens, KV
  // from `cache` slots [0, n).
  std::string Seal(KvKind kind, const std::vector<int32_t>& tokens, const KvCache& cache, uint32_t first_position) {
    KvBlockHeader h;
    h.model_fingerprint = FingerprintBytes(*model_);
    h.n_layers = model_->config().n_layers;
    h.n_kv_heads = model_->config().n_kv_heads;
    h.head_dim = model_->config().head_dim;
    h.dtype = KvDtype::kFloat32;
    h.kind = kind;
    h.num_tokens = tokens.size();
    h.first_position = first_position;
    h.prefix_key = *ParseRedisKey(prefix_key_);
    return SerializeKvBlock(h, tokens, cache, 0);
  }
  // Parses what `key` holds now (it must be a KV block).
  KvBlockView Stored(const std::string& key) {
    auto got = store_->Read({key});
    EXPECT_TRUE(got.ok() && (*got)[0].state == StoredValue::State::kFound) << key;
    held_ = got.ok() ? (*got)[0].value : "";
    auto view = ParseKvBlock({reinterpret_cast<const uint8_t*>(held_.data()), held_.size()});
    EXPECT_TRUE(view.ok()) << view.status();
    return view.ok() ? *view : KvBlockView{};
  }
  void Cli(const std::vector<std::string>& args) {
    std::string cmd = "redis-cli -p " + std::to_string(redis_.port());
    for (const auto& a : args) cmd += " " + a;
    ASSERT_EQ(std::system((cmd + " >/dev/null").c_str()), 0) << cmd;
  }

  std::string held_;
};

// A prefix entry re-sealed with a header claiming 300 tokens (checksum
// recomputed) used to overflow the request's cache. Now it is refused before
// any copy, the answer is right, and the entry is rewritten.
TEST_F(UntrustedStoreTest, ForgedPrefixLengthIsNeverCopied) {
  KvCache junk(model_->config(), 300);
  std::fill(junk.k.begin(), junk.k.end(), 0.5f);
  std::fill(junk.v.begin(), junk.v.end(), 0.5f);
  std::vector<int32_t> tokens(300, enc_.prefix_tokens.back());
  std::copy(enc_.prefix_tokens.begin(), enc_.prefix_tokens.end(), tokens.begin());
  ASSERT_TRUE(store_->Put(prefix_key_, Seal(KvKind::kPrefix, tokens, junk, 0), 0).ok());
  ExpectHealthyAnswer(ByText());
  EXPECT_EQ(Stored(prefix_key_).header.num_tokens, enc_.prefix_tokens.size());  // repaired
  // Contexts by key after the prefix was forged again: still no copy.
  ASSERT_TRUE(store_->Put(prefix_key_, Seal(KvKind::kPrefix, tokens, junk, 0), 0).ok());
  DecodeInput by_key = ByKey(0.8f, 0.9f);
  DecodeStats st;
  EXPECT_TRUE(PromptLogits(*model_, store_.get(), by_key, DecodeHooks{}, &st).ok());
}

// COPY <key of doc2> <key of doc1>: requests naming doc1 must not be
// answered from doc2's entry, by key or by text.
TEST_F(UntrustedStoreTest, CopiedEntryIsNotTheOneItsKeyNames) {
  Cli({"COPY", keys_[1], keys_[0], "REPLACE"});
  DecodeInput by_key = Input(DecodeMode::kApe, {}, 0.8f, 0.9f);
  by_key.contexts.push_back({keys_[0], std::nullopt});
  DecodeStats st;
  for (DecodeMode mode : {DecodeMode::kApe, DecodeMode::kSequential}) {
    by_key.mode = mode;
    auto r = PromptLogits(*model_, store_.get(), by_key, DecodeHooks{}, &st);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
    EXPECT_NE(r.status().message().find("not the one its key"), std::string::npos) << r.status();
  }
  ExpectHealthyAnswer(ByText());
  EXPECT_EQ(Stored(keys_[0]).tokens, enc_.contexts[0]);  // repaired
}

// A checksum-valid entry whose payload holds a NaN is corrupt.
TEST_F(UntrustedStoreTest, NonFinitePayloadIsCorrupt) {
  KvCache cache(model_->config(), enc_.contexts[0].size());
  std::fill(cache.k.begin(), cache.k.end(), 0.25f);
  std::fill(cache.v.begin(), cache.v.end(), 0.25f);
  cache.v[7] = std::nanf("");
  ASSERT_TRUE(
      store_->Put(keys_[0], Seal(KvKind::kContext, enc_.contexts[0], cache, enc_.prefix_tokens.size()), 0).ok());
  ExpectHealthyAnswer(ByText());
  EXPECT_EQ(Stored(keys_[0]).tokens, enc_.contexts[0]);  // repaired with the real KV
}

// What is not ours (another Redis type; a newer format version) is never
// deleted or overwritten by a decoder: it answers from memory instead.
TEST_F(UntrustedStoreTest, ValuesThatAreNotOursAreLeftAlone) {
  Cli({"DEL", keys_[0]});
  Cli({"SET", keys_[0], "somebody-elses-value"});
  Stored(keys_[1]);
  std::string newer = held_;
  const uint32_t version2 = 2;
  std::memcpy(newer.data() + 8, &version2, 4);  // the version field follows the 8-byte magic
  ASSERT_TRUE(store_->Put(keys_[1], newer, 0).ok());
  ExpectHealthyAnswer(ByText());
  auto after = store_->Read({keys_[0], keys_[1]});
  ASSERT_TRUE(after.ok());
  EXPECT_EQ((*after)[0].state, StoredValue::State::kOtherType);
  EXPECT_EQ((*after)[1].state, StoredValue::State::kFound);
  EXPECT_EQ((*after)[1].value, newer);
}

// A stray field in an entry's hash makes it unreadable; the next request by
// text rewrites it instead of re-encoding it forever.
TEST_F(UntrustedStoreTest, StrayHashFieldIsRepaired) {
  Cli({"HSET", keys_[0], "junk", "x"});
  ExpectHealthyAnswer(ByText());
  EXPECT_EQ(Stored(keys_[0]).tokens, enc_.contexts[0]);
  DecodeStats st;
  ASSERT_TRUE(PromptLogits(*model_, store_.get(), ByText(), DecodeHooks{}, &st).ok());
  EXPECT_EQ(st.encoded_tokens, 0);  // served from the cache now
}

}  // namespace
}  // namespace ape
