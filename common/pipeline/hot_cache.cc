#include "common/pipeline/hot_cache.h"

#include <utility>

namespace ape {

HotCache::HotCache(size_t capacity_bytes) : capacity_(capacity_bytes) {}

size_t HotCache::Cost(const KvEntry& e) {
  // The bytes, the token ids copied into the view, and the bookkeeping
  // (list node, map slot, key, control block) at a round 256.
  return e.span().size() + e.view.tokens.size() * sizeof(int32_t) + 256;
}

std::shared_ptr<const KvEntry> HotCache::Get(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = index_.find(key);
  if (it == index_.end()) {
    ++stats_.misses;
    return nullptr;
  }
  if (it->second->expires != kNever && Clock::now() >= it->second->expires) {
    ++stats_.misses;
    ++stats_.expirations;
    stats_.bytes -= it->second->cost;
    lru_.erase(it->second);
    index_.erase(it);
    stats_.entries = lru_.size();
    return nullptr;
  }
  ++stats_.hits;
  lru_.splice(lru_.begin(), lru_, it->second);  // to the front; iterators stay valid
  return it->second->entry;
}

void HotCache::Put(const std::string& key, std::shared_ptr<const KvEntry> entry, Clock::time_point expires) {
  if (entry == nullptr) return;
  const size_t cost = Cost(*entry);
  std::shared_ptr<const KvEntry> dropped;  // released after the lock
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = index_.find(key); it != index_.end()) {
    stats_.bytes -= it->second->cost;
    dropped = std::move(it->second->entry);
    lru_.erase(it->second);
    index_.erase(it);
  }
  if (cost > capacity_) return;
  lru_.push_front({key, std::move(entry), cost, expires});
  index_[key] = lru_.begin();
  stats_.bytes += cost;
  ++stats_.insertions;
  EvictLocked();
  stats_.entries = lru_.size();
}

void HotCache::Erase(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = index_.find(key);
  if (it == index_.end()) return;
  stats_.bytes -= it->second->cost;
  lru_.erase(it->second);
  index_.erase(it);
  stats_.entries = lru_.size();
}

void HotCache::EvictLocked() {
  while (stats_.bytes > capacity_ && !lru_.empty()) {
    Item& last = lru_.back();
    stats_.bytes -= last.cost;
    index_.erase(last.key);
    lru_.pop_back();  // a request still using the entry holds its own reference
    ++stats_.evictions;
  }
}

HotCache::Stats HotCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace ape
