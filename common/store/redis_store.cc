#include "common/store/redis_store.h"

#include <hiredis/hiredis.h>
#include <sys/time.h>

#include <cstring>
#include <functional>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/engine/status_macros.h"

namespace ape {
namespace {

// Idle connections kept for reuse; more concurrent callers open their own.
constexpr size_t kMaxIdleConnections = 16;
// A temporary key left by a writer that died mid-write expires after this.
constexpr char kTempKeyTtlSeconds[] = "600";
// Keys SCAN examines per round trip (a hint to Redis, not a limit).
constexpr char kScanBatch[] = "1000";
constexpr char kWrongType[] = "WRONGTYPE";

bool IsWrongType(const redisReply* r) {
  return r->type == REDIS_REPLY_ERROR && absl::StartsWith(absl::string_view(r->str, r->len), kWrongType);
}

struct ReplyDeleter {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, ReplyDeleter>;

timeval Millis(int ms) { return timeval{ms / 1000, (ms % 1000) * 1000}; }

std::string PercentDecode(absl::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    int hi, lo;
    auto hex = [](char c) {
      return c >= '0' && c <= '9'   ? c - '0'
             : c >= 'a' && c <= 'f' ? c - 'a' + 10
             : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                    : -1;
    };
    if (s[i] == '%' && i + 2 < s.size() + 0 && (hi = hex(s[i + 1])) >= 0 && (lo = hex(s[i + 2])) >= 0) {
      out += static_cast<char>(hi * 16 + lo);
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

// Maps an error reply to a status. OOM means Redis is full.
absl::Status ErrorReply(const redisReply* r, absl::string_view what) {
  std::string msg(r->str, r->len);
  if (msg.rfind("OOM", 0) == 0) return absl::ResourceExhaustedError(absl::StrCat("redis ", what, ": ", msg));
  if (msg.rfind("NOAUTH", 0) == 0 || msg.rfind("WRONGPASS", 0) == 0 || msg.rfind("NOPERM", 0) == 0) {
    return absl::PermissionDeniedError(absl::StrCat("redis ", what, ": ", msg));
  }
  if (msg.rfind("LOADING", 0) == 0 || msg.rfind("BUSY", 0) == 0)
    return absl::UnavailableError(absl::StrCat("redis ", what, ": ", msg));
  return absl::InternalError(absl::StrCat("redis ", what, ": ", msg));
}

std::string RandomHex() {
  thread_local std::mt19937_64 rng(std::random_device{}());
  return absl::StrCat(absl::Hex(rng(), absl::kZeroPad16));
}

}  // namespace

std::string RedisConfig::Describe() const {
  return unix_socket.empty() ? absl::StrCat(host, ":", port, "/", db) : absl::StrCat(unix_socket, "/", db);
}

absl::StatusOr<RedisConfig> ParseRedisUri(absl::string_view uri) {
  RedisConfig c;
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("redis URI '", uri, "': ", why));
  };
  if (absl::ConsumePrefix(&uri, "unix://")) {
    size_t q = uri.find('?');
    c.unix_socket = std::string(uri.substr(0, q));
    if (c.unix_socket.empty()) return bad("no socket path");
    if (q != absl::string_view::npos) {
      absl::string_view query = uri.substr(q + 1);
      if (!absl::ConsumePrefix(&query, "db=") || !absl::SimpleAtoi(query, &c.db) || c.db < 0) return bad("bad ?db=");
    }
    return c;
  }
  if (!absl::ConsumePrefix(&uri, "redis://")) return bad("must start with redis:// or unix://");
  size_t at = uri.rfind('@');
  if (at != absl::string_view::npos) {
    absl::string_view auth = uri.substr(0, at);
    uri = uri.substr(at + 1);
    size_t colon = auth.find(':');
    if (colon == absl::string_view::npos) {
      c.password = PercentDecode(auth);  // redis://password@host
    } else {
      c.user = PercentDecode(auth.substr(0, colon));
      c.password = PercentDecode(auth.substr(colon + 1));
    }
  }
  size_t slash = uri.find('/');
  absl::string_view hostport = uri.substr(0, slash);
  if (slash != absl::string_view::npos) {
    absl::string_view db = uri.substr(slash + 1);
    if (!db.empty() && (!absl::SimpleAtoi(db, &c.db) || c.db < 0)) return bad("database must be a number");
  }
  absl::string_view port;
  if (absl::ConsumePrefix(&hostport, "[")) {  // [ipv6]:port
    size_t close = hostport.find(']');
    if (close == absl::string_view::npos) return bad("unclosed [");
    absl::string_view rest = hostport.substr(close + 1);
    hostport = hostport.substr(0, close);
    if (absl::ConsumePrefix(&rest, ":")) port = rest;
  } else if (size_t colon = hostport.rfind(':'); colon != absl::string_view::npos) {
    port = hostport.substr(colon + 1);
    hostport = hostport.substr(0, colon);
  }
  if (!port.empty() && (!absl::SimpleAtoi(port, &c.port) || c.port <= 0 || c.port > 65535)) return bad("bad port");
  if (!hostport.empty()) c.host = std::string(hostport);
  return c;
}

void RedisStore::ContextDeleter::operator()(redisContext* c) const { redisFree(c); }

RedisStore::RedisStore(RedisConfig config) : config_(std::move(config)) {}
RedisStore::~RedisStore() = default;

absl::StatusOr<RedisStore::Acquired> RedisStore::Acquire() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!idle_.empty()) {
      Context c = std::move(idle_.back());
      idle_.pop_back();
      return Acquired{std::move(c), /*reused=*/true};
    }
  }
  const timeval ct = Millis(config_.connect_timeout_ms);
  Context c(config_.unix_socket.empty() ? redisConnectWithTimeout(config_.host.c_str(), config_.port, ct)
                                        : redisConnectUnixWithTimeout(config_.unix_socket.c_str(), ct));
  if (!c) return absl::ResourceExhaustedError("cannot allocate a redis context");
  if (c->err) {
    return absl::UnavailableError(absl::StrCat("redis ", config_.Describe(), " unreachable: ", c->errstr));
  }
  if (redisSetTimeout(c.get(), Millis(config_.command_timeout_ms)) != REDIS_OK) {
    return absl::UnavailableError(absl::StrCat("redis ", config_.Describe(), ": cannot set timeout"));
  }
  auto simple = [&](std::vector<std::string> argv, absl::string_view what) -> absl::Status {
    std::vector<const char*> ptrs;
    std::vector<size_t> lens;
    for (auto& a : argv) {
      ptrs.push_back(a.data());
      lens.push_back(a.size());
    }
    Reply r(static_cast<redisReply*>(redisCommandArgv(c.get(), argv.size(), ptrs.data(), lens.data())));
    if (!r) return absl::UnavailableError(absl::StrCat("redis ", config_.Describe(), " ", what, ": ", c->errstr));
    if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r.get(), what);
    return absl::OkStatus();
  };
  if (!config_.password.empty()) {
    if (config_.user.empty())
      RETURN_IF_ERROR(simple({"AUTH", config_.password}, "AUTH"));
    else
      RETURN_IF_ERROR(simple({"AUTH", config_.user, config_.password}, "AUTH"));
  }
  if (config_.db != 0) RETURN_IF_ERROR(simple({"SELECT", absl::StrCat(config_.db)}, "SELECT"));
  return Acquired{std::move(c), /*reused=*/false};
}

void RedisStore::Release(Context c) {
  std::lock_guard<std::mutex> lock(mu_);
  if (idle_.size() < kMaxIdleConnections) idle_.push_back(std::move(c));
}

namespace {
// A reused connection that fails this way was closed by the server side
// (typically: Redis restarted), not slow: the commands never ran there, so
// they may be sent again on a fresh connection.
bool ClosedByPeer(const redisContext* c) {
  if (c->err == REDIS_ERR_EOF) return true;
  const absl::string_view err(c->errstr);
  return c->err == REDIS_ERR_IO && (absl::StrContains(err, "reset by peer") || absl::StrContains(err, "Broken pipe"));
}
}  // namespace

absl::Status RedisStore::Pipeline(const std::vector<std::vector<absl::string_view>>& commands,
                                  const std::function<absl::Status(size_t, void*)>& on_reply) {
  ASSIGN_OR_RETURN(Acquired a, Acquire());
  bool retry = false;
  absl::Status s = PipelineOn(std::move(a.context), commands, on_reply, a.reused ? &retry : nullptr);
  if (!retry) return s;
  // Every idle connection predates the same restart: drop them all, and try
  // once more on a connection made now.
  {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.clear();
  }
  ASSIGN_OR_RETURN(a, Acquire());
  return PipelineOn(std::move(a.context), commands, on_reply, nullptr);
}

absl::Status RedisStore::PipelineOn(Context c, const std::vector<std::vector<absl::string_view>>& commands,
                                    const std::function<absl::Status(size_t, void*)>& on_reply, bool* retry) {
  std::vector<const char*> ptrs;
  std::vector<size_t> lens;
  for (const auto& argv : commands) {
    ptrs.clear();
    lens.clear();
    for (auto a : argv) {
      ptrs.push_back(a.data());
      lens.push_back(a.size());
    }
    if (redisAppendCommandArgv(c.get(), argv.size(), ptrs.data(), lens.data()) != REDIS_OK) {
      return absl::UnavailableError(absl::StrCat("redis ", config_.Describe(), ": ", c->errstr));
    }
  }
  absl::Status first_error;
  for (size_t i = 0; i < commands.size(); ++i) {
    void* raw = nullptr;
    if (redisGetReply(c.get(), &raw) != REDIS_OK || raw == nullptr) {
      // I/O error or timeout: the connection is out of sync; drop it. Only
      // when nothing was answered yet can the whole pipeline be resent.
      if (retry != nullptr && i == 0 && ClosedByPeer(c.get())) *retry = true;
      return absl::UnavailableError(
          absl::StrCat("redis ", config_.Describe(), ": ", c->errstr[0] ? c->errstr : "connection lost"));
    }
    Reply r(static_cast<redisReply*>(raw));
    if (on_reply && first_error.ok()) first_error = on_reply(i, r.get());
  }
  Release(std::move(c));
  return first_error;
}

absl::Status RedisStore::Ping() {
  return Pipeline({{"PING"}}, [](size_t, void* raw) {
    auto* r = static_cast<redisReply*>(raw);
    return r->type == REDIS_REPLY_ERROR ? ErrorReply(r, "PING") : absl::OkStatus();
  });
}

absl::StatusOr<std::vector<bool>> RedisStore::Exists(const std::vector<std::string>& keys) {
  std::vector<std::vector<absl::string_view>> cmds;
  // An entry exists when its key is a hash with a first chunk; anything else
  // there (a wrong type, junk) counts as absent and will be overwritten.
  for (const auto& k : keys) cmds.push_back({"HEXISTS", k, "0"});
  std::vector<bool> out(keys.size());
  RETURN_IF_ERROR(Pipeline(cmds, [&](size_t i, void* raw) {
    auto* r = static_cast<redisReply*>(raw);
    if (IsWrongType(r)) return absl::OkStatus();
    if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "HEXISTS");
    out[i] = r->type == REDIS_REPLY_INTEGER && r->integer > 0;
    return absl::OkStatus();
  }));
  return out;
}

absl::Status RedisStore::Put(const std::string& key, absl::string_view value, int ttl_seconds) {
  // 1. Fill a temporary key, chunk by chunk (each HSET under the bulk limit).
  const std::string tmp = absl::StrCat(key, ":tmp:", RandomHex());
  const size_t chunk = std::max<size_t>(config_.chunk_bytes, 1);
  std::vector<std::string> fields;
  for (size_t off = 0, i = 0; off < value.size() || i == 0; off += chunk, ++i) fields.push_back(absl::StrCat(i));
  std::vector<std::vector<absl::string_view>> fill;
  for (size_t i = 0; i < fields.size(); ++i) {
    fill.push_back({"HSET", tmp, fields[i], value.substr(i * chunk, chunk)});
    if (i == 0) fill.push_back({"EXPIRE", tmp, kTempKeyTtlSeconds});  // abandoned temps vanish
  }
  RETURN_IF_ERROR(Pipeline(fill, [](size_t, void* raw) {
    auto* r = static_cast<redisReply*>(raw);
    return r->type == REDIS_REPLY_ERROR ? ErrorReply(r, "HSET") : absl::OkStatus();
  }));
  // 2. Publish: rename and set the expiry in one transaction.
  const std::string ttl = absl::StrCat(ttl_seconds);
  std::vector<std::vector<absl::string_view>> publish = {{"MULTI"}, {"RENAME", tmp, key}};
  if (ttl_seconds > 0)
    publish.push_back({"EXPIRE", key, ttl});
  else
    publish.push_back({"PERSIST", key});
  publish.push_back({"EXEC"});
  return Pipeline(publish, [&](size_t i, void* raw) -> absl::Status {
    auto* r = static_cast<redisReply*>(raw);
    if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "publish");
    if (i + 1 < publish.size()) return absl::OkStatus();
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 1) return absl::AbortedError("redis: transaction aborted");
    if (r->element[0]->type == REDIS_REPLY_ERROR) {
      // The temp key vanished (evicted) before RENAME: nothing was published.
      return absl::ResourceExhaustedError(
          absl::StrCat("redis evicted entry ", key, " while it was being written (maxmemory too small?)"));
    }
    return absl::OkStatus();
  });
}

absl::StatusOr<std::vector<StoredValue>> RedisStore::Read(const std::vector<std::string>& keys) {
  std::vector<std::vector<absl::string_view>> cmds;
  for (const auto& k : keys) cmds.push_back({"HGETALL", k});
  std::vector<StoredValue> out(keys.size());
  RETURN_IF_ERROR(Pipeline(cmds, [&](size_t i, void* raw) {
    auto* r = static_cast<redisReply*>(raw);
    if (IsWrongType(r)) {  // something else lives at the key
      out[i].state = StoredValue::State::kOtherType;
      return absl::OkStatus();
    }
    if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "HGETALL");
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) return absl::OkStatus();  // kMissing
    out[i].state = StoredValue::State::kIncomplete;
    if (r->elements % 2 != 0) return absl::OkStatus();
    // Fields must be exactly "0".."n-1"; order them.
    const size_t n = r->elements / 2;
    std::vector<const redisReply*> chunks(n, nullptr);
    size_t total = 0;
    for (size_t f = 0; f < n; ++f) {
      const redisReply* name = r->element[2 * f];
      const redisReply* val = r->element[2 * f + 1];
      size_t idx;
      if (name->type != REDIS_REPLY_STRING || val->type != REDIS_REPLY_STRING ||
          !absl::SimpleAtoi(absl::string_view(name->str, name->len), &idx) || idx >= n || chunks[idx]) {
        return absl::OkStatus();  // a stray or missing field: kIncomplete
      }
      chunks[idx] = val;
      total += val->len;
    }
    out[i].value.reserve(total);
    for (const redisReply* c : chunks) out[i].value.append(c->str, c->len);
    out[i].state = StoredValue::State::kFound;
    return absl::OkStatus();
  }));
  return out;
}

absl::StatusOr<std::vector<std::optional<std::string>>> RedisStore::GetMany(const std::vector<std::string>& keys) {
  ASSIGN_OR_RETURN(std::vector<StoredValue> read, Read(keys));
  std::vector<std::optional<std::string>> out(keys.size());
  for (size_t i = 0; i < read.size(); ++i) {
    if (read[i].state == StoredValue::State::kFound) out[i] = std::move(read[i].value);
  }
  return out;
}

absl::StatusOr<int64_t> RedisStore::Delete(const std::vector<std::string>& keys) {
  if (keys.empty()) return 0;
  std::vector<absl::string_view> argv = {"DEL"};
  for (const auto& k : keys) argv.push_back(k);
  int64_t n = 0;
  RETURN_IF_ERROR(Pipeline({argv}, [&](size_t, void* raw) {
    auto* r = static_cast<redisReply*>(raw);
    if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "DEL");
    n = r->integer;
    return absl::OkStatus();
  }));
  return n;
}

absl::StatusOr<std::vector<std::string>> RedisStore::Scan(const std::string& pattern, size_t limit) {
  std::vector<std::string> keys;
  std::string cursor = "0";
  do {
    RETURN_IF_ERROR(Pipeline({{"SCAN", cursor, "MATCH", pattern, "COUNT", kScanBatch}}, [&](size_t, void* raw) {
      auto* r = static_cast<redisReply*>(raw);
      if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "SCAN");
      if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) return absl::InternalError("redis SCAN: bad reply");
      cursor.assign(r->element[0]->str, r->element[0]->len);
      for (size_t i = 0; i < r->element[1]->elements; ++i) {
        keys.emplace_back(r->element[1]->element[i]->str, r->element[1]->element[i]->len);
      }
      return absl::OkStatus();
    }));
  } while (cursor != "0" && keys.size() < limit);
  if (keys.size() > limit) keys.resize(limit);
  return keys;
}

}  // namespace ape
