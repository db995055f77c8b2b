// RedisStore on a real 3-master Redis Cluster on private loopback ports: key
// slots against redis-cli, routing, MOVED/ASK during a live reshard, a
// master going down, and atomic publication under readers and eviction.
#include "common/store/redis_cluster.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/store/redis_store.h"
#include "tests/process_util.h"

namespace ape {
namespace {

using ::ape::testing::CommandOutput;
using ::ape::testing::RedisClusterServer;

RedisConfig ConfigFor(const RedisClusterServer& c, size_t chunk = size_t{64} << 20) {
  auto config = ParseRedisUri(c.uri());
  EXPECT_TRUE(config.ok()) << config.status();
  config->chunk_bytes = chunk;
  config->command_timeout_ms = 2000;
  return *config;
}

// A value that names its id and is otherwise a pattern of it, so a read can
// be checked byte for byte without knowing which write it came from.
std::string IdValue(int id, size_t min_bytes, size_t spread) {
  std::string v = "id=" + std::to_string(id) + ";";
  const size_t n = min_bytes + static_cast<size_t>(id % 7) * spread;
  std::mt19937 rng(id);
  while (v.size() < n) v.push_back(static_cast<char>(rng()));
  return v;
}
// The id of a complete IdValue, or -1.
int IdOf(const std::string& v, size_t min_bytes, size_t spread) {
  int id = 0;
  const size_t semi = v.find(';');
  if (v.rfind("id=", 0) != 0 || semi == std::string::npos || !absl::SimpleAtoi(v.substr(3, semi - 3), &id)) return -1;
  return v == IdValue(id, min_bytes, spread) ? id : -1;
}

// Keys each master holds (its own view: SCAN on that node).
std::set<std::string> KeysOn(const RedisClusterServer& c, size_t node, const std::string& pattern) {
  std::set<std::string> keys;
  for (absl::string_view k : absl::StrSplit(CommandOutput(c.Cli(node, "--scan --pattern '" + pattern + "'")), '\n'))
    if (!k.empty()) keys.emplace(k);
  return keys;
}

int64_t DbSize(const RedisClusterServer& c, size_t node) {
  int64_t n = -1;
  std::string out = CommandOutput(c.Cli(node, "dbsize"));
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return absl::SimpleAtoi(out, &n) ? n : -1;
}

// One integer field of a node's INFO section ("evicted_keys" in "stats"), -1 if absent.
int64_t InfoField(const RedisClusterServer& c, size_t node, const std::string& section, const std::string& field) {
  const std::string out = CommandOutput(c.Cli(node, "info " + section));
  const size_t at = out.find(field + ":");
  if (at == std::string::npos) return -1;
  const size_t begin = at + field.size() + 1;
  int64_t n = -1;
  return absl::SimpleAtoi(out.substr(begin, out.find_first_of("\r\n", begin) - begin), &n) ? n : -1;
}

TEST(RedisClusterUriTest, Parses) {
  auto c = ParseRedisUri("redis+cluster://alice:p%40ss@10.0.0.1:7000,10.0.0.2,[::1]:7002");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->cluster);
  EXPECT_EQ(c->user, "alice");
  EXPECT_EQ(c->password, "p@ss");
  ASSERT_EQ(c->cluster_seeds.size(), 3u);
  EXPECT_EQ(c->cluster_seeds[0].host, "10.0.0.1");
  EXPECT_EQ(c->cluster_seeds[0].port, 7000);
  EXPECT_EQ(c->cluster_seeds[1].host, "10.0.0.2");
  EXPECT_EQ(c->cluster_seeds[1].port, 6379);  // the default port
  EXPECT_EQ(c->cluster_seeds[2].host, "::1");
  EXPECT_EQ(c->cluster_seeds[2].port, 7002);
  EXPECT_EQ(c->host, "10.0.0.1");  // the first seed
  EXPECT_EQ(c->port, 7000);
  EXPECT_EQ(c->Describe(), "cluster 10.0.0.1:7000,10.0.0.2:6379,::1:7002");
  c = ParseRedisUri("redis+cluster://:secret@h:1/0");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->password, "secret");
  EXPECT_EQ(c->cluster_seeds.size(), 1u);
  EXPECT_FALSE(ParseRedisUri("redis+cluster://h:1/2").ok());  // a cluster has only db 0
  EXPECT_FALSE(ParseRedisUri("redis+cluster://h:1,,h:2").ok());
  EXPECT_FALSE(ParseRedisUri("redis+cluster://").ok());
  EXPECT_FALSE(ParseRedisUri("redis+cluster://h:99999").ok());
  EXPECT_FALSE(ParseRedisUri("redis+cluster://h:1?db=1").ok());
  // redis:// stays one node.
  c = ParseRedisUri("redis://h:6380/1");
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->cluster);
  EXPECT_TRUE(c->cluster_seeds.empty());
  EXPECT_EQ(c->Describe(), "h:6380/1");
}

// The spec's check value and hash-tag examples.
TEST(KeySlotTest, Crc16AndHashTags) {
  EXPECT_EQ(redis::Crc16("123456789"), 0x31C3);
  EXPECT_EQ(redis::Crc16(""), 0);
  EXPECT_EQ(redis::HashTag("{user1000}.following"), "user1000");
  EXPECT_EQ(redis::HashTag("foo{}{bar}"), "foo{}{bar}");  // empty first tag: the whole key
  EXPECT_EQ(redis::HashTag("foo{{bar}}zap"), "{bar");
  EXPECT_EQ(redis::HashTag("foo{bar}{zap}"), "bar");
  EXPECT_EQ(redis::HashTag("{}"), "{}");
  EXPECT_EQ(redis::HashTag("a{}b{c}"), "a{}b{c}");
  EXPECT_EQ(redis::HashTag("}{a}"), "a");
  EXPECT_EQ(redis::HashTag("a{b"), "a{b");
  EXPECT_EQ(redis::KeySlot("{user1000}.following"), redis::KeySlot("{user1000}.followers"));
  // The temporary key of a Put hashes like its key.
  EXPECT_EQ(redis::KeySlot("{ape:v1:kv:00ff}:tmp:0123456789abcdef"), redis::KeySlot("ape:v1:kv:00ff"));
}

// One cluster for the tests that leave it as they found it.
class RedisClusterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { cluster_ = new RedisClusterServer(3); }
  static void TearDownTestSuite() {
    delete cluster_;
    cluster_ = nullptr;
  }
  void SetUp() override { ASSERT_TRUE(cluster_->ok()) << "no cluster: see " << cluster_->dir(); }
  static RedisClusterServer* cluster_;
};
RedisClusterServer* RedisClusterTest::cluster_ = nullptr;

// Random keys (any byte, braces often) through one redis-cli session.
TEST_F(RedisClusterTest, KeySlotAgreesWithRedisCli) {
  std::vector<std::string> keys = {
      "",      "{}",       "{{a}}", "a{}b{c}", "{a}{b}",    "}{a}",          "{",
      "}",     "a{b",      "{a",    "a}",      "{}a",       "a{}",           "{{}}",
      "{}{a}", "x{y}z{w}", "{a}",   "a{b}",    "123456789", "foo{bar}{zap}", "{user1000}.following"};
  std::mt19937 rng(7);
  const std::string alphabet = "{}{}ab:_-9 ";
  for (int i = 0; i < 1000; ++i) {
    std::string k(rng() % 12, '\0');
    for (char& ch : k) ch = rng() % 4 == 0 ? static_cast<char>(rng()) : alphabet[rng() % alphabet.size()];
    keys.push_back(k);
  }
  const std::string file = cluster_->dir() + "/keyslot.txt";
  {
    std::ofstream out(file);
    for (const std::string& k : keys) {
      out << "CLUSTER KEYSLOT \"";
      for (unsigned char ch : k) {
        char hex[5];
        std::snprintf(hex, sizeof(hex), "\\x%02x", ch);
        out << hex;
      }
      out << "\"\n";
    }
  }
  std::vector<std::string> lines =
      absl::StrSplit(CommandOutput(cluster_->Cli(0, "-c < " + file)), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    int want = -1;
    ASSERT_TRUE(absl::SimpleAtoi(lines[i], &want)) << lines[i];
    EXPECT_EQ(redis::KeySlot(keys[i]), want) << "key #" << i << " '" << keys[i] << "'";
  }
}

// Entries of every size, chunked small, land on all three masters and read
// back byte for byte in one multi-master call; no temporary key is left.
TEST_F(RedisClusterTest, EntriesSpreadOverAllMastersAndReadBack) {
  RedisStore store(ConfigFor(*cluster_, /*chunk=*/1000));
  ASSERT_TRUE(store.Ping().ok());
  std::vector<std::string> keys;
  std::vector<std::string> values;
  std::mt19937 rng(3);
  for (int i = 0; i < 60; ++i) {
    keys.push_back("ck:" + std::to_string(i));
    std::string v(i == 0 ? 0 : rng() % 20000, '\0');  // up to 20 chunks; one empty value
    for (char& ch : v) ch = static_cast<char>(rng());
    values.push_back(v);
    ASSERT_TRUE(store.Put(keys.back(), values.back(), 0).ok());
  }
  for (size_t n = 0; n < 3; ++n) EXPECT_GT(KeysOn(*cluster_, n, "ck:*").size(), 5u) << "master " << n;
  // One call, keys of all three masters, a missing key and a repeat.
  std::vector<std::string> ask = keys;
  ask.push_back("ck:none");
  ask.push_back(keys[7]);
  auto got = store.GetMany(ask);
  ASSERT_TRUE(got.ok()) << got.status();
  for (size_t i = 0; i < keys.size(); ++i) EXPECT_EQ((*got)[i], values[i]) << keys[i];
  EXPECT_FALSE((*got)[keys.size()].has_value());
  EXPECT_EQ((*got)[keys.size() + 1], values[7]);
  auto ex = store.Exists({keys[1], "ck:none", keys[2]});
  ASSERT_TRUE(ex.ok());
  EXPECT_EQ(*ex, (std::vector<bool>{true, false, true}));
  // Scan covers every master; no temporary key is left anywhere.
  auto all = store.Scan("ck:*", 1000);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), keys.size());
  EXPECT_TRUE(store.Scan("*tmp*", 1000)->empty());
  EXPECT_EQ(store.Scan("ck:*", 10)->size(), 10u);
  // Delete routes each key to its master.
  auto deleted = store.Delete(keys);
  ASSERT_TRUE(deleted.ok()) << deleted.status();
  EXPECT_EQ(*deleted, 60);
  for (size_t n = 0; n < 3; ++n) EXPECT_EQ(DbSize(*cluster_, n), 0) << "master " << n;
}

// Many threads, each reading keys of all masters in one call.
// ScanFrom walks every master in turn (the cursor names the master);
// Inspect, Expire and DeleteEach route each key to its master.
TEST_F(RedisClusterTest, ScanFromCoversEveryMasterAndAdminCallsRoute) {
  RedisStore store(ConfigFor(*cluster_, /*chunk=*/100));
  std::set<std::string> keys;
  for (int i = 0; i < 60; ++i) {
    keys.insert("sf:" + std::to_string(i));
    ASSERT_TRUE(store.Put("sf:" + std::to_string(i), std::string(150 + i, 'v'), 0).ok());
  }
  std::multiset<std::string> seen;
  std::set<std::string> masters;
  std::string cursor;
  int pages = 0;
  do {
    auto page = store.ScanFrom(cursor, "sf:*", 7);
    ASSERT_TRUE(page.ok()) << page.status();
    seen.insert(page->keys.begin(), page->keys.end());
    cursor = page->cursor;
    if (!cursor.empty()) masters.insert(cursor.substr(0, cursor.rfind('@')));
    ++pages;
  } while (!cursor.empty() && pages < 1000);
  EXPECT_EQ(std::set<std::string>(seen.begin(), seen.end()), keys);
  EXPECT_EQ(seen.size(), keys.size());
  EXPECT_EQ(masters.size(), 3u);
  std::vector<std::string> list(keys.begin(), keys.end());
  auto info = store.Inspect(list, 10);
  ASSERT_TRUE(info.ok()) << info.status();
  for (size_t i = 0; i < list.size(); ++i) {
    EXPECT_EQ((*info)[i].state, StoredValue::State::kFound) << list[i];
    EXPECT_EQ((*info)[i].bytes, 150 + std::stoi(list[i].substr(3))) << list[i];
    EXPECT_EQ((*info)[i].head, std::string(10, 'v'));
  }
  auto touched = store.Expire(list, 30);
  ASSERT_TRUE(touched.ok()) << touched.status();
  EXPECT_EQ(std::count(touched->begin(), touched->end(), true), 60);
  auto gone = store.DeleteEach(list);
  ASSERT_TRUE(gone.ok()) << gone.status();
  EXPECT_EQ(std::count(gone->begin(), gone->end(), true), 60);
  for (size_t n = 0; n < 3; ++n) EXPECT_TRUE(KeysOn(*cluster_, n, "sf:*").empty());
}

TEST_F(RedisClusterTest, ConcurrentMultiMasterReads) {
  RedisStore store(ConfigFor(*cluster_, /*chunk=*/4096));
  std::vector<std::string> keys;
  for (int i = 0; i < 90; ++i) {
    keys.push_back("mk:" + std::to_string(i));
    ASSERT_TRUE(store.Put(keys.back(), IdValue(i, 100, 3000), 0).ok());
  }
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round) {
        std::vector<std::string> ask;
        for (int k = 0; k < 30; ++k) ask.push_back(keys[(t * 7 + round * 11 + k * 3) % keys.size()]);
        auto got = store.Read(ask);
        if (!got.ok()) {
          ++bad;
          ADD_FAILURE() << got.status();
          continue;
        }
        for (size_t k = 0; k < ask.size(); ++k) {
          int id = -1;
          absl::SimpleAtoi(ask[k].substr(3), &id);
          if ((*got)[k].state != StoredValue::State::kFound || IdOf((*got)[k].value, 100, 3000) != id) ++bad;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(*store.Delete(keys), 90);
}

// A key with a brace cannot be published (its temporary key would hash
// elsewhere), but it can be read; a dead seed in the URI is skipped.
TEST_F(RedisClusterTest, BraceKeysAndDeadSeeds) {
  RedisStore store(ConfigFor(*cluster_));
  EXPECT_EQ(store.Put("a{b}", "v", 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Put("a}", "v", 0).code(), absl::StatusCode::kInvalidArgument);
  auto read = store.Read({"a{b}", "{x}"});
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ((*read)[0].state, StoredValue::State::kMissing);
  RedisConfig config = ConfigFor(*cluster_);
  config.cluster_seeds.insert(config.cluster_seeds.begin(), RedisAddress{"127.0.0.1", testing::FreePort()});
  RedisStore seeded(config);
  ASSERT_TRUE(seeded.Put("seed:k", "v", 0).ok());
  EXPECT_EQ((*seeded.GetMany({"seed:k"}))[0], "v");
  EXPECT_EQ(*seeded.Delete({"seed:k"}), 1);
  // A redis:// store on a cluster node is told what to use instead.
  RedisStore single(*ParseRedisUri("redis://127.0.0.1:" + std::to_string(cluster_->ports()[0])));
  std::vector<std::string> spread;
  for (int i = 0; i < 10; ++i) spread.push_back("single:" + std::to_string(i));
  auto s = single.Read(spread).status();
  EXPECT_NE(s.message().find("redis+cluster://"), std::string::npos) << s;
}

// A half-configured migration (MIGRATING on the owner, no IMPORTING on the
// target) bounces a missing key between ASK and MOVED: the call ends with
// UNAVAILABLE after kMaxRedirects instead of looping.
TEST_F(RedisClusterTest, RedirectLoopEndsInUnavailable) {
  RedisStore store(ConfigFor(*cluster_));
  ASSERT_TRUE(store.Put("loop:k", "v", 0).ok());
  size_t owner = 0;
  while (owner < 3 && KeysOn(*cluster_, owner, "loop:k").empty()) ++owner;
  ASSERT_LT(owner, 3u);
  ASSERT_EQ(*store.Delete({"loop:k"}), 1);
  const std::string slot = std::to_string(redis::KeySlot("loop:k"));
  const std::string target = cluster_->NodeId((owner + 1) % 3);
  ASSERT_EQ(CommandOutput(cluster_->Cli(owner, "cluster setslot " + slot + " migrating " + target)).rfind("OK", 0), 0u);
  auto got = store.Read({"loop:k"});
  EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable) << got.status();
  EXPECT_NE(got.status().message().find("redirected more than"), std::string::npos) << got.status();
  ASSERT_EQ(CommandOutput(cluster_->Cli(owner, "cluster setslot " + slot + " stable")).rfind("OK", 0), 0u);
  got = store.Read({"loop:k"});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ((*got)[0].state, StoredValue::State::kMissing);
}

// One slot migrated by hand, step by step (what redis-cli --cluster reshard
// does, slowed down): a key not yet moved is read where it is, a missing one
// is followed with ASK, a new entry is filled on the importing node (ASK) and
// its RENAME waits out TRYAGAIN until the slot has moved, then publishes.
// Runs last in this suite: it moves a slot.
TEST_F(RedisClusterTest, ZzAskAndTryAgainDuringAManualMigration) {
  RedisStore store(ConfigFor(*cluster_, 100));
  ASSERT_TRUE(store.Put("mig:old", std::string(250, 'o'), 0).ok());
  const int slot = redis::KeySlot("mig:old");
  size_t from = 0;
  while (from < 3 && KeysOn(*cluster_, from, "mig:old").empty()) ++from;
  ASSERT_LT(from, 3u);
  const size_t to = (from + 1) % 3;
  // Two more brace-free keys of the same slot.
  std::vector<std::string> same;
  for (int i = 0; same.size() < 2; ++i) {
    if (redis::KeySlot("mig:" + std::to_string(i)) == slot) same.push_back("mig:" + std::to_string(i));
  }
  auto cli = [&](size_t node, const std::string& args) {
    const std::string out = CommandOutput(cluster_->Cli(node, args));
    EXPECT_EQ(out.rfind("OK", 0), 0u) << args << ": " << out;
  };
  const std::string s = std::to_string(slot);
  cli(to, "cluster setslot " + s + " importing " + cluster_->NodeId(from));
  cli(from, "cluster setslot " + s + " migrating " + cluster_->NodeId(to));
  // Reads: the old entry from `from`, a missing one through ASK to `to`.
  auto read = store.Read({"mig:old", same[0]});
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ((*read)[0].value, std::string(250, 'o'));
  EXPECT_EQ((*read)[1].state, StoredValue::State::kMissing);
  EXPECT_GT(store.cluster_stats().ask, 0);
  // A new entry: filled on `to` (ASK), published once the slot has moved.
  std::thread finish([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    cli(from, "migrate 127.0.0.1 " + std::to_string(cluster_->ports()[to]) + " '' 0 5000 keys mig:old");
    for (size_t n = 0; n < 3; ++n) cli(n, "cluster setslot " + s + " node " + cluster_->NodeId(to));
  });
  const std::string value(1000, 'n');  // ten chunks
  absl::Status put = store.Put(same[1], value, 0);
  finish.join();
  ASSERT_TRUE(put.ok()) << put;
  EXPECT_GT(store.cluster_stats().try_again, 0);
  auto got = store.GetMany({"mig:old", same[1], same[0]});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ((*got)[0], std::string(250, 'o'));
  EXPECT_EQ((*got)[1], value);
  EXPECT_FALSE((*got)[2].has_value());
  EXPECT_EQ(KeysOn(*cluster_, to, "mig:*").size(), 2u);
  EXPECT_TRUE(store.Scan("*tmp*", 10)->empty());
  EXPECT_EQ(*store.Delete({"mig:old", same[1]}), 2);
}

// 2000 slots move from master 0 to master 1 while writers and readers run:
// every read is a complete value of its key (MOVED, ASK and TRYAGAIN
// followed), no call fails, and the slots did move.
TEST(RedisClusterReshardTest, ReadsAndWritesDuringASlotMigration) {
  RedisClusterServer cluster(3);
  ASSERT_TRUE(cluster.ok()) << cluster.dir();
  constexpr int kKeys = 300;
  constexpr size_t kMin = 1500, kSpread = 400;  // 1500..3900 bytes: 3 to 8 chunks of 500
  auto key = [](int k) { return "rk:" + std::to_string(k); };
  {
    RedisStore store(ConfigFor(cluster, 500));
    for (int k = 0; k < kKeys; ++k) ASSERT_TRUE(store.Put(key(k), IdValue(k * 1000, kMin, kSpread), 0).ok());
  }
  const size_t keys_on_0 = KeysOn(cluster, 0, "rk:*").size();
  const std::string from = cluster.NodeId(0), to = cluster.NodeId(1);
  ASSERT_EQ(from.size(), 40u);
  std::atomic<bool> done{false};
  std::atomic<int> reads{0}, writes{0}, failures{0}, wrong{0};
  RedisStore store(ConfigFor(cluster, 500));  // one store: one slot map, shared by all threads
  std::thread reshard([&] {
    const int rc =
        std::system(cluster
                        .Cli(0, "--cluster reshard 127.0.0.1:" + std::to_string(cluster.ports()[0]) +
                                    " --cluster-from " + from + " --cluster-to " + to +
                                    " --cluster-slots 2000 --cluster-yes >>" + cluster.dir() + "/reshard.log 2>&1")
                        .c_str());
    EXPECT_EQ(rc, 0) << "see " << cluster.dir() << "/reshard.log";
    done = true;
  });
  std::vector<std::string> added;  // new entries written during the reshard (writer thread only)
  auto writer = [&](int seed) {
    for (int v = 1; !done; ++v) {
      // Mostly overwrites; every fourth a new key (its RENAME may meet TRYAGAIN).
      const int k = (seed * 37 + v * 13) % kKeys;
      const std::string target = v % 4 == 0 ? "rn:" + std::to_string(v) : key(k);
      if (absl::Status s = store.Put(target, IdValue(k * 1000 + v % 1000, kMin, kSpread), 0); !s.ok()) {
        ++failures;
        ADD_FAILURE() << "Put " << target << ": " << s;
      } else if (v % 4 == 0) {
        added.push_back(target);
      }
      ++writes;
    }
  };
  auto reader = [&](int seed) {
    for (int round = 0; !done; ++round) {
      std::vector<std::string> ask;
      for (int i = 0; i < 20; ++i) ask.push_back(key((seed * 101 + round * 20 + i) % kKeys));
      auto got = store.GetMany(ask);
      if (!got.ok()) {
        ++failures;
        ADD_FAILURE() << "GetMany: " << got.status();
        continue;
      }
      for (size_t i = 0; i < ask.size(); ++i) {
        const int id = (*got)[i] ? IdOf(*(*got)[i], kMin, kSpread) : -1;
        if (id < 0 || key(id / 1000) != ask[i]) ++wrong;
        ++reads;
      }
    }
  };
  std::vector<std::thread> threads;
  threads.emplace_back(writer, 1);
  threads.emplace_back(reader, 1);
  threads.emplace_back(reader, 2);
  reshard.join();
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  // The slots moved: master 0 holds fewer keys, and everything still reads.
  EXPECT_LT(KeysOn(cluster, 0, "rk:*").size(), keys_on_0);
  std::vector<std::string> all;
  for (int k = 0; k < kKeys; ++k) all.push_back(key(k));
  auto got = store.GetMany(all);
  ASSERT_TRUE(got.ok()) << got.status();
  for (int k = 0; k < kKeys; ++k) {
    ASSERT_TRUE((*got)[k].has_value()) << key(k);
    EXPECT_EQ(IdOf(*(*got)[k], kMin, kSpread) / 1000, k);
  }
  auto news = store.GetMany(added);
  ASSERT_TRUE(news.ok()) << news.status();
  for (size_t i = 0; i < added.size(); ++i) {
    EXPECT_TRUE((*news)[i].has_value() && IdOf(*(*news)[i], kMin, kSpread) >= 0) << added[i];
  }
  EXPECT_TRUE(store.Scan("*tmp*", 100)->empty());
  const RedisStore::ClusterStats st = store.cluster_stats();
  EXPECT_GT(st.moved + st.ask, 0);
  std::printf(
      "reshard: %d reads, %d writes (%zu new keys) during it; %lld MOVED, %lld ASK, %lld TRYAGAIN, %lld map reads\n",
      reads.load(), writes.load(), added.size(), static_cast<long long>(st.moved), static_cast<long long>(st.ask),
      static_cast<long long>(st.try_again), static_cast<long long>(st.refreshes));
}

// One master down: calls that need it fail with UNAVAILABLE naming it and the
// slot; calls on the other masters' keys keep working. AUTH goes to every node.
TEST(RedisClusterDownTest, AMasterDownFailsOnlyItsSlots) {
  RedisClusterServer cluster(3, {}, "s3cret");
  ASSERT_TRUE(cluster.ok()) << cluster.dir();
  RedisConfig no_auth = ConfigFor(cluster);
  no_auth.password.clear();
  EXPECT_EQ(RedisStore(no_auth).Put("k", "v", 0).code(), absl::StatusCode::kPermissionDenied);
  RedisStore store(ConfigFor(cluster, 100));
  std::vector<std::string> keys;
  for (int i = 0; i < 60; ++i) {
    keys.push_back("dk:" + std::to_string(i));
    ASSERT_TRUE(store.Put(keys.back(), "value of " + keys.back() + std::string(300, 'x'), 0).ok());
  }
  std::vector<std::set<std::string>> on(3);
  for (size_t n = 0; n < 3; ++n) on[n] = KeysOn(cluster, n, "dk:*");
  ASSERT_FALSE(on[2].empty());
  const std::string dead_key = *on[2].begin();
  const std::string dead = "127.0.0.1:" + std::to_string(cluster.ports()[2]);
  cluster.StopNode(2);
  const auto t0 = std::chrono::steady_clock::now();
  // Keys of the live masters.
  std::vector<std::string> live(on[0].begin(), on[0].end());
  live.insert(live.end(), on[1].begin(), on[1].end());
  for (int round = 0; round < 3; ++round) {
    auto got = store.GetMany(live);
    ASSERT_TRUE(got.ok()) << got.status();
    for (size_t i = 0; i < live.size(); ++i) EXPECT_EQ((*got)[i], "value of " + live[i] + std::string(300, 'x'));
  }
  EXPECT_TRUE(store.Put(live[0], "new", 0).ok());
  // Anything touching the dead master.
  std::vector<std::string> mixed = {live[0], dead_key, live[1]};
  auto got = store.GetMany(mixed);
  ASSERT_EQ(got.status().code(), absl::StatusCode::kUnavailable) << got.status();
  EXPECT_NE(got.status().message().find(dead), std::string::npos) << got.status();
  EXPECT_NE(got.status().message().find("slot " + std::to_string(redis::KeySlot(dead_key))), std::string::npos)
      << got.status();
  EXPECT_EQ(store.Exists(mixed).status().code(), absl::StatusCode::kUnavailable);
  absl::Status put = store.Put(dead_key, "v", 0);
  EXPECT_EQ(put.code(), absl::StatusCode::kUnavailable) << put;
  EXPECT_NE(put.message().find(dead), std::string::npos) << put;
  absl::Status ping = store.Ping();
  EXPECT_EQ(ping.code(), absl::StatusCode::kUnavailable) << ping;
  EXPECT_NE(ping.message().find(dead), std::string::npos) << ping;
  EXPECT_EQ(store.Scan("dk:*", 1000).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  // A new store (cold map, cold pools) sees the same.
  RedisStore fresh(ConfigFor(cluster, 100));
  EXPECT_EQ((*fresh.GetMany({live[1]}))[0], "value of " + live[1] + std::string(300, 'x'));
  EXPECT_EQ(fresh.GetMany({dead_key}).status().code(), absl::StatusCode::kUnavailable);
}

// Writers and readers on every master with a tiny maxmemory (allkeys-lru):
// every read is a complete value some writer published, or a clean miss.
TEST(RedisClusterEvictionTest, PutRacingReadersNeverExposesAPartialEntry) {
  RedisClusterServer cluster(3, {"--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru"});
  ASSERT_TRUE(cluster.ok()) << cluster.dir();
  constexpr size_t kMin = 20000, kSpread = 40000;  // 1 to 13 chunks of 20,000 bytes
  std::atomic<int> complete{0}, misses{0}, bad{0}, write_errors{0}, read_errors{0};
  auto writer = [&](int seed) {
    RedisStore store(ConfigFor(cluster, 20000));
    for (int i = 0; i < 150; ++i) {
      const int id = seed * 1000 + i;
      if (!store.Put("kv:" + std::to_string(id % 90), IdValue(id, kMin, kSpread), 0).ok()) ++write_errors;
    }
  };
  auto reader = [&] {
    RedisStore store(ConfigFor(cluster, 20000));
    for (int i = 0; i < 300; ++i) {
      std::vector<std::string> keys;
      for (int k = 0; k < 6; ++k) keys.push_back("kv:" + std::to_string((i * 7 + k * 15) % 90));
      auto got = store.GetMany(keys);
      if (!got.ok()) {
        ++read_errors;
        continue;
      }
      for (auto& v : *got) {
        if (!v)
          ++misses;
        else if (IdOf(*v, kMin, kSpread) >= 0)
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
  EXPECT_EQ(read_errors.load(), 0);
  EXPECT_GT(complete.load(), 0);
  EXPECT_GT(misses.load(), 0);  // eviction did happen
  // Every master took entries: it holds some, or evicted some. (A master may end empty: a
  // reader's 360 KB reply counts against its 3 MB, and eviction then empties it.)
  std::string per_master;
  for (size_t n = 0; n < 3; ++n) {
    const int64_t held = DbSize(cluster, n), evicted = InfoField(cluster, n, "stats", "evicted_keys");
    EXPECT_GE(held, 0) << "master " << n;
    EXPECT_GT(held + evicted, 0) << "master " << n << ": " << held << " keys, " << evicted << " evicted";
    absl::StrAppend(&per_master, n ? ", " : "", held, " held/", evicted, " evicted");
  }
  std::printf("cluster eviction hammer: %d complete reads, %d misses, %d failed writes, 0 partial; masters %s\n",
              complete.load(), misses.load(), write_errors.load(), per_master.c_str());
}

}  // namespace
}  // namespace ape
