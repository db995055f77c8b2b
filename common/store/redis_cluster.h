// What RedisStore is built from (internal to common/store and its tests):
// a Node, one Redis server with its pool of connections and its pipelines;
// the Redis Cluster key slot; and a Cluster, which routes commands to the
// Node that owns each key's slot. No Redis Cluster client is packaged in
// Debian bookworm (no hiredis-cluster), so this is the small part of one that
// apeserve needs, on plain hiredis 0.14.
//
// Routing (Redis Cluster specification, "Key distribution model" and
// "Redirection and resharding"):
// - slot = CRC16-XMODEM(key) mod 16384, where only the hash tag is hashed
//   when the key has one: the bytes between the first `{` and the first `}`
//   after it, if there is at least one byte between them;
// - the slot map comes from CLUSTER SLOTS, first asked of the seeds, then
//   of the masters it names;
// - MOVED: the slot has a new master: the map is read again, and the
//   command is sent to the node the reply names;
// - ASK: the slot is migrating and the key is not (or no longer) on this
//   node: ASKING then the command on the node the reply names, the map left
//   as it is (for a MULTI..EXEC unit, ASKING before MULTI covers it all);
// - TRYAGAIN: a multi-key command (RENAME) during a migration whose keys are
//   split between the two nodes: retried after a short wait;
// - a node that cannot be reached: the map is read again from another node;
//   if the slot still belongs to that node the call fails with UNAVAILABLE
//   naming the node and the slot, else it is retried on the new master;
// - at most kMaxRedirects MOVED/ASK/reroutes per unit, then UNAVAILABLE.
#ifndef APESERVE_COMMON_STORE_REDIS_CLUSTER_H_
#define APESERVE_COMMON_STORE_REDIS_CLUSTER_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/store/redis_store.h"
#include "common/store/resp_reader.h"

struct redisContext;

namespace ape::redis {

// One command as its arguments (binary safe).
using Command = std::vector<absl::string_view>;

// Maps an error reply to a status (OOM: RESOURCE_EXHAUSTED; NOAUTH, WRONGPASS,
// NOPERM: PERMISSION_DENIED; LOADING, BUSY, CLUSTERDOWN: UNAVAILABLE; else
// INTERNAL). `what` names the command.
absl::Status ErrorReply(const redisReply* r, absl::string_view what);
// The same for an error's message text.
absl::Status ErrorMessage(absl::string_view msg, absl::string_view what);

// One Redis server: a small pool of connections (authenticated, db
// selected) and pipelines on them. Thread-safe.
class Node {
 public:
  using OnReply = std::function<absl::Status(size_t, const redisReply*)>;

  explicit Node(RedisConfig config);
  ~Node();
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  // Appends `commands` on one connection and reads one reply each, in order,
  // giving reply i to `on_reply(i, reply)` (may be null); after the first
  // error it returns, the rest are read and dropped. UNAVAILABLE when the
  // connection fails (it is dropped; replies before the failure were given).
  // When a pooled connection turns out closed by the server before any reply
  // (a restarted Redis), the pool is emptied and the commands are sent once
  // more on a new connection.
  absl::Status Pipeline(const std::vector<Command>& commands, const OnReply& on_reply);
  // Sends `commands` on one connection like Pipeline, but hands the reply
  // stream to `read_replies` (resp_reader.h) instead of hiredis: for replies
  // too big to copy through hiredis's buffers. `read_replies` must read one
  // whole reply per command and return OK; any other status means the
  // stream is out of sync, and the connection is dropped. Retried once on a
  // new connection like Pipeline, when a pooled one was closed before any
  // reply byte came.
  absl::Status PipelineRaw(const std::vector<Command>& commands,
                           const std::function<absl::Status(RespReader&)>& read_replies);

  const RedisConfig& config() const { return config_; }
  // "host:port" (what MOVED and CLUSTER SLOTS name a node by).
  const std::string& address() const { return address_; }

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
  // Runs `attempt` on a pooled connection; when it sets *retry (given only
  // for a pooled, possibly stale, connection), empties the pool and runs it
  // once more on a new connection (see Pipeline).
  using Attempt = std::function<absl::Status(Context, bool* retry)>;
  absl::Status WithStaleRetry(const Attempt& attempt);
  // One attempt on `c`; sets *retry (when not null) if it may be repeated.
  absl::Status PipelineOn(Context c, const std::vector<Command>& commands, const OnReply& on_reply, bool* retry);
  absl::Status PipelineRawOn(Context c, const std::vector<Command>& commands,
                             const std::function<absl::Status(RespReader&)>& read_replies, bool* retry);
  // Appends `commands` to c's output buffer and writes it all out.
  absl::Status Send(redisContext* c, const std::vector<Command>& commands, bool* retry);

  const RedisConfig config_;
  const std::string address_;
  std::mutex mu_;
  std::vector<Context> idle_;  // guarded by mu_
};

// ---- Key slots ----------------------------------------------------------------

constexpr int kClusterSlots = 16384;

// CRC16-CCITT as Redis Cluster uses it (XMODEM: polynomial 0x1021, initial
// value 0, no reflection): Crc16("123456789") = 0x31C3.
uint16_t Crc16(absl::string_view bytes);
// The part of `key` that is hashed: its hash tag if it has one, else all.
absl::string_view HashTag(absl::string_view key);
// Crc16(HashTag(key)) mod 16384.
int KeySlot(absl::string_view key);

// ---- Routing ------------------------------------------------------------------

// Commands that go together to the master of `key`'s slot, back to back on
// one connection (a MULTI..EXEC transaction is one unit). All keys a unit
// names must hash to the slot of `key`.
struct Unit {
  absl::string_view key;
  std::vector<Command> commands;
};
// Reply to command `command` of unit `unit`. Only final replies are given
// (never a redirection); replies of different units may be given from
// different threads at once.
using UnitReply = std::function<absl::Status(size_t unit, size_t command, const redisReply* reply)>;

// A Redis Cluster seen through its slot map. Thread-safe.
class Cluster {
 public:
  static constexpr int kMaxRedirects = 5;  // MOVED, ASK or reroutes after a lost node, per unit
  static constexpr int kMaxTryAgain = 40;  // TRYAGAIN waits (2 ms doubling to 50 ms: about 1.8 s in all)

  explicit Cluster(RedisConfig config);
  ~Cluster();
  Cluster(const Cluster&) = delete;
  Cluster& operator=(const Cluster&) = delete;

  // Sends every unit to the master of its slot: units grouped by master, one
  // pipeline per master, masters in parallel (a thread each beyond the
  // first), redirections followed. The first error a reply gave, or
  // UNAVAILABLE when a unit's master cannot be reached or redirections run
  // out; units of other masters may have run.
  absl::Status Run(const std::vector<Unit>& units, const UnitReply& on_reply);
  // The masters of the current slot map (read first if there is none).
  absl::StatusOr<std::vector<Node*>> Masters();

  RedisStore::ClusterStats stats() const;

 private:
  // Which master serves each slot; nodes are owned by nodes_.
  struct SlotMap {
    std::array<Node*, kClusterSlots> owner{};
    std::vector<Node*> masters;
  };
  std::shared_ptr<const SlotMap> CurrentMap(uint64_t* epoch);
  absl::StatusOr<std::shared_ptr<const SlotMap>> EnsureMap(uint64_t* epoch);
  // Reads the map again with CLUSTER SLOTS unless someone did since the
  // caller's `seen_epoch`. Asks `prefer` first and `avoid` last.
  absl::Status Refresh(uint64_t seen_epoch, Node* prefer, Node* avoid);
  absl::StatusOr<std::shared_ptr<const SlotMap>> ReadMap(Node& from);

  // Run, step by step (redis_cluster.cc).
  struct Route;
  struct Outcome;
  struct Plan;
  static std::vector<Outcome> RunRound(const std::vector<Unit>& all, const std::vector<size_t>& pending,
                                       const std::vector<Route>& route, const UnitReply& on_reply);
  static void RunOnNode(Node& node, const std::vector<Unit>& all, const std::vector<size_t>& units,
                        const std::vector<Route>& route, const UnitReply& on_reply, std::vector<Outcome>& outcome);
  static bool Redirected(const redisReply* r, Outcome& o);
  absl::Status Follow(const Unit& unit, const Outcome& o, size_t u, Route& r, Plan& plan);
  absl::Status Reroute(const std::vector<Unit>& units, const std::vector<Outcome>& outcome, uint64_t epoch,
                       std::vector<Route>& route, Plan& plan);
  Node* NodeAt(const std::string& host, int port);
  Node* NodeAt(absl::string_view address, const Node& replied);  // "host:port" from MOVED/ASK

  const RedisConfig config_;
  std::vector<Node*> seeds_;
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<Node>> nodes_;  // by address; never removed; guarded by mu_
  std::shared_ptr<const SlotMap> map_;                  // guarded by mu_
  uint64_t epoch_ = 0;                                  // map_ version; guarded by mu_
  std::mutex refresh_mu_;                               // one refresh at a time
  std::atomic<int64_t> moved_{0}, ask_{0}, try_again_{0}, refreshes_{0};
};

}  // namespace ape::redis

#endif  // APESERVE_COMMON_STORE_REDIS_CLUSTER_H_
