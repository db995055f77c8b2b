// Per-request key/value cache. Slots are filled in order; each slot carries
// its own position, because APE reuses positions across contexts (slot index
// != position). A token computed at slot s attends to slots [0, s].
#ifndef APESERVE_COMMON_KV_CACHE_H_
#define APESERVE_COMMON_KV_CACHE_H_

#include <cstdint>
#include <vector>

#include "common/model.h"

namespace ape {

struct KvCache {
  KvCache(const ModelConfig& config, int capacity)
      : n_layers(config.n_layers), kv_dim(config.kv_dim()), capacity(capacity),
        k(static_cast<size_t>(n_layers) * capacity * kv_dim),
        v(static_cast<size_t>(n_layers) * capacity * kv_dim),
        pos(capacity) {}

  const int n_layers;
  const int kv_dim;    // n_kv_heads * head_dim
  const int capacity;  // slots allocated
  int size = 0;        // slots in use: [0, size)
  std::vector<float> k;        // [layer][slot][kv_head][head_dim]
  std::vector<float> v;        // [layer][slot][kv_head][head_dim]
  std::vector<int32_t> pos;    // [slot] RoPE position of the slot

  float* key(int layer, int slot) { return &k[(static_cast<size_t>(layer) * capacity + slot) * kv_dim]; }
  float* value(int layer, int slot) { return &v[(static_cast<size_t>(layer) * capacity + slot) * kv_dim]; }
  const float* key(int layer, int slot) const { return &k[(static_cast<size_t>(layer) * capacity + slot) * kv_dim]; }
  const float* value(int layer, int slot) const { return &v[(static_cast<size_t>(layer) * capacity + slot) * kv_dim]; }
};

}  // namespace ape

#endif  // APESERVE_COMMON_KV_CACHE_H_
