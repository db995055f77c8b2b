// The Redis-backed KV block store, the hiredis 0.14 way: binary-safe argv
// commands, pipelines as append-then-read, timeouts on connect and on every
// command, one connection per caller at a time (a small pool), and a failed
// connection dropped and reconnected on the next call.
//
// Entries are published atomically (kv_block_format.md, "Redis layout").
// Errors: UNAVAILABLE when Redis cannot be reached or times out (the next
// call reconnects), RESOURCE_EXHAUSTED when Redis is out of memory,
// INTERNAL for other error replies.
#ifndef APESERVE_COMMON_STORE_REDIS_STORE_H_
#define APESERVE_COMMON_STORE_REDIS_STORE_H_

#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

struct redisContext;

namespace ape {

struct RedisConfig {
  std::string host = "127.0.0.1";
  int port = 6379;
  std::string unix_socket;  // used instead of host:port when set
  std::string user;         // ACL user (Redis 6+); empty = default user
  std::string password;     // empty = no AUTH
  int db = 0;
  int connect_timeout_ms = 1000;
  int command_timeout_ms = 10000;
  size_t chunk_bytes = size_t{64} << 20;  // hash field size for big entries
  std::string Describe() const;           // "host:port/db" (no secrets)
};

// redis://[[user]:password@]host[:port][/db] or unix:///path/to.sock[?db=N].
// Percent-escapes in user and password are decoded.
absl::StatusOr<RedisConfig> ParseRedisUri(absl::string_view uri);

// What one key held when it was read.
struct StoredValue {
  enum class State {
    kMissing,     // no such key
    kFound,       // an entry: `value` is its bytes (not verified here)
    kIncomplete,  // a hash, but not exactly the chunk fields "0".."n-1"
    kOtherType,   // a value of another Redis type
  };
  State state = State::kMissing;
  std::string value;
};

class RedisStore {
 public:
  explicit RedisStore(RedisConfig config);
  ~RedisStore();
  RedisStore(const RedisStore&) = delete;
  RedisStore& operator=(const RedisStore&) = delete;

  absl::Status Ping();
  // Which of `keys` hold an entry (one pipelined round trip); a key holding
  // another type counts as absent.
  absl::StatusOr<std::vector<bool>> Exists(const std::vector<std::string>& keys);
  // Publishes `value` at `key` atomically; ttl_seconds 0 = no expiry.
  absl::Status Put(const std::string& key, absl::string_view value, int ttl_seconds);
  // Values of `keys` (pipelined); nullopt for a missing entry, a wrong type
  // or a non-contiguous chunk set. Bytes are NOT verified here: callers
  // parse them as KV blocks.
  absl::StatusOr<std::vector<std::optional<std::string>>> GetMany(const std::vector<std::string>& keys);
  // The same, saying for each key what it held (one pipelined round trip).
  absl::StatusOr<std::vector<StoredValue>> Read(const std::vector<std::string>& keys);
  // Deletes `keys`; returns how many existed.
  absl::StatusOr<int64_t> Delete(const std::vector<std::string>& keys);
  // Keys matching `pattern` (SCAN, so it does not block Redis).
  absl::StatusOr<std::vector<std::string>> Scan(const std::string& pattern, size_t limit);

  const RedisConfig& config() const { return config_; }

 private:
  struct ContextDeleter {
    void operator()(redisContext* c) const;
  };
  using Context = std::unique_ptr<redisContext, ContextDeleter>;
  struct Acquired {
    Context context;
    bool reused;  // from the pool: it may have gone stale since
  };
  absl::StatusOr<Acquired> Acquire();
  void Release(Context c);
  // Appends commands, reads one reply each; the connection is dropped on
  // I/O errors. Each reply is converted by `on_reply` (may be null). When a
  // pooled connection turns out closed by the server before any reply (a
  // restarted Redis), the pool is emptied and the commands are sent once
  // more on a new connection.
  absl::Status Pipeline(const std::vector<std::vector<absl::string_view>>& commands,
                        const std::function<absl::Status(size_t, void*)>& on_reply);
  // One attempt on `c`; sets *retry (when not null) if it may be repeated.
  absl::Status PipelineOn(Context c, const std::vector<std::vector<absl::string_view>>& commands,
                          const std::function<absl::Status(size_t, void*)>& on_reply, bool* retry);

  RedisConfig config_;
  std::mutex mu_;
  std::vector<Context> idle_;  // guarded by mu_
};

}  // namespace ape

#endif  // APESERVE_COMMON_STORE_REDIS_STORE_H_
