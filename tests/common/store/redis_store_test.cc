// RedisStore against a real redis-server on a private port.
#include "common/store/redis_store.h"

#include <gtest/gtest.h>

#include <set>

#include <chrono>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "tests/process_util.h"

namespace ape {
namespace {

using ::ape::testing::RedisServer;

// Runs one redis-cli command against `r` (arguments without shell quoting).
void RedisCli(const RedisServer& r, const std::vector<std::string>& args) {
  std::string cmd = "redis-cli -p " + std::to_string(r.port());
  for (const std::string& a : args) cmd += " " + a;
  ASSERT_EQ(std::system((cmd + " >/dev/null").c_str()), 0) << cmd;
}

RedisConfig ConfigFor(const RedisServer& r, size_t chunk = size_t{64} << 20) {
  auto c = ParseRedisUri(r.uri());
  EXPECT_TRUE(c.ok());
  c->chunk_bytes = chunk;
  c->command_timeout_ms = 2000;
  return *c;
}

TEST(RedisUriTest, Parses) {
  auto c = ParseRedisUri("redis://alice:p%40ss@db.example:6380/3");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->user, "alice");
  EXPECT_EQ(c->password, "p@ss");
  EXPECT_EQ(c->host, "db.example");
  EXPECT_EQ(c->port, 6380);
  EXPECT_EQ(c->db, 3);
  c = ParseRedisUri("redis://:secret@[::1]:7000");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->password, "secret");
  EXPECT_EQ(c->host, "::1");
  EXPECT_EQ(c->port, 7000);
  c = ParseRedisUri("unix:///tmp/r.sock?db=2");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->unix_socket, "/tmp/r.sock");
  EXPECT_EQ(c->db, 2);
  EXPECT_FALSE(ParseRedisUri("http://x").ok());
  EXPECT_FALSE(ParseRedisUri("redis://h:99999").ok());
  EXPECT_FALSE(ParseRedisUri("redis://h/x").ok());
}

TEST(RedisStoreTest, PutGetExistsDeleteAndChunking) {
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  RedisStore store(ConfigFor(redis, /*chunk=*/1000));  // tiny chunks: many fields
  ASSERT_TRUE(store.Ping().ok());
  std::string big(12345, '\0');
  std::mt19937 rng(1);
  for (auto& c : big) c = static_cast<char>(rng());
  ASSERT_TRUE(store.Put("k:big", big, 0).ok());
  ASSERT_TRUE(store.Put("k:small", std::string("a\0b", 3), 0).ok());  // binary safe
  ASSERT_TRUE(store.Put("k:empty", "", 0).ok());
  auto ex = store.Exists({"k:big", "k:none", "k:small"});
  ASSERT_TRUE(ex.ok());
  EXPECT_EQ(*ex, (std::vector<bool>{true, false, true}));
  auto got = store.GetMany({"k:small", "k:none", "k:big", "k:empty"});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ((*got)[0], std::string("a\0b", 3));
  EXPECT_FALSE((*got)[1].has_value());
  EXPECT_EQ((*got)[2], big);
  EXPECT_EQ((*got)[3], "");
  // No temporary keys are left behind.
  auto keys = store.Scan("k:*", 100);
  ASSERT_TRUE(keys.ok());
  EXPECT_EQ(keys->size(), 3u);
  EXPECT_EQ(*store.Delete({"k:big", "k:none"}), 1);
  EXPECT_FALSE((*store.GetMany({"k:big"}))[0].has_value());
}

TEST(RedisStoreTest, TtlIsApplied) {
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  RedisStore store(ConfigFor(redis));
  ASSERT_TRUE(store.Put("k:ttl", "value", 1).ok());
  EXPECT_TRUE((*store.Exists({"k:ttl"}))[0]);
  std::this_thread::sleep_for(std::chrono::milliseconds(2100));
  EXPECT_FALSE((*store.Exists({"k:ttl"}))[0]);
}

// Cache administration: Inspect reads sizes, TTL, idle time and a head
// without the rest; Expire, DeleteEach say which keys existed; ScanFrom
// resumes from its cursor and covers every key once; the observer sees
// every call with its bytes.
TEST(RedisStoreTest, InspectExpireDeleteEachScanFromAndObserver) {
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  RedisStore store(ConfigFor(redis, 100));
  std::vector<RedisStore::CallStats> calls;
  store.set_observer([&](const RedisStore::CallStats& c) { calls.push_back(c); });
  std::string value;
  for (int i = 0; i < 250; ++i) value += static_cast<char>('a' + i % 26);
  ASSERT_TRUE(store.Put("adm:big", value, 0).ok());  // 3 chunks of 100, 100, 50
  ASSERT_TRUE(store.Put("adm:ttl", "short", 100).ok());
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_STREQ(calls[0].op, "put");
  EXPECT_EQ(calls[0].bytes_written, 250u);
  EXPECT_TRUE(calls[0].ok);
  const std::string cli = "redis-cli -p " + std::to_string(redis.port());
  ASSERT_EQ(std::system((cli + " SET adm:str junk >/dev/null").c_str()), 0);
  ASSERT_EQ(std::system((cli + " HSET adm:part 1 x >/dev/null").c_str()), 0);
  auto info = store.Inspect({"adm:big", "adm:ttl", "adm:str", "adm:part", "adm:none"}, 120);
  ASSERT_TRUE(info.ok()) << info.status();
  const auto& big = (*info)[0];
  EXPECT_EQ(big.state, StoredValue::State::kFound);
  EXPECT_EQ(big.chunks, 3);
  EXPECT_EQ(big.bytes, 250);
  EXPECT_EQ(big.head, value.substr(0, 100));  // the head comes from chunk "0" only
  EXPECT_EQ(big.ttl_ms, -1);
  EXPECT_GE(big.idle_seconds, 0);
  EXPECT_GT((*info)[1].ttl_ms, 90000);
  EXPECT_LE((*info)[1].ttl_ms, 100000);
  EXPECT_EQ((*info)[1].head, "short");
  EXPECT_EQ((*info)[2].state, StoredValue::State::kOtherType);
  EXPECT_EQ((*info)[3].state, StoredValue::State::kIncomplete);
  EXPECT_EQ((*info)[4].state, StoredValue::State::kMissing);
  EXPECT_EQ((*info)[4].ttl_ms, -2);
  EXPECT_STREQ(calls.back().op, "inspect");
  EXPECT_EQ(calls.back().bytes_read, 105u);  // the two heads
  // Expire / PERSIST, then DeleteEach.
  auto touched = store.Expire({"adm:big", "adm:none"}, 50);
  ASSERT_TRUE(touched.ok()) << touched.status();
  EXPECT_EQ(*touched, (std::vector<bool>{true, false}));
  EXPECT_GT((*store.Inspect({"adm:big"}, 0))[0].ttl_ms, 40000);
  touched = store.Expire({"adm:big", "adm:none"}, 0);
  EXPECT_EQ(*touched, (std::vector<bool>{true, false}));
  EXPECT_EQ((*store.Inspect({"adm:big"}, 0))[0].ttl_ms, -1);
  // ScanFrom: small pages, every key exactly once.
  for (int i = 0; i < 40; ++i) ASSERT_TRUE(store.Put("adm:k" + std::to_string(i), "v", 0).ok());
  std::multiset<std::string> seen;
  std::string cursor;
  int pages = 0;
  do {
    auto page = store.ScanFrom(cursor, "adm:k*", 5);
    ASSERT_TRUE(page.ok()) << page.status();
    seen.insert(page->keys.begin(), page->keys.end());
    cursor = page->cursor;
    ++pages;
  } while (!cursor.empty() && pages < 1000);
  EXPECT_EQ(seen.size(), 40u);
  EXPECT_EQ(std::set<std::string>(seen.begin(), seen.end()).size(), 40u);
  EXPECT_GT(pages, 1);
  EXPECT_EQ(store.ScanFrom("no-at-sign", "*", 10).status().code(), absl::StatusCode::kInvalidArgument);
  auto gone = store.DeleteEach({"adm:big", "adm:none", "adm:ttl"});
  ASSERT_TRUE(gone.ok()) << gone.status();
  EXPECT_EQ(*gone, (std::vector<bool>{true, false, true}));
}

TEST(RedisStoreTest, WrongTypeAndPartialEntriesAreMisses) {
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  RedisStore store(ConfigFor(redis, 10));
  // A plain string under the key (e.g. written by another tool).
  std::string cmd = "redis-cli -p " + std::to_string(redis.port()) + " SET k:str junk >/dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  // A hash with a missing chunk.
  ASSERT_TRUE(store.Put("k:part", std::string(35, 'x'), 0).ok());
  cmd = "redis-cli -p " + std::to_string(redis.port()) + " HDEL k:part 1 >/dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  auto got = store.GetMany({"k:str", "k:part"});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_FALSE((*got)[0].has_value());
  EXPECT_FALSE((*got)[1].has_value());
}

TEST(RedisStoreTest, DownMeansUnavailableFastAndRecovery) {
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  RedisStore store(ConfigFor(redis));
  ASSERT_TRUE(store.Put("k:a", "1", 0).ok());
  redis.Stop();
  auto t0 = std::chrono::steady_clock::now();
  auto s = store.Put("k:b", "2", 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find(std::to_string(redis.port())), std::string::npos) << s;
  EXPECT_EQ(store.GetMany({"k:a"}).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(3));
  redis.Start();  // same port, empty data
  ASSERT_TRUE(redis.ok());
  EXPECT_TRUE(store.Put("k:b", "2", 0).ok());
  EXPECT_EQ((*store.GetMany({"k:b"}))[0], "2");
}

// A warm pool after a Redis restart: every pooled connection is stale. The
// first command after the restart must succeed (one retry on a connection
// made now), not fail once per stale connection.
TEST(RedisStoreTest, RestartUnderAWarmPoolCostsNoRequest) {
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  RedisStore store(ConfigFor(redis));
  // Warm the pool with several connections (concurrent callers).
  std::vector<std::thread> warm;
  for (int i = 0; i < 5; ++i) warm.emplace_back([&] { EXPECT_TRUE(store.Put("k:w", "1", 0).ok()); });
  for (auto& t : warm) t.join();
  redis.Stop();
  redis.Start();  // same port, empty
  ASSERT_TRUE(redis.ok());
  for (int i = 0; i < 5; ++i) {
    auto got = store.Read({"k:w", "k:none"});
    ASSERT_TRUE(got.ok()) << "request " << i << " after the restart: " << got.status();
    EXPECT_EQ((*got)[0].state, StoredValue::State::kMissing);  // the data went with the restart
  }
  EXPECT_TRUE(store.Put("k:w", "2", 0).ok());
}

// Read says what a key held: an entry, nothing, another type, or a hash that
// is not a clean chunk set; GetMany gives values only for entries.
TEST(RedisStoreTest, ReadTellsWhatAKeyHeld) {
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  RedisStore store(ConfigFor(redis, 4));
  ASSERT_TRUE(store.Put("k:entry", "0123456789", 0).ok());  // three chunks
  ASSERT_TRUE(store.Put("k:stray", "abcdef", 0).ok());
  RedisCli(redis, {"SET", "k:string", "x"});
  RedisCli(redis, {"HSET", "k:stray", "junk", "x"});
  auto got = store.Read({"k:entry", "k:none", "k:string", "k:stray"});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ((*got)[0].state, StoredValue::State::kFound);
  EXPECT_EQ((*got)[0].value, "0123456789");
  EXPECT_EQ((*got)[1].state, StoredValue::State::kMissing);
  EXPECT_EQ((*got)[2].state, StoredValue::State::kOtherType);
  EXPECT_EQ((*got)[3].state, StoredValue::State::kIncomplete);
}

// Read with an allocator (the decoder's path: replies parsed by RespReader,
// values straight into the caller's memory) says the same as without, for
// one-chunk and many-chunk entries, big and empty values, and every kind of
// key that is not an entry; the bytes are in the buffers it gave.
TEST(RedisStoreTest, ReadIntoCallersMemoryAgreesWithPlainRead) {
  RedisServer redis;
  ASSERT_TRUE(redis.ok());
  RedisStore one_chunk(ConfigFor(redis));
  RedisStore many_chunks(ConfigFor(redis, 1000));
  std::string big(3 << 20, '\0');  // beyond every read buffer
  std::mt19937 rng(7);
  for (auto& c : big) c = static_cast<char>(rng());
  ASSERT_TRUE(one_chunk.Put("k:big", big, 0).ok());
  ASSERT_TRUE(many_chunks.Put("k:chunked", big.substr(0, 12345), 0).ok());
  const std::string crlf = "\r\n$5\r\n*1\r\n";  // RESP inside a value
  ASSERT_TRUE(one_chunk.Put("k:crlf", crlf, 0).ok());
  ASSERT_TRUE(one_chunk.Put("k:empty", "", 0).ok());
  ASSERT_TRUE(one_chunk.Put("k:stray", "abcdef", 0).ok());
  RedisCli(redis, {"HSET", "k:stray", "junk", "x"});
  RedisCli(redis, {"SET", "k:string", "x"});
  RedisCli(redis, {"RPUSH", "k:list", "a", "b"});
  RedisCli(redis, {"HSET", "k:nochunk0", "1", "x"});
  const std::vector<std::string> keys = {"k:big",    "k:none",   "k:chunked", "k:crlf",     "k:empty",
                                         "k:string", "k:stray",  "k:list",    "k:nochunk0", "k:big"};
  std::vector<size_t> asked;
  auto allocate = [&](size_t bytes) {
    asked.push_back(bytes);
    auto mem = std::shared_ptr<char[]>(new char[bytes + 1]);
    return ValueBuffer{mem, mem.get(), bytes};
  };
  for (RedisStore* store : {&one_chunk, &many_chunks}) {
    asked.clear();
    auto plain = store->Read(keys);
    auto into = store->Read(keys, allocate);
    ASSERT_TRUE(plain.ok()) << plain.status();
    ASSERT_TRUE(into.ok()) << into.status();
    ASSERT_EQ(into->size(), keys.size());
    size_t found = 0;
    for (size_t i = 0; i < keys.size(); ++i) {
      SCOPED_TRACE(keys[i]);
      EXPECT_EQ((*into)[i].state, (*plain)[i].state);
      EXPECT_EQ((*into)[i].bytes(), (*plain)[i].value);
      EXPECT_TRUE((*into)[i].value.empty());
      if ((*into)[i].state == StoredValue::State::kFound) {
        ++found;
        EXPECT_NE((*into)[i].buffer.data, nullptr);
      }
    }
    EXPECT_EQ(found, 5u);
    // One buffer per entry found, of its size; none for the rest.
    EXPECT_EQ(asked, (std::vector<size_t>{big.size(), 12345, crlf.size(), 0, big.size()}));
    EXPECT_EQ((*into)[0].bytes(), big);
    EXPECT_EQ((*into)[5].state, StoredValue::State::kOtherType);
    EXPECT_EQ((*into)[7].state, StoredValue::State::kOtherType);
    EXPECT_EQ((*into)[8].state, StoredValue::State::kIncomplete);
  }
  // The connection stays in sync: a plain command on the pool works after.
  EXPECT_TRUE(one_chunk.Ping().ok());
  EXPECT_EQ((*one_chunk.GetMany({"k:crlf"}))[0], crlf);
}

TEST(RedisStoreTest, AuthAndDatabaseFromUri) {
  RedisServer redis({"--requirepass", "s3cret"});
  ASSERT_TRUE(redis.ok());
  auto bad = ParseRedisUri(redis.uri());
  RedisStore no_auth(*bad);
  EXPECT_EQ(no_auth.Put("k", "v", 0).code(), absl::StatusCode::kPermissionDenied);
  auto good = ParseRedisUri("redis://:s3cret@127.0.0.1:" + std::to_string(redis.port()) + "/2");
  ASSERT_TRUE(good.ok());
  RedisStore store(*good);
  ASSERT_TRUE(store.Put("k", "v", 0).ok());
  auto other_db = ParseRedisUri("redis://:s3cret@127.0.0.1:" + std::to_string(redis.port()) + "/0");
  RedisStore store0(*other_db);
  EXPECT_FALSE((*store0.Exists({"k"}))[0]);
  EXPECT_TRUE((*store.Exists({"k"}))[0]);
}

// Tiny maxmemory with allkeys-lru, writers and readers hammering: every read
// is the complete value some writer published, or a clean miss. Each value
// names its id and length and is otherwise a pattern of that id, so a read can
// be checked byte for byte without knowing which writer published it.
std::string HammerValue(int id) {
  std::string v = "id=" + std::to_string(id) + ";";
  const size_t n = 20000 + static_cast<size_t>(id % 7) * 40000;  // 1 to 13 chunks of 20,000 bytes
  std::mt19937 rng(id);
  while (v.size() < n) v.push_back(static_cast<char>(rng()));
  return v;
}

bool IsCompleteHammerValue(const std::string& v) {
  if (v.rfind("id=", 0) != 0) return false;
  const size_t semi = v.find(';');
  int id = 0;
  if (semi == std::string::npos || !absl::SimpleAtoi(v.substr(3, semi - 3), &id)) return false;
  return v == HammerValue(id);
}

TEST(RedisStoreTest, EvictionNeverYieldsAPartialEntry) {
  RedisServer redis({"--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru"});
  ASSERT_TRUE(redis.ok());
  auto block = [](int id) { return HammerValue(id); };
  std::atomic<int> complete{0}, misses{0}, bad{0}, write_errors{0};
  auto writer = [&](int seed) {
    RedisStore store(ConfigFor(redis, 20000));  // entries span several chunks
    for (int i = 0; i < 120; ++i) {
      int id = seed * 1000 + i;
      auto s = store.Put("kv:" + std::to_string(id % 60), block(id), 0);
      if (!s.ok()) ++write_errors;
    }
  };
  auto reader = [&] {
    RedisStore store(ConfigFor(redis, 20000));
    for (int i = 0; i < 300; ++i) {
      std::vector<std::string> keys;
      for (int k = 0; k < 5; ++k) keys.push_back("kv:" + std::to_string((i * 7 + k) % 60));
      auto got = store.GetMany(keys);
      if (!got.ok()) continue;
      for (auto& v : *got) {
        if (!v) {
          ++misses;
          continue;
        }
        if (IsCompleteHammerValue(*v))
          ++complete;
        else
          ++bad;
      }
    }
  };
  std::vector<std::thread> threads;
  threads.emplace_back(writer, 1);
  threads.emplace_back(writer, 2);
  threads.emplace_back(reader);
  threads.emplace_back(reader);
  for (auto& t : threads) t.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(complete.load(), 0);
  EXPECT_GT(misses.load(), 0);  // eviction did happen
  std::printf("eviction hammer: %d complete reads, %d misses, %d failed writes, 0 partial\n", complete.load(),
              misses.load(), write_errors.load());
}

}  // namespace
}  // namespace ape
