// The decoder's in-process cache of hot KV entries (issue 14): verified
// blocks kept in memory by Redis key, least recently used evicted first,
// bounded by bytes (the decoder's --hot_cache_mb).
//
// What it holds and why a hit is as good as a Redis read: only blocks that
// passed the whole of a Redis read's verification (ParseKvBlock: sizes,
// checksum, finite payload; then VerifyEntry: model, dtype, kind, prefix key,
// first position, key identity) are put here, under the key they were read
// from, and they never change (KvEntry is immutable). A hit skips Redis and
// the parse/checksum step, but the loader (entry_loader.cc) still checks the
// block against each request exactly as it checks a block read from Redis,
// so a hot entry answers only the requests its Redis bytes would answer.
//
// Sharing: Get hands out the entry itself (shared_ptr<const KvEntry>); the
// requests using it attach its payload to their KV caches read-only
// (AttachKvBlock) without copying. An entry evicted or replaced while a
// request uses it stays alive until the last such request ends.
//
// Expiry: an entry read from a key with a TTL is put with the deadline
// Redis had for it (PTTL, read in the same round trip), and is a miss from
// then on, so a key that expired in Redis stops answering here too. A TTL
// extended later (Cache.Touch) only makes the entry go back to Redis early.
// What it does not see: a key deleted in Redis by someone else after it was
// read keeps answering from here until evicted or expired (the content it
// names is still what the key names: keys are content hashes). The Cache
// admin service's delete calls Erase.
//
// Thread-safe: one mutex around the map and the LRU list; nothing slow (no
// I/O, no copy of an entry's bytes) runs under it.
#ifndef APESERVE_COMMON_PIPELINE_HOT_CACHE_H_
#define APESERVE_COMMON_PIPELINE_HOT_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <chrono>
#include <list>
#include <memory>
#include <mutex>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "common/kv/kv_block.h"

namespace ape {

class HotCache {
 public:
  // Holds at most `capacity_bytes` of entries (their bytes plus a fixed
  // overhead each); 0 holds nothing.
  explicit HotCache(size_t capacity_bytes);
  HotCache(const HotCache&) = delete;
  HotCache& operator=(const HotCache&) = delete;

  using Clock = std::chrono::steady_clock;
  static constexpr Clock::time_point kNever = Clock::time_point::max();

  // The entry at `key`, now the most recently used; null when absent or
  // past its deadline (then dropped).
  std::shared_ptr<const KvEntry> Get(const std::string& key);
  // Puts `entry` (verified, see above) at `key` until `expires`, replacing
  // what was there, and evicts the least recently used entries until the
  // total fits. An entry larger than the whole capacity is not kept.
  void Put(const std::string& key, std::shared_ptr<const KvEntry> entry, Clock::time_point expires = kNever);
  // Drops `key` (requests using it keep their reference).
  void Erase(const std::string& key);

  // What an entry costs against the capacity.
  static size_t Cost(const KvEntry& e);

  struct Stats {
    int64_t hits = 0, misses = 0, insertions = 0, evictions = 0;
    int64_t expirations = 0;  // Gets that found the entry past its deadline (counted as misses too)
    size_t bytes = 0;  // of the entries held
    size_t entries = 0;
  };
  Stats stats() const;
  size_t capacity_bytes() const { return capacity_; }

 private:
  struct Item {
    std::string key;
    std::shared_ptr<const KvEntry> entry;
    size_t cost;
    Clock::time_point expires;
  };
  using List = std::list<Item>;  // most recently used first
  void EvictLocked();

  const size_t capacity_;
  mutable std::mutex mu_;
  List lru_;
  absl::flat_hash_map<std::string, List::iterator> index_;
  Stats stats_;
};

}  // namespace ape

#endif  // APESERVE_COMMON_PIPELINE_HOT_CACHE_H_
