// The Redis-backed KV block store, the hiredis 0.14 way: binary-safe argv
// commands, pipelines as append-then-read, timeouts on connect and on every
// command, one connection per caller at a time (a small pool), and a failed
// connection dropped and reconnected on the next call.
//
// Entries are published atomically (kv_block_format.md, "Redis layout").
// Errors: UNAVAILABLE when Redis cannot be reached or times out (the next
// call reconnects), RESOURCE_EXHAUSTED when Redis is out of memory,
// INTERNAL for other error replies.
//
// Redis Cluster (a redis+cluster:// URI; redis_cluster.h has the routing):
// every key goes to the master of its hash slot, MOVED and ASK are followed,
// and the keys of one call are read per master, pipelined, masters in
// parallel. A call that needs a master that is down fails whole with
// UNAVAILABLE naming the node and the slot (calls on other masters' keys
// still work): to the decoder the cache is then unavailable, and a request
// by text is encoded in memory. Delete deletes key by key; Scan scans every
// master in turn (a key moving during the scan may be listed twice or not
// at all); Ping pings every master. In cluster mode Put refuses keys with
// `{` or `}`: the temporary key is `{key}:tmp:...`, a hash tag that puts it
// in the key's slot, which is what keeps RENAME (and so publication) legal
// and atomic. Content keys (`ape:v1:kv:` + hex) never hold braces.
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

struct redisReply;

namespace ape {

namespace redis {
class Node;
class Cluster;
struct Unit;
}  // namespace redis

struct RedisAddress {
  std::string host;
  int port = 6379;
};

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
  // Cluster mode: the slot map is first asked of these seed nodes; every
  // node gets the user, password and timeouts above, and db is 0. host and
  // port are then the first seed.
  bool cluster = false;
  std::vector<RedisAddress> cluster_seeds;
  std::string Describe() const;  // "host:port/db" or "cluster host:port,host:port" (no secrets)
};

// redis://[[user]:password@]host[:port][/db], unix:///path/to.sock[?db=N], or
// redis+cluster://[[user]:password@]host[:port][,host[:port]...][/0] (seed
// nodes of a Redis Cluster). Percent-escapes in user and password are decoded.
absl::StatusOr<RedisConfig> ParseRedisUri(absl::string_view uri);

// Memory a value is read into (RedisStore::Read with an allocator): room for
// `size` bytes at `data`, kept alive by `owner`.
struct ValueBuffer {
  std::shared_ptr<void> owner;
  char* data = nullptr;
  size_t size = 0;
};
// Gives a ValueBuffer of at least `bytes` bytes (contents undefined).
using ValueAllocator = std::function<ValueBuffer(size_t bytes)>;

// What one key held when it was read.
struct StoredValue {
  enum class State {
    kMissing,     // no such key
    kFound,       // an entry: `value` is its bytes (not verified here)
    kIncomplete,  // a hash, but not exactly the chunk fields "0".."n-1"
    kOtherType,   // a value of another Redis type
  };
  State state = State::kMissing;
  std::string value;   // kFound: the bytes, unless they are in `buffer`
  ValueBuffer buffer;  // kFound by a Read with an allocator: the bytes
                       // are buffer.data[0, size) (`value` stays empty)
  int64_t ttl_ms = -2;  // PTTL read with it: -1 no expiry, -2 no key
  absl::string_view bytes() const {
    return buffer.data != nullptr ? absl::string_view(buffer.data, buffer.size) : absl::string_view(value);
  }
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
  // Publishes `value` at `key` atomically; ttl_seconds 0 = no expiry. On a
  // cluster, INVALID_ARGUMENT for a key holding `{` or `}`.
  absl::Status Put(const std::string& key, absl::string_view value, int ttl_seconds);
  // Values of `keys` (pipelined); nullopt for a missing entry, a wrong type
  // or a non-contiguous chunk set. Bytes are NOT verified here: callers
  // parse them as KV blocks.
  absl::StatusOr<std::vector<std::optional<std::string>>> GetMany(const std::vector<std::string>& keys);
  // The same, saying for each key what it held and its remaining time to
  // live (one pipelined round trip: HGETALL and PTTL per key).
  // With `allocate`, a found value's bytes go into memory it gives (on a
  // single node straight from the socket: no intermediate copy; on a
  // cluster through hiredis, then one copy).
  absl::StatusOr<std::vector<StoredValue>> Read(const std::vector<std::string>& keys,
                                                const ValueAllocator& allocate = nullptr);
  // Deletes `keys`; returns how many existed.
  absl::StatusOr<int64_t> Delete(const std::vector<std::string>& keys);
  // Keys matching `pattern` (SCAN, so it does not block Redis).
  absl::StatusOr<std::vector<std::string>> Scan(const std::string& pattern, size_t limit);

  // ---- Cache administration (ape.v1.Cache) ----------------------------------

  // What Inspect saw at one key, without reading the whole entry.
  struct EntryInfo {
    StoredValue::State state = StoredValue::State::kMissing;  // kFound: a hash of chunks "0".."n-1"
    int64_t chunks = 0;                                       // hash fields
    int64_t bytes = 0;                                        // the entry's size: its chunks' lengths summed
    int64_t ttl_ms = -2;                                      // PTTL: -1 no expiry, -2 no key
    int64_t idle_seconds = -1;  // OBJECT IDLETIME, taken before this call read the key; -1 unknown (LFU policy)
    std::string head;           // the first head_bytes bytes of chunk "0"
  };
  // For each key, in one pipelined round trip (per master): type, chunk
  // count and sizes, PTTL, idle time, and the first `head_bytes` of the
  // first chunk, cut inside Redis (a Lua script) so that only those bytes
  // cross the network (Redis still copies chunk "0" in its memory). Reading
  // the head resets the key's idle time, after it was taken.
  absl::StatusOr<std::vector<EntryInfo>> Inspect(const std::vector<std::string>& keys, size_t head_bytes);
  // EXPIRE each key by `ttl_seconds` (> 0), or PERSIST it (0: no expiry);
  // true where the key existed.
  absl::StatusOr<std::vector<bool>> Expire(const std::vector<std::string>& keys, int ttl_seconds);
  // Deletes each key; true where it existed.
  absl::StatusOr<std::vector<bool>> DeleteEach(const std::vector<std::string>& keys);
  // One step of a resumable SCAN over the whole store: keys matching
  // `pattern` from `cursor` ("" = from the start), about `count` of them
  // (SCAN COUNT is a hint), and the cursor to resume from ("" = done). On a
  // cluster the cursor names the master ("host:port@cursor") and the scan
  // goes through the masters in address order; a key that moves between
  // masters during a scan may be listed twice or not at all, as with SCAN.
  struct ScanPage {
    std::vector<std::string> keys;
    std::string cursor;
  };
  absl::StatusOr<ScanPage> ScanFrom(const std::string& cursor, const std::string& pattern, size_t count);

  // Called after every public call (from the calling thread) with what it
  // did, for metrics. Set it before the store is shared between threads.
  struct CallStats {
    const char* op;          // "exists", "put", "read", "delete", "scan", "inspect", "expire", "ping"
    double seconds;          // wall time of the call
    uint64_t bytes_read;     // entry bytes received (read: the values; inspect: the heads)
    uint64_t bytes_written;  // entry bytes sent (put: the value)
    bool ok;
  };
  void set_observer(std::function<void(const CallStats&)> observer) { observer_ = std::move(observer); }

  const RedisConfig& config() const { return config_; }

  // Redirections followed and slot-map refreshes so far (cluster mode; all
  // zero on a single node).
  struct ClusterStats {
    int64_t moved = 0;
    int64_t ask = 0;
    int64_t try_again = 0;
    int64_t refreshes = 0;
  };
  ClusterStats cluster_stats() const;

 private:
  // Sends `units` (redis_cluster.h): on one node as one pipeline, on a
  // cluster routed by slot. `on_reply(unit, command, reply)` sees each reply.
  absl::Status Run(const std::vector<redis::Unit>& units,
                   const std::function<absl::Status(size_t, size_t, const redisReply*)>& on_reply);
  // Calls `fn` on the one node, or on every master of the cluster in turn.
  absl::Status ForEachNode(const std::function<absl::Status(redis::Node&)>& fn);

  // Reports a call to observer_ when it ends (redis_store.cc).
  class Observed;
  std::function<void(const CallStats&)> observer_;

  RedisConfig config_;
  std::unique_ptr<redis::Node> node_;        // single-node mode
  std::unique_ptr<redis::Cluster> cluster_;  // cluster mode
};

}  // namespace ape

#endif  // APESERVE_COMMON_STORE_REDIS_STORE_H_
