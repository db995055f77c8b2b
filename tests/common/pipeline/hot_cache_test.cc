// The decoder's hot-entry cache: LRU by bytes, entries kept alive while a
// request uses them, many threads at once, and, against a real
// redis-server, that a hit answers exactly what a Redis read answers (and
// only the requests a Redis read would answer).
#include "common/pipeline/hot_cache.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/kv/cache_key.h"
#include "common/pipeline/decode_pipeline.h"
#include "tests/process_util.h"
#include "tests/test_util.h"

namespace ape {
namespace {

// An entry of `bytes` bytes whose content names `key` (the cache never
// parses: only the size and the token ids count).
std::shared_ptr<const KvEntry> Entry(const std::string& key, size_t bytes) {
  std::string b(bytes, '\0');
  for (size_t i = 0; i < bytes; ++i) b[i] = key[i % key.size()];
  return std::make_shared<KvEntry>(std::move(b));
}

TEST(HotCacheTest, EvictsLeastRecentlyUsedByBytes) {
  const size_t overhead = HotCache::Cost(KvEntry("")), unit = 1000, cost = unit + overhead;  // per entry
  HotCache cache(3 * cost);
  cache.Put("a", Entry("a", unit));
  cache.Put("b", Entry("b", unit));
  cache.Put("c", Entry("c", unit));
  EXPECT_EQ(cache.stats().bytes, 3 * cost);
  ASSERT_NE(cache.Get("a"), nullptr);  // a is now the most recent: b is the oldest
  cache.Put("d", Entry("d", unit));
  EXPECT_EQ(cache.Get("b"), nullptr);
  for (const char* k : {"a", "c", "d"}) EXPECT_NE(cache.Get(k), nullptr) << k;
  // A big entry (two units' cost) pushes out as many as it needs, oldest
  // first: a, then c.
  cache.Put("big", Entry("big", 2 * cost - overhead));
  EXPECT_EQ(cache.Get("a"), nullptr);
  EXPECT_EQ(cache.Get("c"), nullptr);
  EXPECT_NE(cache.Get("big"), nullptr);
  EXPECT_LE(cache.stats().bytes, 3 * cost);
  EXPECT_EQ(cache.stats().evictions, 3);
  // Larger than the whole cache: not kept, and nothing else is lost for it.
  cache.Put("huge", Entry("huge", 4 * cost));
  EXPECT_EQ(cache.Get("huge"), nullptr);
  EXPECT_NE(cache.Get("big"), nullptr);
  // Replacing a key counts its new size only.
  cache.Put("big", Entry("big", unit));
  EXPECT_EQ(cache.stats().bytes, 2 * cost);  // d and the new big
  cache.Erase("d");
  EXPECT_EQ(cache.Get("d"), nullptr);
  EXPECT_EQ(cache.stats().bytes, cost);
  // Capacity 0: off.
  HotCache off(0);
  off.Put("a", Entry("a", 1));
  EXPECT_EQ(off.Get("a"), nullptr);
}

TEST(HotCacheTest, EvictedEntryLivesWhileInUse) {
  HotCache cache(2 * (1000 + HotCache::Cost(KvEntry(""))));
  cache.Put("a", Entry("a", 1000));
  std::shared_ptr<const KvEntry> in_use = cache.Get("a");
  std::weak_ptr<const KvEntry> watch = in_use;
  cache.Put("b", Entry("b", 1000));
  cache.Put("c", Entry("c", 1000));  // evicts a
  EXPECT_EQ(cache.Get("a"), nullptr);
  ASSERT_FALSE(watch.expired());  // the request still holds it
  EXPECT_EQ(std::string(in_use->span().begin(), in_use->span().end()), std::string(1000, 'a'));
  in_use.reset();  // the request ends
  EXPECT_TRUE(watch.expired());
  // Replaced while in use: the same.
  std::shared_ptr<const KvEntry> b = cache.Get("b");
  cache.Put("b", Entry("b", 10));
  EXPECT_EQ(b->span().size(), 1000u);
  EXPECT_EQ(cache.Get("b")->span().size(), 10u);
}

// Threads get, put and erase over a small key space with sizes that force
// evictions; every entry read must be one put under its key, intact, and
// the books must balance at the end.
TEST(HotCacheTest, EntriesPastTheirDeadlineAreMisses) {
  HotCache cache(1 << 20);
  const auto now = HotCache::Clock::now();
  cache.Put("old", Entry("o", 10), now - std::chrono::milliseconds(1));
  cache.Put("new", Entry("n", 10), now + std::chrono::hours(1));
  cache.Put("forever", Entry("f", 10));
  EXPECT_EQ(cache.Get("old"), nullptr);
  EXPECT_NE(cache.Get("new"), nullptr);
  EXPECT_NE(cache.Get("forever"), nullptr);
  const HotCache::Stats s = cache.stats();
  EXPECT_EQ(s.expirations, 1);
  EXPECT_EQ(s.misses, 1);
  EXPECT_EQ(s.entries, 2u);  // the expired one is dropped
  EXPECT_EQ(s.bytes, HotCache::Cost(*cache.Get("new")) * 2);
}

TEST(HotCacheTest, ManyThreads) {
  constexpr int kThreads = 8, kKeys = 40, kOps = 20000;
  const size_t capacity = 64 * 1024;
  HotCache cache(capacity);
  std::atomic<int> bad{0};
  std::atomic<int64_t> hits{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::vector<std::shared_ptr<const KvEntry>> held;  // like requests in flight
      for (int i = 0; i < kOps; ++i) {
        const std::string key = "k" + std::to_string(rng() % kKeys);
        const int op = rng() % 10;
        if (op < 6) {
          auto e = cache.Get(key);
          if (e == nullptr) continue;
          ++hits;
          // Content names the key: spot-check the first and last bytes.
          if (e->span().empty() || e->span()[0] != key[0] || e->span().back() != key[(e->span().size() - 1) % key.size()])
            ++bad;
          held.push_back(std::move(e));
          if (held.size() > 4) held.erase(held.begin());
        } else if (op < 9) {
          cache.Put(key, Entry(key, 100 + rng() % 8000));
        } else {
          cache.Erase(key);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(hits.load(), 0);
  const HotCache::Stats s = cache.stats();
  EXPECT_LE(s.bytes, capacity);
  EXPECT_GT(s.evictions, 0);
  // What it holds adds up to what it says it holds.
  size_t total = 0, entries = 0;
  for (int k = 0; k < kKeys; ++k) {
    if (auto e = cache.Get("k" + std::to_string(k))) {
      total += HotCache::Cost(*e);
      ++entries;
    }
  }
  EXPECT_EQ(total, s.bytes);
  EXPECT_EQ(entries, s.entries);
}

// ---- In the decode pipeline, against a real redis-server ---------------------

class HotCachePipelineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = Model::Load(testing::TestData("stories260K.bin"), testing::TestData("tok512.bin"));
    ASSERT_TRUE(m.ok());
    model_ = *std::move(m);
    ASSERT_TRUE(redis_.ok());
    store_ = std::make_unique<RedisStore>(*ParseRedisUri(redis_.uri()));
  }
  std::vector<int32_t> Tok(const std::string& s, bool bos = false) { return model_->tokenizer().Encode(s, bos, false); }
  DecodeInput Input(const std::vector<std::string>& contexts, KvDtype dtype) {
    DecodeInput in;
    in.prefix_tokens = Tok("Once upon a time", true);
    for (const auto& c : contexts) in.contexts.push_back({"", Tok(c)});
    in.query_tokens = Tok("One day, Lily");
    in.temperature = 0.8f;
    in.scale = 0.9f;
    in.dtype = dtype;
    return in;
  }
  std::vector<float> Logits(const DecodeInput& in, HotCache* hot, DecodeStats* st) {
    DecodeHooks hooks;
    hooks.hot_cache = hot;
    auto l = PromptLogits(*model_, store_.get(), in, hooks, st);
    EXPECT_TRUE(l.ok()) << l.status();
    return l.ok() ? *l : std::vector<float>();
  }
  std::unique_ptr<Model> model_;
  testing::RedisServer redis_;
  std::unique_ptr<RedisStore> store_;
};

TEST_F(HotCachePipelineTest, HitAnswersLikeARedisRead) {
  const std::vector<std::string> docs = {" Lily had a red ball.", " Tom liked to run in the park with his big dog.",
                                         " The sun was hot."};
  for (KvDtype dtype : {KvDtype::kFloat16, KvDtype::kFloat32, KvDtype::kInt8}) {
    SCOPED_TRACE(KvDtypeName(dtype));
    DecodeInput in = Input(docs, dtype);
    // Encoded into Redis by a first request without a hot cache.
    DecodeStats st0;
    Logits(in, nullptr, &st0);
    // Read from Redis (and put in the hot cache), then served by it.
    HotCache hot(size_t{16} << 20);
    DecodeStats from_redis, from_hot;
    std::vector<float> a = Logits(in, &hot, &from_redis);
    EXPECT_EQ(from_redis.hot_cache_tokens, 0);
    EXPECT_EQ(from_redis.encoded_tokens, 0);
    EXPECT_EQ(hot.stats().entries, docs.size() + 1);
    // Redis goes away: a hit does not need it.
    std::vector<float> b = Logits(in, &hot, &from_hot);
    EXPECT_EQ(from_hot.hot_cache_tokens, from_redis.cached_tokens);
    EXPECT_EQ(from_hot.cached_tokens, from_redis.cached_tokens);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], b[i]) << i;  // the same bytes: bit-identical
    ASSERT_EQ(std::system(("redis-cli -p " + std::to_string(redis_.port()) + " FLUSHALL >/dev/null").c_str()), 0);
    DecodeStats no_redis;
    std::vector<float> c = Logits(in, &hot, &no_redis);
    EXPECT_EQ(no_redis.encoded_tokens, 0);
    for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], c[i]) << i;
  }
}

// An entry read from a key with a TTL stays hot no longer than Redis keeps
// the key: after it, a request naming the key only by its name gets what
// Redis says (NOT_FOUND), not the hot copy.
TEST_F(HotCachePipelineTest, ExpiresWithItsRedisKey) {
  HotCache hot(size_t{16} << 20);
  DecodeInput in = Input({" Lily had a red ball."}, KvDtype::kFloat32);
  in.ttl_seconds = 1;
  DecodeStats st;
  Logits(in, &hot, &st);  // encoded with a 1 s TTL, read back (PTTL too), put in the hot cache
  Logits(in, &hot, &st);
  ASSERT_GT(st.hot_cache_tokens, 0);
  const std::string context_key = RedisKeyFor(ComputeKvKey(FingerprintBytes(*model_), KvDtype::kFloat32,
                                                           KvKind::kContext, in.prefix_tokens, *in.contexts[0].tokens));
  DecodeInput by_key = Input({}, KvDtype::kFloat32);
  by_key.contexts.push_back({context_key, std::nullopt});
  DecodeHooks hooks;
  hooks.hot_cache = &hot;
  DecodeStats s;
  ASSERT_TRUE(PromptLogits(*model_, store_.get(), by_key, hooks, &s).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  auto r = PromptLogits(*model_, store_.get(), by_key, hooks, &s);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  EXPECT_GE(hot.stats().expirations, 1);
}

// A hot entry is checked against each request like a Redis read: a context
// key made after another prefix, named by a request with this prefix, is
// refused from the hot cache as it is from Redis.
TEST_F(HotCachePipelineTest, HotEntryOnlyAnswersWhatRedisWould) {
  HotCache hot(size_t{16} << 20);
  DecodeInput in = Input({" Lily had a red ball."}, KvDtype::kFloat32);
  DecodeStats st;
  Logits(in, &hot, &st);  // encoded, read back, put in the hot cache
  Logits(in, &hot, &st);
  ASSERT_GT(st.hot_cache_tokens, 0);
  const std::string context_key = RedisKeyFor(ComputeKvKey(FingerprintBytes(*model_), KvDtype::kFloat32,
                                                           KvKind::kContext, in.prefix_tokens, *in.contexts[0].tokens));
  for (bool with_hot : {false, true}) {
    DecodeInput other = Input({}, KvDtype::kFloat32);
    other.prefix_tokens = Tok("Once upon a time there", true);
    other.contexts.push_back({context_key, std::nullopt});
    DecodeHooks hooks;
    hooks.hot_cache = with_hot ? &hot : nullptr;
    DecodeStats s;
    auto r = PromptLogits(*model_, store_.get(), other, hooks, &s);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << with_hot << " " << r.status();
  }
  // The same key in a request asking float16 is refused too (dtype).
  DecodeInput f16 = Input({}, KvDtype::kFloat16);
  f16.contexts.push_back({context_key, std::nullopt});
  DecodeHooks hooks;
  hooks.hot_cache = &hot;
  DecodeStats s;
  EXPECT_EQ(PromptLogits(*model_, store_.get(), f16, hooks, &s).status().code(), absl::StatusCode::kFailedPrecondition);
}

// Concurrent requests over overlapping documents through one small hot
// cache (entries evicted while other requests use them): every answer is the
// one a request gets alone, straight from Redis.
TEST_F(HotCachePipelineTest, ConcurrentRequestsShareEntries) {
  const std::vector<std::string> docs = {" Lily had a red ball.", " Tom liked to run.", " The sun was hot.",
                                         " Mom made a cake.", " A cat sat on the mat."};
  std::vector<DecodeInput> inputs;
  std::vector<std::vector<float>> want;
  for (size_t i = 0; i < docs.size(); ++i) {
    inputs.push_back(Input({docs[i], docs[(i + 1) % docs.size()], docs[(i + 3) % docs.size()]}, KvDtype::kFloat16));
    DecodeStats st;
    want.push_back(Logits(inputs.back(), nullptr, &st));  // encodes into Redis
  }
  // Room for about three entries: constant eviction.
  HotCache hot(3 * (HotCache::Cost(KvEntry("")) + 8 * 1024));
  std::atomic<int> wrong{0}, failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 12; ++i) {
        const size_t which = (t + i) % inputs.size();
        DecodeHooks hooks;
        hooks.hot_cache = &hot;
        DecodeStats st;
        auto l = PromptLogits(*model_, store_.get(), inputs[which], hooks, &st);
        if (!l.ok()) {
          ++failed;
          continue;
        }
        for (size_t k = 0; k < l->size(); ++k)
          if ((*l)[k] != want[which][k]) {
            ++wrong;
            break;
          }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(hot.stats().hits, 0);
  EXPECT_GT(hot.stats().evictions, 0);
}

}  // namespace
}  // namespace ape
