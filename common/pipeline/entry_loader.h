// Loading a request's KV entries: keys from content or from the request,
// one pipelined read from the store, verification of every block against the
// request, encoding what is missing (remotely, locally into the store, or in
// memory), and appending the verified blocks to a request's KV cache.
// Part of the decode pipeline (decode_pipeline.h); no gRPC here.
#ifndef APESERVE_COMMON_PIPELINE_ENTRY_LOADER_H_
#define APESERVE_COMMON_PIPELINE_ENTRY_LOADER_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/engine/kv_cache.h"
#include "common/kv/kv_block.h"
#include "common/pipeline/decode_pipeline.h"

namespace ape {

// A request's entries are [0] its prefix and [1 + i] its context i. Each step
// below takes the records and fills in its part of every one.

// One KV entry of the request, from its key to a verified block.
struct EntryLoad {
  enum class Source { kNone, kCache, kEncoded };  // where `view` came from
  // What was wrong with what the key held, if it was not used:
  //  kForeign: a valid block made for another model, prefix, dtype or
  //    position (a client may name such a key; a content key never holds one
  //    legitimately);
  //  kDamaged: our format, but corrupt, not the entry its key names, or a
  //    chunk set with a stray field: ours to repair by rewriting it;
  //  kAlien: not ours to touch (another Redis type, not a KV block, a newer
  //    format version): never deleted or overwritten from here.
  enum class Fault { kNone, kForeign, kDamaged, kAlien };

  KvKind kind = KvKind::kContext;
  Hash128 hash{};
  std::string key;                                // Redis key
  const std::vector<int32_t>* content = nullptr;  // token ids; null: a context given only by key
  Fault fault = Fault::kNone;
  std::string reason;  // "key (why)" when fault != kNone
  Source source = Source::kNone;
  // The verified block (set with `source`), shared read-only with the hot
  // cache and other requests; a request's KV cache views its payload.
  std::shared_ptr<const KvEntry> entry;
  bool from_hot_cache = false;  // served by DecodeHooks::hot_cache, Redis not read

  const KvBlockView& view() const { return entry->view; }
  bool ready() const { return source != Source::kNone; }
  void SetFault(Fault f, absl::string_view why) {
    fault = f;
    reason = absl::StrCat(key, " (", why, ")");
    entry.reset();
  }
};

// The prefix and every context as verified blocks, in request order.
// Statuses as RunDecode's (decode_pipeline.h) for loading.
absl::StatusOr<std::vector<EntryLoad>> LoadEntries(const Model& model, RedisStore* store, const DecodeInput& in,
                                                   const DecodeHooks& hooks, DecodeStats* stats);

// Appends a verified entry's K/V and positions to `cache` at slot cache.size
// and advances cache.size: the entry's payload itself, read-only and in its
// stored dtype (AttachKvBlock), which the cache keeps alive.
absl::Status AppendEntryToCache(const EntryLoad& e, KvCache& cache);

}  // namespace ape

#endif  // APESERVE_COMMON_PIPELINE_ENTRY_LOADER_H_
