#include "common/store/redis_cluster.h"

#include <hiredis/hiredis.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/engine/status_macros.h"

namespace ape::redis {

// ---- Key slots ----------------------------------------------------------------

namespace {

// CRC16 lookup table for polynomial 0x1021 (MSB first), made at compile time.
constexpr std::array<uint16_t, 256> MakeCrc16Table() {
  std::array<uint16_t, 256> t{};
  for (int i = 0; i < 256; ++i) {
    uint16_t crc = static_cast<uint16_t>(i << 8);
    for (int b = 0; b < 8; ++b) crc = (crc & 0x8000) ? static_cast<uint16_t>((crc << 1) ^ 0x1021) : crc << 1;
    t[i] = crc;
  }
  return t;
}
constexpr std::array<uint16_t, 256> kCrc16Table = MakeCrc16Table();

}  // namespace

uint16_t Crc16(absl::string_view bytes) {
  uint16_t crc = 0;
  for (unsigned char b : bytes) crc = static_cast<uint16_t>((crc << 8) ^ kCrc16Table[((crc >> 8) ^ b) & 0xff]);
  return crc;
}

absl::string_view HashTag(absl::string_view key) {
  const size_t open = key.find('{');
  if (open == absl::string_view::npos) return key;
  const size_t close = key.find('}', open + 1);
  if (close == absl::string_view::npos || close == open + 1) return key;  // no `}`, or `{}`: the whole key
  return key.substr(open + 1, close - open - 1);
}

int KeySlot(absl::string_view key) { return Crc16(HashTag(key)) % kClusterSlots; }

// ---- Nodes and the slot map ---------------------------------------------------

Cluster::Cluster(RedisConfig config) : config_(std::move(config)) {
  for (const RedisAddress& a : config_.cluster_seeds) seeds_.push_back(NodeAt(a.host, a.port));
}
Cluster::~Cluster() = default;

Node* Cluster::NodeAt(const std::string& host, int port) {
  const std::string address = absl::StrCat(host, ":", port);
  std::lock_guard<std::mutex> lock(mu_);
  std::unique_ptr<Node>& node = nodes_[address];
  if (!node) {
    RedisConfig c = config_;  // user, password, timeouts
    c.host = host;
    c.port = port;
    c.unix_socket.clear();
    c.db = 0;
    c.cluster = false;
    c.cluster_seeds.clear();
    node = std::make_unique<Node>(std::move(c));
  }
  return node.get();
}

Node* Cluster::NodeAt(absl::string_view address, const Node& replied) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == absl::string_view::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) || port <= 0 ||
      port > 65535) {
    return nullptr;
  }
  const absl::string_view host = address.substr(0, colon);  // empty: the node that replied
  return NodeAt(host.empty() ? replied.config().host : std::string(host), port);
}

std::shared_ptr<const Cluster::SlotMap> Cluster::CurrentMap(uint64_t* epoch) {
  std::lock_guard<std::mutex> lock(mu_);
  *epoch = epoch_;
  return map_;
}

absl::StatusOr<std::shared_ptr<const Cluster::SlotMap>> Cluster::EnsureMap(uint64_t* epoch) {
  if (auto map = CurrentMap(epoch)) return map;
  RETURN_IF_ERROR(Refresh(*epoch, nullptr, nullptr));
  return CurrentMap(epoch);
}

// CLUSTER SLOTS: [[start, end, [host, port, id, ...], replicas...], ...].
absl::StatusOr<std::shared_ptr<const Cluster::SlotMap>> Cluster::ReadMap(Node& from) {
  auto map = std::make_shared<SlotMap>();
  RETURN_IF_ERROR(from.Pipeline({{"CLUSTER", "SLOTS"}}, [&](size_t, const redisReply* r) -> absl::Status {
    if (r->type == REDIS_REPLY_ERROR) {
      absl::Status s = ErrorReply(r, "CLUSTER SLOTS");
      if (s.code() != absl::StatusCode::kInternal) return s;
      return absl::FailedPreconditionError(
          absl::StrCat(s.message(), " (", from.address(), " is not a Redis Cluster node: use redis://)"));
    }
    if (r->type != REDIS_REPLY_ARRAY) return absl::InternalError("redis CLUSTER SLOTS: not an array");
    for (size_t i = 0; i < r->elements; ++i) {
      const redisReply* range = r->element[i];
      if (range->type != REDIS_REPLY_ARRAY || range->elements < 3 || range->element[0]->type != REDIS_REPLY_INTEGER ||
          range->element[1]->type != REDIS_REPLY_INTEGER || range->element[2]->type != REDIS_REPLY_ARRAY ||
          range->element[2]->elements < 2 || range->element[2]->element[0]->type != REDIS_REPLY_STRING ||
          range->element[2]->element[1]->type != REDIS_REPLY_INTEGER) {
        return absl::InternalError("redis CLUSTER SLOTS: unexpected reply layout");
      }
      const long long start = range->element[0]->integer, end = range->element[1]->integer;
      const redisReply* master = range->element[2];
      std::string host(master->element[0]->str, master->element[0]->len);
      if (host == "?") continue;                    // the master's address is not known: its slots are unserved
      if (host.empty()) host = from.config().host;  // "the node you asked"
      Node* node = NodeAt(host, static_cast<int>(master->element[1]->integer));
      if (start < 0 || end >= kClusterSlots || start > end)
        return absl::InternalError("redis CLUSTER SLOTS: bad range");
      for (long long s = start; s <= end; ++s) map->owner[s] = node;
      if (std::find(map->masters.begin(), map->masters.end(), node) == map->masters.end()) map->masters.push_back(node);
    }
    return absl::OkStatus();
  }));
  return map;
}

absl::Status Cluster::Refresh(uint64_t seen_epoch, Node* prefer, Node* avoid) {
  std::lock_guard<std::mutex> refreshing(refresh_mu_);
  std::shared_ptr<const SlotMap> current;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (map_ && epoch_ != seen_epoch) return absl::OkStatus();  // someone read it meanwhile
    current = map_;
  }
  // Whom to ask: `prefer`, the masters we know, the seeds, `avoid` last.
  std::vector<Node*> sources;
  auto add = [&](Node* n) {
    if (n != nullptr && n != avoid && std::find(sources.begin(), sources.end(), n) == sources.end())
      sources.push_back(n);
  };
  add(prefer);
  if (current)
    for (Node* n : current->masters) add(n);
  for (Node* n : seeds_) add(n);
  if (avoid != nullptr) sources.push_back(avoid);
  std::vector<std::string> errors;
  absl::Status refused;  // an answer that asking elsewhere will not change (AUTH, not a cluster)
  for (Node* n : sources) {
    absl::StatusOr<std::shared_ptr<const SlotMap>> map = ReadMap(*n);
    if (map.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      map_ = *std::move(map);
      ++epoch_;
      ++refreshes_;
      return absl::OkStatus();
    }
    if (map.status().code() != absl::StatusCode::kUnavailable && refused.ok()) refused = map.status();
    errors.push_back(absl::StrCat(n->address(), ": ", map.status().message()));
  }
  if (!refused.ok()) return refused;
  return absl::UnavailableError(
      absl::StrCat("redis cluster: no node gave the slot map (", absl::StrJoin(errors, "; "), ")"));
}

absl::StatusOr<std::vector<Node*>> Cluster::Masters() {
  uint64_t epoch;
  ASSIGN_OR_RETURN(std::shared_ptr<const SlotMap> map, EnsureMap(&epoch));
  return map->masters;
}

RedisStore::ClusterStats Cluster::stats() const {
  return {.moved = moved_.load(), .ask = ask_.load(), .try_again = try_again_.load(), .refreshes = refreshes_.load()};
}

// ---- Routing ------------------------------------------------------------------

// Where a unit is sent, and how often it was sent elsewhere.
struct Cluster::Route {
  Node* node = nullptr;
  bool asking = false;  // ASKING first (the last reply was ASK)
  int redirects = 0;
  int try_again = 0;
};

// What became of a unit in one round.
struct Cluster::Outcome {
  enum Kind { kPending, kDone, kFailed, kMoved, kAsk, kTryAgain, kLost } kind = kPending;
  std::string address;  // kMoved, kAsk: the node the reply named
  absl::Status status;  // kFailed, kLost
  size_t replies = 0;
};

// The next round: units to send again, and what to do before.
struct Cluster::Plan {
  std::vector<size_t> next;  // to send again as routed
  std::vector<size_t> lost;  // their master did not answer: route again from a new map
  Node* moved_to = nullptr;  // a MOVED came: read the map again, from this node first
  int wait = 0;              // a TRYAGAIN came: wait TryAgainWait(wait) first
};

namespace {

constexpr size_t kAskingCommand = static_cast<size_t>(-1);

std::chrono::milliseconds TryAgainWait(int attempt) {
  return std::chrono::milliseconds(std::min(50, 2 << std::min(attempt - 1, 5)));
}

}  // namespace

absl::Status Cluster::Run(const std::vector<Unit>& units, const UnitReply& on_reply) {
  if (units.empty()) return absl::OkStatus();
  // 1. Each unit to the master of its slot in the map.
  uint64_t epoch;
  ASSIGN_OR_RETURN(std::shared_ptr<const SlotMap> map, EnsureMap(&epoch));
  std::vector<Route> route(units.size());
  std::vector<size_t> pending(units.size());
  for (size_t u = 0; u < units.size(); ++u) {
    const int slot = KeySlot(units[u].key);
    if (map->owner[slot] == nullptr) {  // maybe an old map: read it once more
      (void)Refresh(epoch, nullptr, nullptr);
      map = CurrentMap(&epoch);
    }
    if (map->owner[slot] == nullptr) {
      return absl::UnavailableError(
          absl::StrCat("redis cluster: no master serves slot ", slot, " (key ", units[u].key, ")"));
    }
    route[u].node = map->owner[slot];
    pending[u] = u;
  }
  // 2. Rounds: send, follow what came back, until every unit is done.
  while (!pending.empty()) {
    const std::vector<Outcome> outcome = RunRound(units, pending, route, on_reply);
    Plan plan;
    for (size_t u : pending) RETURN_IF_ERROR(Follow(units[u], outcome[u], u, route[u], plan));
    // A slot moved: read the whole map again, from its new master first.
    if (plan.moved_to != nullptr) (void)Refresh(epoch, plan.moved_to, nullptr);
    // A master did not answer: the topology may have changed (a failover).
    if (!plan.lost.empty()) RETURN_IF_ERROR(Reroute(units, outcome, epoch, route, plan));
    if (plan.wait > 0) std::this_thread::sleep_for(TryAgainWait(plan.wait));
    std::sort(plan.next.begin(), plan.next.end());  // the units of one key stay in order
    pending = std::move(plan.next);
    map = CurrentMap(&epoch);
  }
  return absl::OkStatus();
}

// The units of `pending` grouped by the node their route names, each group
// run on its node, the groups in parallel.
std::vector<Cluster::Outcome> Cluster::RunRound(const std::vector<Unit>& all, const std::vector<size_t>& pending,
                                                const std::vector<Route>& route, const UnitReply& on_reply) {
  std::map<Node*, std::vector<size_t>> groups;
  for (size_t u : pending) groups[route[u].node].push_back(u);
  std::vector<Outcome> outcome(all.size());
  std::vector<std::thread> threads;
  for (auto it = std::next(groups.begin()); it != groups.end(); ++it) {
    threads.emplace_back([&, it] { RunOnNode(*it->first, all, it->second, route, on_reply, outcome); });
  }
  RunOnNode(*groups.begin()->first, all, groups.begin()->second, route, on_reply, outcome);
  for (std::thread& t : threads) t.join();
  return outcome;
}

// Sends `units` (indices into `all`) to `node` in one pipeline, each command
// after ASKING when the unit's route says so (for a transaction only before
// MULTI: inside, ASKING would be queued, too late). Sets the outcome of
// each unit; only final replies go to on_reply.
void Cluster::RunOnNode(Node& node, const std::vector<Unit>& all, const std::vector<size_t>& units,
                        const std::vector<Route>& route, const UnitReply& on_reply, std::vector<Outcome>& outcome) {
  std::vector<Command> commands;
  std::vector<std::pair<size_t, size_t>> from;  // pipeline command -> (unit, its command or kAskingCommand)
  std::vector<size_t> expected(units.size());   // replies due per unit
  for (size_t k = 0; k < units.size(); ++k) {
    const size_t u = units[k], first = commands.size();
    bool in_multi = false;
    for (size_t c = 0; c < all[u].commands.size(); ++c) {
      const Command& cmd = all[u].commands[c];
      if (route[u].asking && !in_multi) {
        commands.push_back({"ASKING"});
        from.emplace_back(u, kAskingCommand);
      }
      if (absl::EqualsIgnoreCase(cmd[0], "MULTI")) in_multi = true;
      if (absl::EqualsIgnoreCase(cmd[0], "EXEC")) in_multi = false;
      commands.push_back(cmd);
      from.emplace_back(u, c);
    }
    expected[k] = commands.size() - first;
  }
  const absl::Status sent = node.Pipeline(commands, [&](size_t i, const redisReply* r) {
    const auto [u, c] = from[i];
    Outcome& o = outcome[u];
    ++o.replies;
    if (o.kind != Outcome::kPending || Redirected(r, o)) return absl::OkStatus();  // after a redirection: moot
    if (r->type == REDIS_REPLY_ERROR &&
        (c == kAskingCommand || absl::StartsWith(absl::string_view(r->str, r->len), "CLUSTERDOWN"))) {
      o.kind = Outcome::kFailed;
      o.status = ErrorReply(r, absl::StrCat(c == kAskingCommand ? "ASKING" : all[u].commands[c][0], " on ",
                                            node.address(), " (slot ", KeySlot(all[u].key), ")"));
    } else if (c != kAskingCommand) {
      if (absl::Status s = on_reply(u, c, r); !s.ok()) {
        o.kind = Outcome::kFailed;
        o.status = std::move(s);
      }
    }
    return absl::OkStatus();
  });
  for (size_t k = 0; k < units.size(); ++k) {
    Outcome& o = outcome[units[k]];
    if (o.kind != Outcome::kPending) continue;
    if (o.replies == expected[k]) {
      o.kind = Outcome::kDone;
    } else if (o.replies == 0 && sent.code() == absl::StatusCode::kUnavailable) {
      o.kind = Outcome::kLost;  // nothing came back: it may be sent elsewhere
      o.status = sent;
    } else {
      o.kind = Outcome::kFailed;  // half answered, or refused before sending (AUTH)
      o.status = absl::Status(sent.code(), absl::StrCat("redis cluster master ", node.address(), " (slot ",
                                                        KeySlot(all[units[k]].key), "): ", sent.message()));
    }
  }
}

// MOVED <slot> <host:port>, ASK <slot> <host:port> or TRYAGAIN: sets `o`.
bool Cluster::Redirected(const redisReply* r, Outcome& o) {
  if (r->type != REDIS_REPLY_ERROR) return false;
  absl::string_view msg(r->str, r->len);
  if (absl::StartsWith(msg, "TRYAGAIN")) {
    o.kind = Outcome::kTryAgain;
    return true;
  }
  const bool moved = absl::ConsumePrefix(&msg, "MOVED ");
  if (!moved && !absl::ConsumePrefix(&msg, "ASK ")) return false;
  o.kind = moved ? Outcome::kMoved : Outcome::kAsk;
  const size_t space = msg.find(' ');
  o.address = std::string(space == absl::string_view::npos ? "" : msg.substr(space + 1));
  return true;
}

// What a unit's outcome means for the next round (an error ends the call).
absl::Status Cluster::Follow(const Unit& unit, const Outcome& o, size_t u, Route& r, Plan& plan) {
  const int slot = KeySlot(unit.key);
  switch (o.kind) {
    case Outcome::kPending:
    case Outcome::kDone: return absl::OkStatus();
    case Outcome::kFailed: return o.status;
    case Outcome::kLost: plan.lost.push_back(u); return absl::OkStatus();
    case Outcome::kTryAgain:  // again to the same node, with the same ASKING
      ++try_again_;
      if (++r.try_again > kMaxTryAgain) {
        return absl::UnavailableError(absl::StrCat("redis cluster: slot ", slot, " on ", r.node->address(),
                                                   " stayed mid-migration (TRYAGAIN ", kMaxTryAgain, " times)"));
      }
      plan.wait = std::max(plan.wait, r.try_again);
      plan.next.push_back(u);
      return absl::OkStatus();
    case Outcome::kMoved:
    case Outcome::kAsk: break;
  }
  const bool ask = o.kind == Outcome::kAsk;
  ++(ask ? ask_ : moved_);
  Node* target = NodeAt(o.address, *r.node);
  if (target == nullptr) {
    return absl::InternalError(absl::StrCat("redis cluster: ", r.node->address(), " redirected slot ", slot,
                                            " to a bad address '", o.address, "'"));
  }
  if (++r.redirects > kMaxRedirects) {
    return absl::UnavailableError(absl::StrCat("redis cluster: slot ", slot, " redirected more than ", kMaxRedirects,
                                               " times (last: ", ask ? "ASK" : "MOVED", " from ", r.node->address(),
                                               " to ", o.address, ")"));
  }
  if (!ask) plan.moved_to = target;
  r.node = target;
  r.asking = ask;
  plan.next.push_back(u);
  return absl::OkStatus();
}

// Reads the map again from another node than the one that did not answer;
// a lost unit whose slot has a new master goes there, else the call fails
// naming the node and the slot.
absl::Status Cluster::Reroute(const std::vector<Unit>& units, const std::vector<Outcome>& outcome, uint64_t epoch,
                              std::vector<Route>& route, Plan& plan) {
  (void)Refresh(epoch, nullptr, route[plan.lost[0]].node);
  const std::shared_ptr<const SlotMap> map = CurrentMap(&epoch);
  for (size_t u : plan.lost) {
    const int slot = KeySlot(units[u].key);
    Route& r = route[u];
    Node* owner = map->owner[slot];
    if (owner == nullptr || owner == r.node || ++r.redirects > kMaxRedirects) {
      size_t others = 0;
      for (size_t v : plan.lost) others += v != u && route[v].node == r.node;
      return absl::UnavailableError(absl::StrCat(
          "redis cluster master ", r.node->address(), " (slot ", slot, ", key ", units[u].key,
          others ? absl::StrCat(", and ", others, " more keys") : "", ") unavailable: ", outcome[u].status.message()));
    }
    r.node = owner;
    r.asking = false;
    plan.next.push_back(u);
  }
  return absl::OkStatus();
}

}  // namespace ape::redis
