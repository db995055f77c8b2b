// The per-request KV memory budget of both servers (--max_request_kv_mb):
// what one request's KV cache (KvCache: K and V, [layer][slot][kv_dim]) may
// take, counted in bytes and turned into float32 slots with the model's
// size, so the same flag means the same memory for any model. Entries used
// in place as float16 count half a slot each (decode_pipeline.cc). Checked
// before anything is allocated.
#ifndef APESERVE_COMMON_SERVER_KV_BUDGET_H_
#define APESERVE_COMMON_SERVER_KV_BUDGET_H_

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "common/kv/kv_block.h"

namespace ape {

struct KvBudget {
  int64_t bytes_per_slot = 0;  // 2 * n_layers * kv_dim * sizeof(float)
  int64_t max_slots = 0;       // slots of one request, at most
  std::string limit;           // what sets max_slots, for messages
};

// `max_mb` MiB of float32 KV per request; `max_slots` > 0 caps the slots
// further (the decoder's --max_prompt_tokens).
inline KvBudget MakeKvBudget(const ModelConfig& config, int64_t max_mb, int64_t max_slots = 0) {
  KvBudget b;
  b.bytes_per_slot = static_cast<int64_t>(KvBytesPerToken(config, KvDtype::kFloat32));
  b.max_slots = (std::max<int64_t>(max_mb, 0) << 20) / std::max<int64_t>(b.bytes_per_slot, 1);
  b.limit = absl::StrFormat("--max_request_kv_mb=%d at %d bytes per slot", max_mb, b.bytes_per_slot);
  if (max_slots > 0 && max_slots < b.max_slots) {
    b.max_slots = max_slots;
    b.limit = absl::StrFormat("--max_prompt_tokens=%d", max_slots);
  }
  return b;
}

// RESOURCE_EXHAUSTED when `slots` (what `what` needs) exceed the budget.
inline absl::Status CheckKvBudget(const KvBudget& b, int64_t slots, const std::string& what) {
  if (slots <= b.max_slots) return absl::OkStatus();
  return absl::ResourceExhaustedError(
      absl::StrFormat("%s needs %d KV slots (%.1f MiB of float32 KV), the limit is %d slots (%s)", what, slots,
                      static_cast<double>(slots) * b.bytes_per_slot / (1 << 20), b.max_slots, b.limit));
}

}  // namespace ape

#endif  // APESERVE_COMMON_SERVER_KV_BUDGET_H_
