// Per-request key/value cache. Slots are filled in order; each slot carries
// its own position, because APE reuses positions across contexts (slot index
// != position). A token computed at slot s attends to slots [0, s].
#ifndef APESERVE_COMMON_ENGINE_KV_CACHE_H_
#define APESERVE_COMMON_ENGINE_KV_CACHE_H_

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "common/engine/model.h"

namespace ape {

// Allocator whose value-initialisation is a no-op: a request's KV cache
// (up to GBs) is filled before it is read, so zeroing it first would only
// double the memory traffic of every cache load.
template <typename T>
struct UninitializedAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

struct KvCache {
  KvCache(const ModelConfig& config, int capacity)
      : n_layers(config.n_layers),
        kv_dim(config.kv_dim()),
        capacity(capacity),
        k(static_cast<size_t>(n_layers) * capacity * kv_dim),
        v(static_cast<size_t>(n_layers) * capacity * kv_dim),
        pos(capacity) {}

  const int n_layers;
  const int kv_dim;    // n_kv_heads * head_dim
  const int capacity;  // slots allocated
  int size = 0;        // slots in use: [0, size)
  // Slots >= size hold garbage until written; nothing reads them.
  std::vector<float, UninitializedAllocator<float>> k;  // [layer][slot][kv_head][head_dim]
  std::vector<float, UninitializedAllocator<float>> v;  // [layer][slot][kv_head][head_dim]
  std::vector<int32_t> pos;                             // [slot] RoPE position of the slot

  float* key(int layer, int slot) { return &k[(static_cast<size_t>(layer) * capacity + slot) * kv_dim]; }
  float* value(int layer, int slot) { return &v[(static_cast<size_t>(layer) * capacity + slot) * kv_dim]; }
  const float* key(int layer, int slot) const { return &k[(static_cast<size_t>(layer) * capacity + slot) * kv_dim]; }
  const float* value(int layer, int slot) const { return &v[(static_cast<size_t>(layer) * capacity + slot) * kv_dim]; }
};

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_KV_CACHE_H_
