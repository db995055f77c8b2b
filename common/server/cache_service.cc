#include "common/server/cache_service.h"

#include <algorithm>
#include <chrono>
#include <map>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/engine/status_macros.h"
#include "common/engine/timing.h"
#include "common/kv/cache_key.h"
#include "common/server/kv_dtype.h"
#include "common/server/segments.h"
#include "common/server/server_util.h"

ABSL_FLAG(bool, cache_admin, true,
          "serve ape.v1.Cache (stat, list, touch and delete cache entries) next to this server's own service");

namespace ape {

bool CacheAdminFromFlags() { return absl::GetFlag(FLAGS_cache_admin); }

namespace {

constexpr char kScanPattern[] = "ape:v1:kv:*";

// A content key exactly ("ape:v1:kv:" + 32 hex digits): temporary keys
// ("...:tmp:...") and anything else are not entries.
bool IsContentKey(const std::string& key) {
  static const size_t kKeyBytes = RedisKeyFor(Hash128{}).size();
  return key.size() == kKeyBytes && ParseRedisKey(key).ok();
}

absl::Status CheckKeys(const google::protobuf::RepeatedPtrField<std::string>& keys, int max_keys) {
  if (keys.empty()) return absl::InvalidArgumentError("no keys: send at least one");
  if (keys.size() > max_keys) {
    return absl::InvalidArgumentError(absl::StrCat(keys.size(), " keys, at most ", max_keys, " per request"));
  }
  for (int i = 0; i < keys.size(); ++i) {
    if (!IsContentKey(keys[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("key ", i, ": '", Excerpt(keys[i]), "' is not a cache key (ape:v1:kv: and 32 hex digits)"));
    }
  }
  return absl::OkStatus();
}

std::vector<std::string> Keys(const google::protobuf::RepeatedPtrField<std::string>& keys) {
  return std::vector<std::string>(keys.begin(), keys.end());
}

std::span<const uint8_t> Bytes(const std::string& s) { return {reinterpret_cast<const uint8_t*>(s.data()), s.size()}; }

}  // namespace

CacheService::CacheService(const Model& model, RedisStore& store, std::string server)
    : model_(model), store_(store), server_(std::move(server)) {}

absl::StatusOr<std::vector<v1::CacheEntryInfo>> CacheService::Describe(const std::vector<std::string>& keys) {
  std::vector<v1::CacheEntryInfo> out(keys.size());
  if (keys.empty()) return out;
  ASSIGN_OR_RETURN(std::vector<RedisStore::EntryInfo> seen, store_.Inspect(keys, kKvHeaderFixedBytes));
  for (size_t i = 0; i < keys.size(); ++i) {
    const RedisStore::EntryInfo& e = seen[i];
    v1::CacheEntryInfo& info = out[i];
    info.set_key(keys[i]);
    info.set_stored_bytes(e.bytes);
    info.set_chunks(static_cast<uint32_t>(e.chunks));
    info.set_ttl_seconds(e.ttl_ms < 0 ? -1 : (e.ttl_ms + 999) / 1000);
    info.set_idle_seconds(e.idle_seconds);
    switch (e.state) {
      case StoredValue::State::kMissing:
        info.set_state(v1::ENTRY_MISSING);
        info.set_ttl_seconds(-1);
        continue;
      case StoredValue::State::kOtherType:
        info.set_state(v1::ENTRY_NOT_KV);
        info.set_error("another Redis type than a hash");
        continue;
      case StoredValue::State::kIncomplete:
        info.set_state(v1::ENTRY_INCOMPLETE);
        info.set_error("the hash does not hold exactly the chunks \"0\"..\"n-1\"");
        continue;
      case StoredValue::State::kFound: break;
    }
    if (!HasKvBlockMagic(Bytes(e.head))) {
      info.set_state(v1::ENTRY_NOT_KV);
      info.set_error("not a KV block (no magic)");
      continue;
    }
    absl::StatusOr<KvBlockHeader> h = ParseKvBlockHeader(Bytes(e.head));
    if (!h.ok()) {
      info.set_state(h.status().code() == absl::StatusCode::kUnimplemented ? v1::ENTRY_NEWER_FORMAT
                                                                           : v1::ENTRY_CORRUPT);
      info.set_error(std::string(h.status().message()));
      continue;
    }
    info.set_kind(h->kind == KvKind::kPrefix ? v1::ENTRY_KIND_PREFIX : v1::ENTRY_KIND_CONTEXT);
    info.set_num_tokens(h->num_tokens);
    info.set_first_position(h->first_position);
    info.set_dtype(KvDtypeToProto(h->dtype));
    info.set_model_fingerprint(HashToHex(h->model_fingerprint));
    info.set_prefix_key(RedisKeyFor(h->prefix_key));
    info.set_this_model(info.model_fingerprint() == model_.fingerprint());
    if (const uint64_t want = KvBlockBytes(*h); want != static_cast<uint64_t>(e.bytes)) {
      info.set_state(v1::ENTRY_CORRUPT);
      info.set_error(absl::StrCat("stored ", e.bytes, " bytes, the header describes ", want));
      continue;
    }
    info.set_state(v1::ENTRY_OK);
    info.set_header_verified(true);
  }
  return out;
}

absl::Status CacheService::Verify(std::vector<v1::CacheEntryInfo>& infos) {
  std::vector<std::string> keys;
  for (const auto& info : infos)
    if (info.state() == v1::ENTRY_OK) keys.push_back(info.key());
  ASSIGN_OR_RETURN(std::vector<StoredValue> values, store_.Read(keys));
  // The prefix entries the contexts follow: their tokens are part of the contexts' keys.
  std::map<std::string, absl::StatusOr<std::vector<int32_t>>> prefix_tokens;
  for (const auto& info : infos)
    if (info.state() == v1::ENTRY_OK && info.kind() == v1::ENTRY_KIND_CONTEXT) prefix_tokens[info.prefix_key()];
  std::vector<std::string> prefix_keys;
  for (const auto& [k, unused] : prefix_tokens) prefix_keys.push_back(k);
  ASSIGN_OR_RETURN(std::vector<StoredValue> prefixes, store_.Read(prefix_keys));
  for (size_t i = 0; i < prefix_keys.size(); ++i) {
    auto& tokens = prefix_tokens[prefix_keys[i]];
    absl::StatusOr<KvBlockView> view = prefixes[i].state == StoredValue::State::kFound
                                           ? ParseKvBlock(Bytes(prefixes[i].value))
                                           : absl::StatusOr<KvBlockView>(absl::NotFoundError(absl::StrCat(
                                                 "its prefix entry ", prefix_keys[i], " is not readable")));
    if (view.ok())
      tokens = std::move(view->tokens);
    else
      tokens = view.status();
  }
  size_t next = 0;
  for (auto& info : infos) {
    if (info.state() != v1::ENTRY_OK) continue;
    const StoredValue& v = values[next++];
    if (v.state != StoredValue::State::kFound) {
      info.set_error("the entry changed while it was verified");
      continue;
    }
    absl::StatusOr<KvBlockView> view = ParseKvBlock(Bytes(v.value));
    if (!view.ok()) {
      info.set_error(std::string(view.status().message()));
      continue;
    }
    std::vector<int32_t> none;
    const std::vector<int32_t>* prefix = &none;
    if (info.kind() == v1::ENTRY_KIND_CONTEXT) {
      const auto& tokens = prefix_tokens[info.prefix_key()];
      if (!tokens.ok()) {
        info.set_error(std::string(tokens.status().message()));
        continue;
      }
      prefix = &*tokens;
    }
    absl::Status key = CheckKvBlockKey(*view, *ParseRedisKey(info.key()), *prefix);
    if (!key.ok()) {
      info.set_error(std::string(key.message()));
      continue;
    }
    info.set_verified(true);
  }
  return absl::OkStatus();
}

// ---- Stat, Delete, Touch ------------------------------------------------------

absl::Status CacheService::DoStat(const v1::StatRequest& req, v1::StatResponse* resp) {
  RETURN_IF_ERROR(CheckKeys(req.keys(), req.verify() ? kMaxVerifyKeys : kMaxKeys));
  ASSIGN_OR_RETURN(std::vector<v1::CacheEntryInfo> infos, Describe(Keys(req.keys())));
  if (req.verify()) RETURN_IF_ERROR(Verify(infos));
  for (auto& info : infos) *resp->add_entries() = std::move(info);
  return absl::OkStatus();
}

grpc::Status CacheService::Stat(grpc::ServerContext*, const v1::StatRequest* req, v1::StatResponse* resp) {
  const auto t0 = std::chrono::steady_clock::now();
  const absl::Status s = DoStat(*req, resp);
  int found = 0;
  for (const auto& e : resp->entries()) found += e.state() != v1::ENTRY_MISSING;
  LogRequest(
      server_, "Cache.Stat", s,
      absl::StrFormat("keys=%d found=%d verify=%d total_ms=%.2f", req->keys_size(), found, req->verify(), MsSince(t0)));
  return ToGrpcStatus(s);
}

grpc::Status CacheService::Delete(grpc::ServerContext*, const v1::DeleteRequest* req, v1::DeleteResponse* resp) {
  const auto t0 = std::chrono::steady_clock::now();
  absl::Status s = CheckKeys(req->keys(), kMaxKeys);
  if (s.ok()) {
    absl::StatusOr<std::vector<bool>> existed = store_.DeleteEach(Keys(req->keys()));
    s = existed.status();
    for (size_t i = 0; s.ok() && i < existed->size(); ++i) {
      if (on_delete_) on_delete_(req->keys(i));  // also when Redis had lost it: a hot copy must go too
      if ((*existed)[i])
        resp->set_deleted(resp->deleted() + 1);
      else
        resp->add_missing(req->keys(i));
    }
  }
  LogRequest(server_, "Cache.Delete", s,
             absl::StrFormat("keys=%d deleted=%d total_ms=%.2f", req->keys_size(), resp->deleted(), MsSince(t0)));
  return ToGrpcStatus(s);
}

grpc::Status CacheService::Touch(grpc::ServerContext*, const v1::TouchRequest* req, v1::TouchResponse* resp) {
  const auto t0 = std::chrono::steady_clock::now();
  absl::Status s = CheckKeys(req->keys(), kMaxKeys);
  if (s.ok() && req->ttl_seconds() > (1u << 30)) {
    s = absl::InvalidArgumentError(absl::StrCat("ttl_seconds ", req->ttl_seconds(), " is over 2^30"));
  }
  if (s.ok()) {
    absl::StatusOr<std::vector<bool>> existed = store_.Expire(Keys(req->keys()), static_cast<int>(req->ttl_seconds()));
    s = existed.status();
    for (size_t i = 0; s.ok() && i < existed->size(); ++i) {
      if ((*existed)[i])
        resp->set_touched(resp->touched() + 1);
      else
        resp->add_missing(req->keys(i));
    }
  }
  LogRequest(server_, "Cache.Touch", s,
             absl::StrFormat("keys=%d ttl_seconds=%d touched=%d total_ms=%.2f", req->keys_size(), req->ttl_seconds(),
                             resp->touched(), MsSince(t0)));
  return ToGrpcStatus(s);
}

// ---- List, Totals -------------------------------------------------------------

absl::Status CacheService::DoList(const v1::ListRequest& req, v1::ListResponse* resp) {
  if (!req.model_fingerprint().empty() && !HashFromHex(req.model_fingerprint()).ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("model_fingerprint '", Excerpt(req.model_fingerprint()), "' is not 32 hex digits"));
  }
  if (!req.prefix_key().empty() && !IsContentKey(req.prefix_key())) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefix_key '", Excerpt(req.prefix_key()), "' is not a cache key (ape:v1:kv: and 32 hex digits)"));
  }
  const uint32_t limit = req.limit() == 0 ? kDefaultLimit : std::min(req.limit(), kMaxLimit);
  const bool filtered = !req.model_fingerprint().empty() || !req.prefix_key().empty();
  std::string cursor = req.cursor();
  size_t scanned = 0;
  do {
    ASSIGN_OR_RETURN(RedisStore::ScanPage page, store_.ScanFrom(cursor, kScanPattern, limit));
    cursor = page.cursor;
    std::vector<std::string> keys;
    for (auto& k : page.keys)
      if (IsContentKey(k)) keys.push_back(std::move(k));
    scanned += keys.size();
    ASSIGN_OR_RETURN(std::vector<v1::CacheEntryInfo> infos, Describe(keys));
    for (auto& info : infos) {
      if (info.state() == v1::ENTRY_MISSING) continue;  // deleted or expired since SCAN saw it
      if (filtered && info.state() != v1::ENTRY_OK) continue;
      if (!req.model_fingerprint().empty() && info.model_fingerprint() != req.model_fingerprint()) continue;
      if (!req.prefix_key().empty() && info.prefix_key() != req.prefix_key()) continue;
      *resp->add_entries() = std::move(info);
    }
  } while (!cursor.empty() && resp->entries_size() < static_cast<int>(limit) && scanned < kMaxScannedFactor * limit);
  resp->set_next_cursor(cursor);
  resp->set_scanned(static_cast<uint32_t>(scanned));
  return absl::OkStatus();
}

grpc::Status CacheService::List(grpc::ServerContext*, const v1::ListRequest* req, v1::ListResponse* resp) {
  const auto t0 = std::chrono::steady_clock::now();
  const absl::Status s = DoList(*req, resp);
  LogRequest(server_, "Cache.List", s,
             absl::StrFormat("limit=%d model_filter=%d prefix_filter=%d scanned=%d entries=%d more=%d total_ms=%.2f",
                             req->limit(), !req->model_fingerprint().empty(), !req->prefix_key().empty(),
                             resp->scanned(), resp->entries_size(), !resp->next_cursor().empty(), MsSince(t0)));
  return ToGrpcStatus(s);
}

absl::Status CacheService::DoTotals(v1::TotalsResponse* resp) {
  const auto t0 = std::chrono::steady_clock::now();
  std::map<std::string, v1::ModelTotals> by_model;
  std::string cursor;
  do {
    ASSIGN_OR_RETURN(RedisStore::ScanPage page, store_.ScanFrom(cursor, kScanPattern, 1000));
    cursor = page.cursor;
    std::vector<std::string> keys;
    for (auto& k : page.keys)
      if (IsContentKey(k)) keys.push_back(std::move(k));
    ASSIGN_OR_RETURN(std::vector<v1::CacheEntryInfo> infos, Describe(keys));
    for (const auto& info : infos) {
      if (info.state() == v1::ENTRY_MISSING) continue;
      v1::ModelTotals& t = by_model[info.state() == v1::ENTRY_OK ? info.model_fingerprint() : ""];
      t.set_entries(t.entries() + 1);
      t.set_bytes(t.bytes() + info.stored_bytes());
      t.set_tokens(t.tokens() + info.num_tokens());
      resp->set_entries(resp->entries() + 1);
      resp->set_bytes(resp->bytes() + info.stored_bytes());
    }
  } while (!cursor.empty());
  std::vector<v1::ModelTotals> models;
  for (auto& [fp, t] : by_model) {
    t.set_model_fingerprint(fp);
    t.set_this_model(fp == model_.fingerprint());
    models.push_back(std::move(t));
  }
  std::sort(models.begin(), models.end(), [](const auto& a, const auto& b) { return a.bytes() > b.bytes(); });
  for (auto& m : models) *resp->add_models() = std::move(m);
  resp->set_scan_ms(MsSince(t0));
  return absl::OkStatus();
}

grpc::Status CacheService::Totals(grpc::ServerContext*, const v1::TotalsRequest*, v1::TotalsResponse* resp) {
  const auto t0 = std::chrono::steady_clock::now();
  const absl::Status s = DoTotals(resp);
  LogRequest(server_, "Cache.Totals", s,
             absl::StrFormat("entries=%d bytes=%d models=%d total_ms=%.2f", resp->entries(), resp->bytes(),
                             resp->models_size(), MsSince(t0)));
  return ToGrpcStatus(s);
}

}  // namespace ape
