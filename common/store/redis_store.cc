#include "common/store/redis_store.h"

#include <hiredis/hiredis.h>
#include <sys/time.h>

#include <algorithm>
#include <cassert>
#include <chrono>
#include <cstring>
#include <functional>
#include <optional>
#include <random>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/engine/status_macros.h"
#include "common/store/redis_cluster.h"

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

std::string RandomHex() {
  thread_local std::mt19937_64 rng(std::random_device{}());
  return absl::StrCat(absl::Hex(rng(), absl::kZeroPad16));
}

// host[:port] or [ipv6][:port] into *host and *port (each unchanged when absent).
absl::Status ParseHostPort(absl::string_view hostport, std::string* host, int* port) {
  absl::string_view port_text;
  if (absl::ConsumePrefix(&hostport, "[")) {  // [ipv6]:port
    size_t close = hostport.find(']');
    if (close == absl::string_view::npos) return absl::InvalidArgumentError("unclosed [");
    absl::string_view rest = hostport.substr(close + 1);
    hostport = hostport.substr(0, close);
    if (absl::ConsumePrefix(&rest, ":")) port_text = rest;
  } else if (size_t colon = hostport.rfind(':'); colon != absl::string_view::npos) {
    port_text = hostport.substr(colon + 1);
    hostport = hostport.substr(0, colon);
  }
  if (!port_text.empty() && (!absl::SimpleAtoi(port_text, port) || *port <= 0 || *port > 65535)) {
    return absl::InvalidArgumentError("bad port");
  }
  if (!hostport.empty()) *host = std::string(hostport);
  return absl::OkStatus();
}

}  // namespace

namespace redis {

absl::Status ErrorReply(const redisReply* r, absl::string_view what) {
  return ErrorMessage(absl::string_view(r->str, r->len), what);
}

absl::Status ErrorMessage(absl::string_view msg, absl::string_view what) {
  if (msg.rfind("OOM", 0) == 0) return absl::ResourceExhaustedError(absl::StrCat("redis ", what, ": ", msg));
  if (msg.rfind("NOAUTH", 0) == 0 || msg.rfind("WRONGPASS", 0) == 0 || msg.rfind("NOPERM", 0) == 0) {
    return absl::PermissionDeniedError(absl::StrCat("redis ", what, ": ", msg));
  }
  if (msg.rfind("LOADING", 0) == 0 || msg.rfind("BUSY", 0) == 0 || msg.rfind("CLUSTERDOWN", 0) == 0)
    return absl::UnavailableError(absl::StrCat("redis ", what, ": ", msg));
  if (msg.rfind("MOVED ", 0) == 0 || msg.rfind("ASK ", 0) == 0) {  // a cluster node behind a redis:// URI
    return absl::InternalError(absl::StrCat("redis ", what, ": ", msg, " (a Redis Cluster: use redis+cluster://)"));
  }
  return absl::InternalError(absl::StrCat("redis ", what, ": ", msg));
}

}  // namespace redis

using redis::ErrorReply;

std::string RedisConfig::Describe() const {
  if (cluster) {
    std::vector<std::string> seeds;
    for (const RedisAddress& a : cluster_seeds) seeds.push_back(absl::StrCat(a.host, ":", a.port));
    return absl::StrCat("cluster ", absl::StrJoin(seeds, ","));
  }
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
  if (absl::ConsumePrefix(&uri, "redis+cluster://")) {
    c.cluster = true;
  } else if (!absl::ConsumePrefix(&uri, "redis://")) {
    return bad("must start with redis://, redis+cluster:// or unix://");
  }
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
  if (!c.cluster) {
    if (absl::Status s = ParseHostPort(hostport, &c.host, &c.port); !s.ok()) return bad(s.message());
    return c;
  }
  // Cluster: seed nodes, comma-separated; one database only.
  if (c.db != 0) return bad("a Redis Cluster has only database 0");
  for (absl::string_view seed : absl::StrSplit(hostport, ',')) {
    RedisAddress a{.host = c.host, .port = c.port};
    if (seed.empty()) return bad("empty seed node");
    if (absl::Status s = ParseHostPort(seed, &a.host, &a.port); !s.ok()) return bad(s.message());
    c.cluster_seeds.push_back(std::move(a));
  }
  c.host = c.cluster_seeds[0].host;
  c.port = c.cluster_seeds[0].port;
  return c;
}

// ---- One node: a pool of connections and pipelines ------------------------------

namespace redis {

void Node::ContextDeleter::operator()(redisContext* c) const { redisFree(c); }

Node::Node(RedisConfig config)
    : config_(std::move(config)),
      address_(config_.unix_socket.empty() ? absl::StrCat(config_.host, ":", config_.port) : config_.unix_socket) {}
Node::~Node() = default;

absl::StatusOr<Node::Acquired> Node::Acquire() {
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

void Node::Release(Context c) {
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

absl::Status Node::WithStaleRetry(const Attempt& attempt) {
  ASSIGN_OR_RETURN(Acquired a, Acquire());
  bool retry = false;
  absl::Status s = attempt(std::move(a.context), a.reused ? &retry : nullptr);
  if (!retry) return s;
  // Every idle connection predates the same restart: drop them all, and try
  // once more on a connection made now.
  {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.clear();
  }
  ASSIGN_OR_RETURN(a, Acquire());
  return attempt(std::move(a.context), nullptr);
}

absl::Status Node::Pipeline(const std::vector<Command>& commands, const OnReply& on_reply) {
  return WithStaleRetry([&](Context c, bool* retry) { return PipelineOn(std::move(c), commands, on_reply, retry); });
}

absl::Status Node::Send(redisContext* c, const std::vector<Command>& commands, bool* retry) {
  std::vector<const char*> ptrs;
  std::vector<size_t> lens;
  for (const auto& argv : commands) {
    ptrs.clear();
    lens.clear();
    for (auto a : argv) {
      ptrs.push_back(a.data());
      lens.push_back(a.size());
    }
    if (redisAppendCommandArgv(c, argv.size(), ptrs.data(), lens.data()) != REDIS_OK) {
      return absl::UnavailableError(absl::StrCat("redis ", config_.Describe(), ": ", c->errstr));
    }
  }
  for (int done = 0; !done;) {
    if (redisBufferWrite(c, &done) != REDIS_OK) {
      if (retry != nullptr && ClosedByPeer(c)) *retry = true;  // nothing was answered yet
      return absl::UnavailableError(
          absl::StrCat("redis ", config_.Describe(), ": ", c->errstr[0] ? c->errstr : "connection lost"));
    }
  }
  return absl::OkStatus();
}

absl::Status Node::PipelineOn(Context c, const std::vector<Command>& commands, const OnReply& on_reply, bool* retry) {
  RETURN_IF_ERROR(Send(c.get(), commands, retry));
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

absl::Status Node::PipelineRaw(const std::vector<Command>& commands,
                               const std::function<absl::Status(RespReader&)>& read_replies) {
  return WithStaleRetry(
      [&](Context c, bool* retry) { return PipelineRawOn(std::move(c), commands, read_replies, retry); });
}

absl::Status Node::PipelineRawOn(Context c, const std::vector<Command>& commands,
                                 const std::function<absl::Status(RespReader&)>& read_replies, bool* retry) {
  // Every earlier reply on this connection was read whole, so hiredis holds
  // no bytes of the stream; if it ever did, they would be lost here.
  if (c->reader != nullptr && c->reader->pos != c->reader->len) {
    return absl::InternalError("redis: unread bytes in a pooled connection");
  }
  RETURN_IF_ERROR(Send(c.get(), commands, retry));
  RespReader reader(SocketSource(c->fd, config_.Describe()));
  absl::Status s = read_replies(reader);
  if (!s.ok()) {
    // Closed under us before any byte of a reply: as Pipeline, resend once.
    if (retry != nullptr && reader.bytes_read() == 0 && !absl::StrContains(s.message(), "timed out")) *retry = true;
    return s;
  }
  Release(std::move(c));
  return absl::OkStatus();
}

}  // namespace redis

// ---- The store ----------------------------------------------------------------

RedisStore::RedisStore(RedisConfig config) : config_(std::move(config)) {
  if (config_.cluster)
    cluster_ = std::make_unique<redis::Cluster>(config_);
  else
    node_ = std::make_unique<redis::Node>(config_);
}
RedisStore::~RedisStore() = default;

RedisStore::ClusterStats RedisStore::cluster_stats() const { return cluster_ ? cluster_->stats() : ClusterStats{}; }

// Reports one public call to the observer when it goes out of scope: ok is
// set by the call on success (an early error return leaves it false).
class RedisStore::Observed {
 public:
  Observed(const RedisStore& store, const char* op)
      : store_(store), op_(op), start_(std::chrono::steady_clock::now()) {}
  ~Observed() {
    if (!store_.observer_) return;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    store_.observer_(CallStats{op_, seconds, bytes_read, bytes_written, ok});
  }
  template <typename T>
  T Done(T result) {
    ok = result.ok();
    return result;
  }
  uint64_t bytes_read = 0, bytes_written = 0;
  bool ok = false;

 private:
  const RedisStore& store_;
  const char* op_;
  const std::chrono::steady_clock::time_point start_;
};

absl::Status RedisStore::Run(const std::vector<redis::Unit>& units,
                             const std::function<absl::Status(size_t, size_t, const redisReply*)>& on_reply) {
  if (cluster_) return cluster_->Run(units, on_reply);
  // One node: every command of every unit in one pipeline, in order.
  std::vector<redis::Command> commands;
  std::vector<std::pair<size_t, size_t>> from;  // command i = command .second of unit .first
  for (size_t u = 0; u < units.size(); ++u) {
    for (size_t c = 0; c < units[u].commands.size(); ++c) {
      commands.push_back(units[u].commands[c]);
      from.emplace_back(u, c);
    }
  }
  return node_->Pipeline(commands,
                         [&](size_t i, const redisReply* r) { return on_reply(from[i].first, from[i].second, r); });
}

absl::Status RedisStore::ForEachNode(const std::function<absl::Status(redis::Node&)>& fn) {
  if (!cluster_) return fn(*node_);
  ASSIGN_OR_RETURN(std::vector<redis::Node*> masters, cluster_->Masters());
  for (redis::Node* n : masters) {
    if (absl::Status s = fn(*n); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("redis cluster master ", n->address(), ": ", s.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status RedisStore::Ping() {
  Observed obs(*this, "ping");
  return obs.Done(ForEachNode([](redis::Node& node) {
    return node.Pipeline({{"PING"}}, [](size_t, const redisReply* r) {
      return r->type == REDIS_REPLY_ERROR ? ErrorReply(r, "PING") : absl::OkStatus();
    });
  }));
}

absl::StatusOr<std::vector<bool>> RedisStore::Exists(const std::vector<std::string>& keys) {
  Observed obs(*this, "exists");
  std::vector<redis::Unit> units;
  // An entry exists when its key is a hash with a first chunk; anything else
  // there (a wrong type, junk) counts as absent and will be overwritten.
  for (const auto& k : keys) units.push_back({k, {{"HEXISTS", k, "0"}}});
  std::vector<char> found(keys.size(), 0);  // not vector<bool>: replies may come from several threads
  RETURN_IF_ERROR(Run(units, [&](size_t i, size_t, const redisReply* r) {
    if (IsWrongType(r)) return absl::OkStatus();
    if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "HEXISTS");
    found[i] = r->type == REDIS_REPLY_INTEGER && r->integer > 0;
    return absl::OkStatus();
  }));
  obs.ok = true;
  return std::vector<bool>(found.begin(), found.end());
}

absl::Status RedisStore::Put(const std::string& key, absl::string_view value, int ttl_seconds) {
  Observed obs(*this, "put");
  obs.bytes_written = value.size();
  // 1. Fill a temporary key, chunk by chunk (each HSET under the bulk limit).
  //    On a cluster the temporary key's hash tag is the key itself, so both
  //    are in one slot, on one master, and RENAME may join them.
  if (cluster_ && (absl::StrContains(key, '{') || absl::StrContains(key, '}'))) {
    return absl::InvalidArgumentError(
        absl::StrCat("redis cluster: key '", key, "' holds a brace; its temporary key could not share its slot"));
  }
  const std::string tmp =
      cluster_ ? absl::StrCat("{", key, "}:tmp:", RandomHex()) : absl::StrCat(key, ":tmp:", RandomHex());
  assert(!cluster_ || redis::KeySlot(tmp) == redis::KeySlot(key));
  const size_t chunk = std::max<size_t>(config_.chunk_bytes, 1);
  std::vector<std::string> fields;
  for (size_t off = 0, i = 0; off < value.size() || i == 0; off += chunk, ++i) fields.push_back(absl::StrCat(i));
  std::vector<redis::Unit> fill;
  for (size_t i = 0; i < fields.size(); ++i) {
    fill.push_back({tmp, {{"HSET", tmp, fields[i], value.substr(i * chunk, chunk)}}});
    if (i == 0) fill.push_back({tmp, {{"EXPIRE", tmp, kTempKeyTtlSeconds}}});  // abandoned temps vanish
  }
  RETURN_IF_ERROR(Run(fill, [](size_t, size_t, const redisReply* r) {
    return r->type == REDIS_REPLY_ERROR ? ErrorReply(r, "HSET") : absl::OkStatus();
  }));
  // 2. Publish: rename and set the expiry in one transaction.
  const std::string ttl = absl::StrCat(ttl_seconds);
  redis::Unit publish{key, {{"MULTI"}, {"RENAME", tmp, key}}};
  if (ttl_seconds > 0)
    publish.commands.push_back({"EXPIRE", key, ttl});
  else
    publish.commands.push_back({"PERSIST", key});
  publish.commands.push_back({"EXEC"});
  const size_t n = publish.commands.size();
  return obs.Done(Run({publish}, [&](size_t, size_t i, const redisReply* r) -> absl::Status {
    if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "publish");
    if (i + 1 < n) return absl::OkStatus();
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 1) return absl::AbortedError("redis: transaction aborted");
    if (r->element[0]->type == REDIS_REPLY_ERROR) {
      // The temp key vanished (evicted) before RENAME: nothing was published.
      return absl::ResourceExhaustedError(
          absl::StrCat("redis evicted entry ", key, " while it was being written (maxmemory too small?)"));
    }
    return absl::OkStatus();
  }));
}

namespace {

// Orders chunk fields "0".."n-1" given as (name, bytes) pairs: the value, or
// nullopt when a field is stray, repeated or missing.
template <typename Bytes>
std::optional<std::vector<const Bytes*>> OrderChunks(const std::vector<std::pair<absl::string_view, const Bytes*>>& fields) {
  std::vector<const Bytes*> chunks(fields.size(), nullptr);
  for (const auto& [name, bytes] : fields) {
    size_t idx;
    if (!absl::SimpleAtoi(name, &idx) || idx >= chunks.size() || chunks[idx] != nullptr) return std::nullopt;
    chunks[idx] = bytes;
  }
  return chunks;
}

// One HGETALL reply from `rd` into `out` (resp_reader.h). A value made of
// one chunk "0" (every entry below RedisConfig::chunk_bytes) goes from the
// socket into `allocate`d memory; several chunks are read into strings and
// joined there. An error reply other than WRONGTYPE is kept in `*error` (the
// first one) and the stream stays in sync; a non-OK return means it is not.
absl::Status ReadHashReply(redis::RespReader& rd, const ValueAllocator& allocate, StoredValue& out,
                           absl::Status* error) {
  ASSIGN_OR_RETURN(absl::string_view line, rd.Line());
  if (line.empty()) return absl::DataLossError("redis reply: an empty line");
  if (line[0] == '-') {
    if (absl::StartsWith(line.substr(1), kWrongType)) {
      out.state = StoredValue::State::kOtherType;
    } else if (error->ok()) {
      *error = redis::ErrorMessage(line.substr(1), "HGETALL");
    }
    return absl::OkStatus();
  }
  if (line[0] != '*') return absl::DataLossError(absl::StrCat("redis HGETALL: unexpected reply '", line.substr(0, 32), "'"));
  ASSIGN_OR_RETURN(int64_t elements, redis::RespReader::Length(line, int64_t{1} << 32));
  if (elements <= 0) return absl::OkStatus();  // kMissing
  out.state = StoredValue::State::kIncomplete;
  // Element i: its bulk string's length (-2: not a bulk string, skipped).
  auto bulk_header = [&]() -> absl::StatusOr<int64_t> {
    ASSIGN_OR_RETURN(absl::string_view h, rd.Line());
    if (h.empty()) return absl::DataLossError("redis reply: an empty line");
    if (h[0] == '$') return redis::RespReader::Length(h, redis::RespReader::kMaxBulkBytes);
    if (h[0] == '+' || h[0] == '-' || h[0] == ':') return -2;
    return absl::DataLossError(absl::StrCat("redis HGETALL: unexpected element '", h.substr(0, 32), "'"));
  };
  bool well_formed = elements % 2 == 0;
  std::vector<std::string> names, chunks;
  bool direct = false;  // the one chunk went into out.buffer
  for (int64_t e = 0; e < elements; ++e) {
    ASSIGN_OR_RETURN(int64_t len, bulk_header());
    if (len < 0) {  // nil or not a string: no entry of ours
      well_formed = false;
      continue;
    }
    if (e % 2 == 0 || !well_formed) {  // a field name (or anything once malformed): to a string
      std::string& dst = (e % 2 == 0 && well_formed) ? names.emplace_back() : chunks.emplace_back();
      dst.resize(len);
      RETURN_IF_ERROR(rd.Exact(dst.data(), len));
      RETURN_IF_ERROR(rd.Crlf());
      continue;
    }
    if (elements == 2 && allocate && names.back() == "0") {  // the common case: straight into place
      out.buffer = allocate(len);
      out.buffer.size = len;
      RETURN_IF_ERROR(rd.Exact(out.buffer.data, len));
      RETURN_IF_ERROR(rd.Crlf());
      direct = true;
      continue;
    }
    std::string& dst = chunks.emplace_back();
    dst.resize(len);
    RETURN_IF_ERROR(rd.Exact(dst.data(), len));
    RETURN_IF_ERROR(rd.Crlf());
  }
  if (!well_formed) {
    out.buffer = ValueBuffer{};
    return absl::OkStatus();  // kIncomplete
  }
  if (direct) {
    out.state = StoredValue::State::kFound;
    return absl::OkStatus();
  }
  std::vector<std::pair<absl::string_view, const std::string*>> fields;
  for (size_t f = 0; f < names.size(); ++f) fields.emplace_back(names[f], &chunks[f]);
  std::optional<std::vector<const std::string*>> ordered = OrderChunks(fields);
  if (!ordered) return absl::OkStatus();  // kIncomplete
  size_t total = 0;
  for (const std::string* c : *ordered) total += c->size();
  if (allocate) {
    out.buffer = allocate(total);
    out.buffer.size = total;
    char* p = out.buffer.data;
    for (const std::string* c : *ordered) p = std::copy(c->begin(), c->end(), p);
  } else {
    out.value.reserve(total);
    for (const std::string* c : *ordered) out.value += *c;
  }
  out.state = StoredValue::State::kFound;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<StoredValue>> RedisStore::Read(const std::vector<std::string>& keys,
                                                          const ValueAllocator& allocate) {
  Observed obs(*this, "read");
  std::vector<StoredValue> out(keys.size());
  if (!cluster_) {
    // One node: HGETALL pipelined, replies parsed here (resp_reader.h).
    std::vector<redis::Command> commands;
    for (const auto& k : keys) {
      commands.push_back({"HGETALL", k});
      commands.push_back({"PTTL", k});
    }
    absl::Status error;
    RETURN_IF_ERROR(node_->PipelineRaw(commands, [&](redis::RespReader& rd) -> absl::Status {
      error = absl::OkStatus();
      for (StoredValue& v : out) {
        v = StoredValue{};
        RETURN_IF_ERROR(ReadHashReply(rd, allocate, v, &error));
        ASSIGN_OR_RETURN(absl::string_view ttl, rd.Line());
        if (!ttl.empty() && ttl[0] == ':' && absl::SimpleAtoi(ttl.substr(1), &v.ttl_ms)) continue;
        if (!ttl.empty() && ttl[0] == '-') {
          if (error.ok()) error = redis::ErrorMessage(ttl.substr(1), "PTTL");
          continue;
        }
        return absl::DataLossError(absl::StrCat("redis PTTL: unexpected reply '", ttl.substr(0, 32), "'"));
      }
      return absl::OkStatus();
    }));
    RETURN_IF_ERROR(error);
  } else {
    std::vector<redis::Unit> units;
    for (const auto& k : keys) units.push_back({k, {{"HGETALL", k}, {"PTTL", k}}});
    RETURN_IF_ERROR(Run(units, [&](size_t i, size_t command, const redisReply* r) {
      if (command == 1) {
        if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "PTTL");
        if (r->type == REDIS_REPLY_INTEGER) out[i].ttl_ms = r->integer;
        return absl::OkStatus();
      }
      if (IsWrongType(r)) {  // something else lives at the key
        out[i].state = StoredValue::State::kOtherType;
        return absl::OkStatus();
      }
      if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "HGETALL");
      if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) return absl::OkStatus();  // kMissing
      out[i].state = StoredValue::State::kIncomplete;
      if (r->elements % 2 != 0) return absl::OkStatus();
      std::vector<std::pair<absl::string_view, const redisReply*>> fields;
      for (size_t f = 0; f + 1 < r->elements; f += 2) {
        const redisReply* name = r->element[f];
        const redisReply* val = r->element[f + 1];
        if (name->type != REDIS_REPLY_STRING || val->type != REDIS_REPLY_STRING) return absl::OkStatus();
        fields.emplace_back(absl::string_view(name->str, name->len), val);
      }
      std::optional<std::vector<const redisReply*>> chunks = OrderChunks(fields);
      if (!chunks) return absl::OkStatus();  // a stray or missing field: kIncomplete
      size_t total = 0;
      for (const redisReply* c : *chunks) total += c->len;
      char* p;
      if (allocate) {
        out[i].buffer = allocate(total);
        out[i].buffer.size = total;
        p = out[i].buffer.data;
      } else {
        out[i].value.resize(total);
        p = out[i].value.data();
      }
      for (const redisReply* c : *chunks) p = std::copy(c->str, c->str + c->len, p);
      out[i].state = StoredValue::State::kFound;
      return absl::OkStatus();
    }));
  }
  for (const StoredValue& v : out) obs.bytes_read += v.bytes().size();
  obs.ok = true;
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
  Observed obs(*this, "delete");
  // One DEL on a node; on a cluster one per key, each to its slot's master.
  std::vector<redis::Unit> units;
  if (cluster_) {
    for (const auto& k : keys) units.push_back({k, {{"DEL", k}}});
  } else {
    units.push_back({keys[0], {{"DEL"}}});
    for (const auto& k : keys) units[0].commands[0].push_back(k);
  }
  std::vector<int64_t> deleted(units.size(), 0);
  RETURN_IF_ERROR(Run(units, [&](size_t i, size_t, const redisReply* r) {
    if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "DEL");
    deleted[i] = r->integer;
    return absl::OkStatus();
  }));
  int64_t n = 0;
  for (int64_t d : deleted) n += d;
  obs.ok = true;
  return n;
}

absl::StatusOr<std::vector<std::string>> RedisStore::Scan(const std::string& pattern, size_t limit) {
  Observed obs(*this, "scan");
  std::vector<std::string> keys;
  RETURN_IF_ERROR(ForEachNode([&](redis::Node& node) -> absl::Status {
    std::string cursor = "0";
    while (keys.size() < limit) {
      RETURN_IF_ERROR(
          node.Pipeline({{"SCAN", cursor, "MATCH", pattern, "COUNT", kScanBatch}}, [&](size_t, const redisReply* r) {
            if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "SCAN");
            if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) return absl::InternalError("redis SCAN: bad reply");
            cursor.assign(r->element[0]->str, r->element[0]->len);
            for (size_t i = 0; i < r->element[1]->elements; ++i) {
              keys.emplace_back(r->element[1]->element[i]->str, r->element[1]->element[i]->len);
            }
            return absl::OkStatus();
          }));
      if (cursor == "0") break;
    }
    return absl::OkStatus();
  }));
  if (keys.size() > limit) keys.resize(limit);
  obs.ok = true;
  return keys;
}

// ---- Cache administration -------------------------------------------------------

namespace {

// KEYS[1]: the key; ARGV[1]: head bytes. Returns {type, fields, bytes of all
// fields "0".."n-1", the head of field "0", 1 if exactly "0".."n-1" exist}.
// Reads no more than it must: HSTRLEN for sizes, one HGET cut to the head.
constexpr char kInspectScript[] = R"lua(
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'hash' then return {t, 0, 0, '', 0} end
local n = redis.call('HLEN', KEYS[1])
local bytes, complete = 0, 1
for i = 0, n - 1 do
  local f = tostring(i)
  if redis.call('HEXISTS', KEYS[1], f) == 0 then complete = 0 else bytes = bytes + redis.call('HSTRLEN', KEYS[1], f) end
end
local head = redis.call('HGET', KEYS[1], '0')
if head then head = string.sub(head, 1, tonumber(ARGV[1])) else head = ''; complete = 0 end
return {t, n, bytes, head, complete}
)lua";

int64_t IntegerOr(const redisReply* r, int64_t otherwise) {
  return r->type == REDIS_REPLY_INTEGER ? static_cast<int64_t>(r->integer) : otherwise;
}

}  // namespace

absl::StatusOr<std::vector<RedisStore::EntryInfo>> RedisStore::Inspect(const std::vector<std::string>& keys,
                                                                       size_t head_bytes) {
  Observed obs(*this, "inspect");
  const std::string head = absl::StrCat(head_bytes);
  std::vector<redis::Unit> units;
  // OBJECT IDLETIME first: the script's HGET resets the idle time.
  for (const auto& k : keys)
    units.push_back({k, {{"OBJECT", "IDLETIME", k}, {"PTTL", k}, {"EVAL", kInspectScript, "1", k, head}}});
  std::vector<EntryInfo> out(keys.size());
  RETURN_IF_ERROR(Run(units, [&](size_t i, size_t c, const redisReply* r) -> absl::Status {
    EntryInfo& e = out[i];
    if (c == 0) {  // an error here: idle time not tracked (an LFU policy)
      e.idle_seconds = IntegerOr(r, -1);
      return absl::OkStatus();
    }
    if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, c == 1 ? "PTTL" : "EVAL (inspect)");
    if (c == 1) {
      e.ttl_ms = IntegerOr(r, -2);
      return absl::OkStatus();
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 5 || r->element[0]->type != REDIS_REPLY_STRING ||
        r->element[3]->type != REDIS_REPLY_STRING) {
      return absl::InternalError("redis inspect script: unexpected reply");
    }
    const absl::string_view type(r->element[0]->str, r->element[0]->len);
    e.chunks = IntegerOr(r->element[1], 0);
    e.bytes = IntegerOr(r->element[2], 0);
    e.head.assign(r->element[3]->str, r->element[3]->len);
    if (type == "none") {
      e.state = StoredValue::State::kMissing;
    } else if (type != "hash") {
      e.state = StoredValue::State::kOtherType;
    } else {
      e.state = IntegerOr(r->element[4], 0) == 1 ? StoredValue::State::kFound : StoredValue::State::kIncomplete;
    }
    return absl::OkStatus();
  }));
  for (const EntryInfo& e : out) obs.bytes_read += e.head.size();
  obs.ok = true;
  return out;
}

absl::StatusOr<std::vector<bool>> RedisStore::Expire(const std::vector<std::string>& keys, int ttl_seconds) {
  Observed obs(*this, "expire");
  const std::string ttl = absl::StrCat(ttl_seconds);
  std::vector<redis::Unit> units;
  for (const auto& k : keys) {
    // PERSIST answers 0 for a key without expiry: EXISTS says whether it is there.
    if (ttl_seconds > 0)
      units.push_back({k, {{"EXPIRE", k, ttl}}});
    else
      units.push_back({k, {{"PERSIST", k}, {"EXISTS", k}}});
  }
  std::vector<char> existed(keys.size(), 0);
  RETURN_IF_ERROR(Run(units, [&](size_t i, size_t c, const redisReply* r) {
    if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, ttl_seconds > 0 ? "EXPIRE" : "PERSIST");
    if (ttl_seconds > 0 || c == 1) existed[i] = IntegerOr(r, 0) > 0;
    return absl::OkStatus();
  }));
  obs.ok = true;
  return std::vector<bool>(existed.begin(), existed.end());
}

absl::StatusOr<std::vector<bool>> RedisStore::DeleteEach(const std::vector<std::string>& keys) {
  Observed obs(*this, "delete");
  std::vector<redis::Unit> units;
  for (const auto& k : keys) units.push_back({k, {{"DEL", k}}});
  std::vector<char> existed(keys.size(), 0);
  RETURN_IF_ERROR(Run(units, [&](size_t i, size_t, const redisReply* r) {
    if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "DEL");
    existed[i] = IntegerOr(r, 0) > 0;
    return absl::OkStatus();
  }));
  obs.ok = true;
  return std::vector<bool>(existed.begin(), existed.end());
}

absl::StatusOr<RedisStore::ScanPage> RedisStore::ScanFrom(const std::string& cursor, const std::string& pattern,
                                                          size_t count) {
  Observed obs(*this, "scan");
  // The nodes in a stable order: by address.
  std::vector<redis::Node*> nodes;
  if (cluster_) {
    ASSIGN_OR_RETURN(nodes, cluster_->Masters());
    std::sort(nodes.begin(), nodes.end(),
              [](const redis::Node* a, const redis::Node* b) { return a->address() < b->address(); });
  } else {
    nodes.push_back(node_.get());
  }
  if (nodes.empty()) return absl::UnavailableError("redis cluster: no masters");
  // Where to resume: "address@cursor"; a master that is gone resumes at the next address.
  size_t at = 0;
  std::string redis_cursor = "0";
  if (!cursor.empty()) {
    const size_t sep = cursor.rfind('@');
    uint64_t parsed;
    if (sep == std::string::npos || !absl::SimpleAtoi(cursor.substr(sep + 1), &parsed)) {
      return absl::InvalidArgumentError(absl::StrCat("bad scan cursor '", cursor.substr(0, 80), "'"));
    }
    const std::string address = cursor.substr(0, sep);
    while (at < nodes.size() && nodes[at]->address() < address) ++at;
    if (at < nodes.size() && nodes[at]->address() == address) redis_cursor = absl::StrCat(parsed);
    if (at == nodes.size()) return ScanPage{};
  }
  ScanPage page;
  const std::string count_text = absl::StrCat(std::max<size_t>(count, 1));
  redis::Node& node = *nodes[at];
  RETURN_IF_ERROR(
      node.Pipeline({{"SCAN", redis_cursor, "MATCH", pattern, "COUNT", count_text}}, [&](size_t, const redisReply* r) {
        if (r->type == REDIS_REPLY_ERROR) return ErrorReply(r, "SCAN");
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) return absl::InternalError("redis SCAN: bad reply");
        redis_cursor.assign(r->element[0]->str, r->element[0]->len);
        for (size_t i = 0; i < r->element[1]->elements; ++i)
          page.keys.emplace_back(r->element[1]->element[i]->str, r->element[1]->element[i]->len);
        return absl::OkStatus();
      }));
  if (redis_cursor != "0")
    page.cursor = absl::StrCat(node.address(), "@", redis_cursor);
  else if (at + 1 < nodes.size())
    page.cursor = absl::StrCat(nodes[at + 1]->address(), "@0");
  obs.ok = true;
  return page;
}

}  // namespace ape
