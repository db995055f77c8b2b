#include "common/pipeline/entry_loader.h"

#include <algorithm>
#include <chrono>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/engine/status_macros.h"
#include "common/engine/timing.h"
#include "common/kv/cache_key.h"
#include "common/pipeline/hot_cache.h"

namespace ape {
namespace {

using Clock = std::chrono::steady_clock;

bool Cancelled(const DecodeHooks& hooks) { return hooks.cancelled && hooks.cancelled(); }

// Step 1 (no I/O): every entry's key, computed from its content or parsed
// from the request. INVALID_ARGUMENT for a malformed key.
absl::StatusOr<std::vector<EntryLoad>> ComputeEntryKeys(const Hash128& fp, const DecodeInput& in) {
  std::vector<EntryLoad> entries(in.contexts.size() + 1);
  entries[0].kind = KvKind::kPrefix;
  entries[0].content = &in.prefix_tokens;
  entries[0].hash = ComputeKvKey(fp, in.dtype, KvKind::kPrefix, in.prefix_tokens, {});
  for (size_t i = 0; i < in.contexts.size(); ++i) {
    const ContextSource& c = in.contexts[i];
    EntryLoad& e = entries[i + 1];
    if (c.tokens) {
      e.content = &*c.tokens;
      e.hash = ComputeKvKey(fp, in.dtype, KvKind::kContext, in.prefix_tokens, *c.tokens);
    } else {
      ASSIGN_OR_RETURN(e.hash, ParseRedisKey(c.key));
    }
  }
  for (EntryLoad& e : entries) e.key = RedisKeyFor(e.hash);
  return entries;
}

// Checks a parsed block against the request: model, dtype, kind, the prefix
// key (which covers model, dtype and prefix tokens), the first position, its
// identity against the key it was read from and, for content, the token
// ids. Sets e.entry and e.source, or e.fault.
void CheckEntryForRequest(const Model& model, const Hash128& fp, const DecodeInput& in, const Hash128& prefix_hash,
                          EntryLoad::Source source, std::shared_ptr<const KvEntry> entry, EntryLoad& e) {
  const KvBlockView& view = entry->view;
  absl::Status usable = CheckKvBlockMatches(view, fp, model.config(), in.dtype, e.kind, prefix_hash);
  const size_t first_position = e.kind == KvKind::kPrefix ? 0 : in.prefix_tokens.size();
  if (usable.ok() && view.header.first_position != first_position) {
    usable = absl::FailedPreconditionError("KV block starts at the wrong position");
  }
  if (!usable.ok()) return e.SetFault(EntryLoad::Fault::kForeign, usable.message());
  if (absl::Status key = CheckKvBlockKey(view, e.hash, in.prefix_tokens); !key.ok()) {
    return e.SetFault(EntryLoad::Fault::kDamaged, key.message());
  }
  if (e.content != nullptr && view.tokens != *e.content) {  // implied by the key check; kept as a guard
    return e.SetFault(EntryLoad::Fault::kDamaged, "KV block holds other tokens than its key was made from");
  }
  e.entry = std::move(entry);
  e.source = source;
}

// Parses the bytes of `entry` (its storage: not copied) and checks the
// block against the request (CheckEntryForRequest). Sets e.entry, or
// e.fault (dropping the bytes).
void VerifyEntry(const Model& model, const Hash128& fp, const DecodeInput& in, const Hash128& prefix_hash,
                 EntryLoad::Source source, std::shared_ptr<KvEntry> entry, EntryLoad& e) {
  e.fault = EntryLoad::Fault::kNone;
  absl::StatusOr<KvBlockView> view = ParseKvBlock(entry->span());
  if (!view.ok()) {
    // Our magic with bad bytes is ours to repair; another version or no
    // KV block at all is somebody else's.
    const bool ours = view.status().code() == absl::StatusCode::kDataLoss && HasKvBlockMagic(entry->span());
    e.SetFault(ours ? EntryLoad::Fault::kDamaged : EntryLoad::Fault::kAlien, view.status().message());
    return;
  }
  entry->view = *std::move(view);
  CheckEntryForRequest(model, fp, in, prefix_hash, source, std::move(entry), e);
}

// Step 1b: entries the hot cache holds, checked against the request as a
// Redis read of the same bytes would be (their parse and checksum were
// verified when they were put there; they never change).
void TakeFromHotCache(const Model& model, const Hash128& fp, const DecodeInput& in, HotCache& hot,
                      std::vector<EntryLoad>& entries) {
  absl::flat_hash_map<std::string, size_t> first;  // key -> its first entry
  for (size_t i = 0; i < entries.size(); ++i) {
    EntryLoad& e = entries[i];
    if (e.ready()) continue;
    if (auto [it, inserted] = first.emplace(e.key, i); !inserted) {  // a repeat: as the first one went
      const EntryLoad& same = entries[it->second];
      if (same.ready()) {
        e.entry = same.entry;
        e.source = same.source;
        e.from_hot_cache = true;
      }
      continue;
    }
    std::shared_ptr<const KvEntry> entry = hot.Get(e.key);
    if (entry == nullptr) continue;
    CheckEntryForRequest(model, fp, in, entries[0].hash, EntryLoad::Source::kCache, std::move(entry), e);
    e.from_hot_cache = e.ready();
    // An entry that does not fit this request is read from Redis below,
    // which will say the same about it (or give what the key holds now).
    e.fault = EntryLoad::Fault::kNone;
    e.reason.clear();
  }
}

// Step 2: reads every entry not ready yet (one pipelined round trip) and
// verifies it; those that pass are marked `source`. Nothing is deleted: what
// cannot be used is recorded in the entry's fault. The store's error (e.g.
// UNAVAILABLE) when it cannot be read.
// Verified blocks go into `hot` when it is given.
absl::Status FetchAndVerify(const Model& model, const Hash128& fp, RedisStore& store, const DecodeInput& in,
                            EntryLoad::Source source, HotCache* hot, std::vector<EntryLoad>& entries) {
  // Each key is read once: a request may name one key many times.
  std::vector<std::string> keys;
  absl::flat_hash_map<std::string, size_t> first;  // key -> index of its first entry
  for (size_t i = 0; i < entries.size(); ++i) {
    if (!entries[i].ready() && first.emplace(entries[i].key, i).second) keys.push_back(entries[i].key);
  }
  if (keys.empty()) return absl::OkStatus();
  // Values go from the socket straight into pooled memory (kv_cache.h:
  // mapped once, reused by later requests, no page faults), which the
  // entries then use in place.
  const ValueAllocator pooled = [](size_t bytes) {
    auto chunk = std::make_shared<KvPool::Chunk>(KvPool::Global().Acquire(std::max<size_t>(bytes, 1)));
    char* data = static_cast<char*>(chunk->data());
    return ValueBuffer{std::move(chunk), data, bytes};
  };
  ASSIGN_OR_RETURN(std::vector<StoredValue> values, store.Read(keys, pooled));
  size_t next_value = 0;  // values[] follows the first entries not ready
  for (size_t i = 0; i < entries.size(); ++i) {
    EntryLoad& e = entries[i];
    if (e.ready()) continue;
    if (const size_t f = first[e.key]; f != i) {  // a repeat: share the first one's verified view
      const EntryLoad& same = entries[f];
      if (same.ready()) {
        e.entry = same.entry;  // shared, read-only
        e.source = same.source;
      } else {
        e.fault = same.fault;
        e.reason = same.reason;
      }
      continue;
    }
    StoredValue& value = values[next_value++];
    switch (value.state) {
      case StoredValue::State::kMissing: break;
      case StoredValue::State::kIncomplete:
        e.SetFault(EntryLoad::Fault::kDamaged, "chunk fields are not 0..n-1");
        break;
      case StoredValue::State::kOtherType: e.SetFault(EntryLoad::Fault::kAlien, "not a KV entry (another type)"); break;
      case StoredValue::State::kFound:
        VerifyEntry(model, fp, in, entries[0].hash, source,
                    value.buffer.data != nullptr
                        ? std::make_shared<KvEntry>(std::move(value.buffer.owner),
                                                    std::span<const uint8_t>(
                                                        reinterpret_cast<const uint8_t*>(value.buffer.data),
                                                        value.buffer.size))
                        : std::make_shared<KvEntry>(std::move(value.value)),
                    e);
        if (e.ready() && hot != nullptr) {
          // Kept no longer than Redis keeps the key (hot_cache.h).
          hot->Put(e.key, e.entry,
                   value.ttl_ms >= 0 ? HotCache::Clock::now() + std::chrono::milliseconds(value.ttl_ms)
                                     : HotCache::kNever);
        }
        break;
    }
  }
  return absl::OkStatus();
}

// Step 3: a context given only by key cannot be encoded here, so it must have
// been loaded: FAILED_PRECONDITION for foreign entries, then the store's
// error if it could not be read, then NOT_FOUND naming every missing key.
absl::Status RequireKeyOnlyEntries(const std::vector<EntryLoad>& entries, const absl::Status& store_status) {
  std::vector<std::string> foreign, missing, unreadable;
  for (const EntryLoad& e : entries) {
    const bool has_fault = e.fault != EntryLoad::Fault::kNone;
    if (has_fault && e.fault != EntryLoad::Fault::kForeign) unreadable.push_back(e.reason);
    if (e.content != nullptr || e.ready()) continue;
    if (e.fault == EntryLoad::Fault::kForeign)
      foreign.push_back(e.reason);
    else
      missing.push_back(e.key);
  }
  if (!foreign.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cache entries cannot be used with this request's model, prefix and format: ", absl::StrJoin(foreign, ", ")));
  }
  if (missing.empty()) return absl::OkStatus();
  if (!store_status.ok()) return store_status;  // could not even look
  return absl::NotFoundError(
      absl::StrCat("contexts not in the cache: ", absl::StrJoin(missing, ", "),
                   unreadable.empty() ? "" : "; unreadable entries: ", absl::StrJoin(unreadable, ", ")));
}

// The entries not ready yet as an encode request: the prefix (contexts are
// encoded after it) and the missing contexts' content, in request order.
// `for_store`: leave out contexts whose key holds something not ours, and ask
// to overwrite (repair) keys holding our entries damaged or misplaced, unless
// the prefix's key holds something not ours.
EncodeInput MissingAsEncodeInput(const DecodeInput& in, const std::vector<EntryLoad>& entries, bool for_store) {
  using Fault = EntryLoad::Fault;
  EncodeInput enc;
  enc.prefix_tokens = in.prefix_tokens;
  enc.dtype = in.dtype;
  enc.ttl_seconds = in.ttl_seconds;
  bool repair = entries[0].fault == Fault::kDamaged || entries[0].fault == Fault::kForeign;
  for (size_t i = 1; i < entries.size(); ++i) {
    const EntryLoad& e = entries[i];
    if (e.ready() || (for_store && e.fault == Fault::kAlien)) continue;
    enc.contexts.push_back(*e.content);
    repair = repair || e.fault == Fault::kDamaged || e.fault == Fault::kForeign;
  }
  enc.overwrite = for_store && repair && entries[0].fault != Fault::kAlien;
  return enc;
}

// Computes the entries not ready yet in memory (nothing is cached).
absl::Status EncodeInMemory(const Model& model, const DecodeInput& in, const DecodeHooks& hooks,
                            std::vector<EntryLoad>& entries) {
  const EncodeInput local = MissingAsEncodeInput(in, entries, /*for_store=*/false);
  if (entries[0].ready() && local.contexts.empty()) return absl::OkStatus();
  ASSIGN_OR_RETURN(std::vector<std::string> blocks,
                   EncodeBlocks(model, local, hooks.cancelled));  // [0] prefix, then local.contexts
  size_t next_context = 1;
  for (size_t i = 0; i < entries.size(); ++i) {
    EntryLoad& e = entries[i];
    if (e.ready()) continue;
    auto entry = std::make_shared<KvEntry>(std::move(blocks[i == 0 ? 0 : next_context++]));
    auto view = ParseKvBlock(entry->span());
    if (!view.ok())
      return absl::InternalError(absl::StrCat("locally encoded block is invalid: ", view.status().message()));
    entry->view = *std::move(view);
    e.entry = std::move(entry);
    e.source = EntryLoad::Source::kEncoded;
  }
  return absl::OkStatus();
}

// Step 4: encodes every entry still missing (all have content) into the
// store, through hooks.remote_encode or locally, and reads them back. What is
// still missing then (store down or refusing writes, a foreign entry in the
// way, the encoder failing) is computed in memory and not cached.
absl::Status EncodeMissing(const Model& model, const Hash128& fp, RedisStore* store, const DecodeInput& in,
                           const DecodeHooks& hooks, const absl::Status& store_status,
                           std::vector<EntryLoad>& entries) {
  if (Cancelled(hooks)) return absl::CancelledError("request cancelled before encoding its contexts");
  if (store != nullptr && store_status.ok()) {
    const EncodeInput enc = MissingAsEncodeInput(in, entries, /*for_store=*/true);
    absl::Status stored =
        hooks.remote_encode ? hooks.remote_encode(enc) : EncodeContexts(model, *store, enc, hooks.cancelled).status();
    if (stored.code() == absl::StatusCode::kCancelled) return stored;
    if (stored.ok()) (void)FetchAndVerify(model, fp, *store, in, EntryLoad::Source::kEncoded, hooks.hot_cache, entries);
  }
  if (Cancelled(hooks)) return absl::CancelledError("request cancelled while encoding its contexts");
  return EncodeInMemory(model, in, hooks, entries);
}

int TokensFrom(const std::vector<EntryLoad>& entries, EntryLoad::Source source) {
  int n = 0;
  for (const EntryLoad& e : entries) {
    if (e.source == source) n += e.view().header.num_tokens;
  }
  return n;
}

}  // namespace

absl::StatusOr<std::vector<EntryLoad>> LoadEntries(const Model& model, RedisStore* store, const DecodeInput& in,
                                                   const DecodeHooks& hooks, DecodeStats* stats) {
  const Hash128 fp = FingerprintBytes(model);
  ASSIGN_OR_RETURN(std::vector<EntryLoad> entries, ComputeEntryKeys(fp, in));
  const auto t_load = Clock::now();
  if (hooks.hot_cache != nullptr) TakeFromHotCache(model, fp, in, *hooks.hot_cache, entries);
  for (const EntryLoad& e : entries) {
    if (e.from_hot_cache) stats->hot_cache_tokens += e.view().header.num_tokens;
  }
  absl::Status store_status = absl::OkStatus();
  if (store != nullptr)
    store_status = FetchAndVerify(model, fp, *store, in, EntryLoad::Source::kCache, hooks.hot_cache, entries);
  RETURN_IF_ERROR(RequireKeyOnlyEntries(entries, store_status));
  stats->cached_tokens += TokensFrom(entries, EntryLoad::Source::kCache);
  stats->cache_load_ms += MsBetween(t_load, Clock::now());
  if (std::all_of(entries.begin(), entries.end(), [](const EntryLoad& e) { return e.ready(); })) return entries;

  const auto t_encode = Clock::now();
  RETURN_IF_ERROR(EncodeMissing(model, fp, store, in, hooks, store_status, entries));
  stats->encoded_tokens += TokensFrom(entries, EntryLoad::Source::kEncoded);
  stats->encode_ms += MsBetween(t_encode, Clock::now());
  return entries;
}
absl::Status AppendEntryToCache(const EntryLoad& e, KvCache& cache) {
  if (!e.ready()) return absl::InternalError(absl::StrCat("entry ", e.key, " is not loaded"));
  return AttachKvBlock(e.view(), e.entry, cache);
}

}  // namespace ape
