// Encoding contexts into the shared cache: key computation, existence check,
// prefill of whatever is missing, serialisation and atomic publication.
// Used by ape-encoder (and by ape-decoder to encode on a miss). No gRPC here;
// errors are absl::Status with the codes the services return as they are.
#ifndef APESERVE_COMMON_PIPELINE_ENCODE_PIPELINE_H_
#define APESERVE_COMMON_PIPELINE_ENCODE_PIPELINE_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/engine/model.h"
#include "common/kv/kv_block.h"
#include "common/store/redis_store.h"

namespace ape {

struct EncodeInput {
  std::vector<int32_t> prefix_tokens;          // BOS included when wanted
  std::vector<std::vector<int32_t>> contexts;  // each without BOS
  KvDtype dtype = KvDtype::kFloat16;
  int ttl_seconds = 0;  // 0 = no expiry
  // Write every entry even where its key already exists: set by a decoder
  // that read an unusable entry there (corrupt, foreign, another prefix's),
  // so the content key is repaired instead of re-encoded on every request.
  bool overwrite = false;
};

struct EncodedEntry {
  Hash128 hash{};
  std::string key;  // Redis key
  uint32_t num_tokens = 0;
  uint32_t first_position = 0;
  uint64_t stored_bytes = 0;  // header + KV + checksum
  bool already_cached = false;
};

struct EncodeOutput {
  EncodedEntry prefix;
  std::vector<EncodedEntry> contexts;
  double lookup_ms = 0, prefill_ms = 0, store_ms = 0;
  int64_t tokens_computed = 0;  // prefix + contexts actually prefilled
  uint64_t bytes_written = 0;
};

// Keys only (no Redis, no compute): what EncodeContexts would report.
EncodeOutput PlanEncode(const Model& model, const EncodeInput& in);

// True when the request is gone (client cancelled, deadline passed). Both
// functions below check it before every block of kEncodeBlockTokens tokens
// they prefill (prefix and contexts alike), as the decoder's prefill does,
// and stop with CANCELLED; null = never.
using EncodeCancelledFn = std::function<bool()>;
constexpr int kEncodeBlockTokens = 256;

// Makes sure the prefix entry and every context entry exist in `store`,
// computing and writing only the missing ones (identical contexts in one
// request are computed once). With in.overwrite nothing is looked up: every
// entry is computed and written (already_cached is false for all).
absl::StatusOr<EncodeOutput> EncodeContexts(const Model& model, RedisStore& store, const EncodeInput& in,
                                            const EncodeCancelledFn& cancelled = nullptr);

// Compute only, nothing stored: prefills the prefix once, then each context
// after it (positions Lp..Lp+len-1), and returns the serialised blocks:
// [0] the prefix's own, [1 + i] context i's. For the decoder's fallback when
// Redis is down, and for tests.
absl::StatusOr<std::vector<std::string>> EncodeBlocks(const Model& model, const EncodeInput& in,
                                                      const EncodeCancelledFn& cancelled = nullptr);

}  // namespace ape

#endif  // APESERVE_COMMON_PIPELINE_ENCODE_PIPELINE_H_
