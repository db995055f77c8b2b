// apectl cache ls|stat|rm|touch|totals: ape.v1.Cache (proto/ape/v1/cache.proto)
// on any ape-encoder or ape-decoder (--cache-server, default --encoder).
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "ape/v1/cache.grpc.pb.h"
#include "clients/apectl/commands.h"
#include "clients/apectl/remote_util.h"

ABSL_FLAG(std::string, cache_server, "",
          "cache: the ape-encoder or ape-decoder to ask (both serve ape.v1.Cache); empty = --encoder");
ABSL_FLAG(std::string, model_fingerprint, "", "cache ls: only entries of this model (32 hex digits)");
ABSL_FLAG(std::string, prefix_key, "", "cache ls: only entries encoded after this prefix (its key)");
ABSL_FLAG(int, limit, 0, "cache ls: entries to list, at most; 0 = all");
ABSL_FLAG(bool, verify, false, "cache stat: read each entry whole and check it (checksum, key), at most 16 keys");
ABSL_FLAG(int, ttl_s, 0, "cache touch: new time to live, seconds; 0 = no expiry");
ABSL_DECLARE_FLAG(std::string, encoder);

namespace ape::apectl {
namespace {

constexpr char kUsage[] =
    "usage: apectl cache ls [--model-fingerprint FP] [--prefix-key K] [--limit N]\n"
    "       apectl cache stat [--verify] KEY...\n"
    "       apectl cache rm KEY...\n"
    "       apectl cache touch --ttl-s N KEY...   (0 = no expiry)\n"
    "       apectl cache totals\n"
    "  [--cache-server ADDR] (an ape-encoder or ape-decoder; default --encoder)\n";

std::string Name(v1::EntryState s) {
  std::string n = v1::EntryState_Name(s);
  return n.rfind("ENTRY_", 0) == 0 ? n.substr(6) : n;
}

// "float16", "float32", "int8" (the enum's names, as --dtype spells them); "-" when unset.
std::string DtypeName(v1::KvDtype d) {
  if (d == v1::KV_DTYPE_UNSPECIFIED || !v1::KvDtype_IsValid(d)) return "-";
  return absl::AsciiStrToLower(v1::KvDtype_Name(d).substr(std::string("KV_DTYPE_").size()));
}

// One line: key state kind tokens bytes dtype ttl idle fingerprint prefix.
void PrintLine(const v1::CacheEntryInfo& e) {
  std::printf("%s\t%s\t%s\t%u\t%llu\t%s\t%lld\t%lld\t%s\t%s\n", e.key().c_str(), Name(e.state()).c_str(),
              e.kind() == v1::ENTRY_KIND_PREFIX    ? "prefix"
              : e.kind() == v1::ENTRY_KIND_CONTEXT ? "context"
                                                   : "-",
              e.num_tokens(), static_cast<unsigned long long>(e.stored_bytes()), DtypeName(e.dtype()).c_str(),
              static_cast<long long>(e.ttl_seconds()), static_cast<long long>(e.idle_seconds()),
              e.model_fingerprint().empty() ? "-" : e.model_fingerprint().c_str(),
              e.prefix_key().empty() ? "-" : e.prefix_key().c_str());
}

int Ls(v1::Cache::Stub& stub) {
  const int limit = absl::GetFlag(FLAGS_limit);
  v1::ListRequest req;
  req.set_model_fingerprint(absl::GetFlag(FLAGS_model_fingerprint));
  req.set_prefix_key(absl::GetFlag(FLAGS_prefix_key));
  int listed = 0;
  do {
    req.set_limit(limit > 0 ? std::min(limit - listed, 1000) : 1000);
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    v1::ListResponse resp;
    grpc::Status s = stub.List(&ctx, req, &resp);
    if (!s.ok()) return Fail("cache ls", s);
    for (const auto& e : resp.entries()) {
      if (limit > 0 && listed >= limit) break;
      PrintLine(e);
      ++listed;
    }
    req.set_cursor(resp.next_cursor());
  } while (!req.cursor().empty() && (limit <= 0 || listed < limit));
  std::fprintf(stderr, "%d entries (key state kind tokens bytes dtype ttl_s idle_s model prefix)\n", listed);
  return 0;
}

int Stat(v1::Cache::Stub& stub, const std::vector<std::string>& keys) {
  v1::StatRequest req;
  for (const auto& k : keys) req.add_keys(k);
  req.set_verify(absl::GetFlag(FLAGS_verify));
  grpc::ClientContext ctx;
  SetDeadline(ctx);
  v1::StatResponse resp;
  grpc::Status s = stub.Stat(&ctx, req, &resp);
  if (!s.ok()) return Fail("cache stat", s);
  int missing = 0;
  for (const auto& e : resp.entries()) {
    std::printf("%s", e.DebugString().c_str());
    std::printf("--\n");
    missing += e.state() == v1::ENTRY_MISSING;
  }
  return missing > 0 ? 1 : 0;
}

int Rm(v1::Cache::Stub& stub, const std::vector<std::string>& keys) {
  v1::DeleteRequest req;
  for (const auto& k : keys) req.add_keys(k);
  grpc::ClientContext ctx;
  SetDeadline(ctx);
  v1::DeleteResponse resp;
  grpc::Status s = stub.Delete(&ctx, req, &resp);
  if (!s.ok()) return Fail("cache rm", s);
  std::printf("deleted %u\n", resp.deleted());
  for (const auto& k : resp.missing()) std::printf("missing %s\n", k.c_str());
  return 0;
}

int Touch(v1::Cache::Stub& stub, const std::vector<std::string>& keys) {
  const int ttl = absl::GetFlag(FLAGS_ttl_s);
  if (ttl < 0) {
    std::fprintf(stderr, "apectl cache touch: --ttl-s must be 0 (no expiry) or positive\n");
    return 2;
  }
  v1::TouchRequest req;
  for (const auto& k : keys) req.add_keys(k);
  req.set_ttl_seconds(static_cast<uint32_t>(ttl));
  grpc::ClientContext ctx;
  SetDeadline(ctx);
  v1::TouchResponse resp;
  grpc::Status s = stub.Touch(&ctx, req, &resp);
  if (!s.ok()) return Fail("cache touch", s);
  std::printf("touched %u\n", resp.touched());
  for (const auto& k : resp.missing()) std::printf("missing %s\n", k.c_str());
  return 0;
}

int Totals(v1::Cache::Stub& stub) {
  grpc::ClientContext ctx;
  SetDeadline(ctx);
  v1::TotalsResponse resp;
  grpc::Status s = stub.Totals(&ctx, v1::TotalsRequest(), &resp);
  if (!s.ok()) return Fail("cache totals", s);
  for (const auto& m : resp.models()) {
    std::printf("%s\t%llu entries\t%llu bytes\t%llu tokens%s\n",
                m.model_fingerprint().empty() ? "(unreadable)" : m.model_fingerprint().c_str(),
                static_cast<unsigned long long>(m.entries()), static_cast<unsigned long long>(m.bytes()),
                static_cast<unsigned long long>(m.tokens()), m.this_model() ? "\tthis server's model" : "");
  }
  std::printf("total\t%llu entries\t%llu bytes\n", static_cast<unsigned long long>(resp.entries()),
              static_cast<unsigned long long>(resp.bytes()));
  std::fprintf(stderr, "scanned in %.1f ms\n", resp.scan_ms());
  return 0;
}

}  // namespace

int CacheCommand(const std::vector<std::string>& args) {
  if (args.empty()) {
    std::fprintf(stderr, "%s", kUsage);
    return 2;
  }
  const std::string& sub = args[0];
  const std::vector<std::string> keys(args.begin() + 1, args.end());
  const bool needs_keys = sub == "stat" || sub == "rm" || sub == "touch";
  if ((sub != "ls" && sub != "totals" && !needs_keys) || (needs_keys && keys.empty()) ||
      (!needs_keys && !keys.empty())) {
    std::fprintf(stderr, "%s", kUsage);
    return 2;
  }
  std::string server = absl::GetFlag(FLAGS_cache_server);
  if (server.empty()) server = absl::GetFlag(FLAGS_encoder);
  auto channel = Channel("cache", server);
  if (!channel) return 2;
  auto stub = v1::Cache::NewStub(channel);
  if (sub == "ls") return Ls(*stub);
  if (sub == "stat") return Stat(*stub, keys);
  if (sub == "rm") return Rm(*stub, keys);
  if (sub == "touch") return Touch(*stub, keys);
  return Totals(*stub);
}

}  // namespace ape::apectl
