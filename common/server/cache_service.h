// ape.v1.Cache (proto/ape/v1/cache.proto): cache administration, served by
// both ape-encoder and ape-decoder on the store and model they already
// hold. Entries are described from their headers (common/kv
// ParseKvBlockHeader on the first bytes RedisStore::Inspect cuts inside
// Redis); List and Totals walk the store with a resumable SCAN, every
// master of a cluster in turn. One log line per request, with timings.
#ifndef APESERVE_COMMON_SERVER_CACHE_SERVICE_H_
#define APESERVE_COMMON_SERVER_CACHE_SERVICE_H_

#include <functional>
#include <string>
#include <vector>

#include "ape/v1/cache.grpc.pb.h"
#include "common/engine/model.h"
#include "common/kv/kv_block.h"
#include "common/store/redis_store.h"

namespace ape {

// --cache_admin (default true): whether a server offers ape.v1.Cache.
bool CacheAdminFromFlags();

class CacheService final : public v1::Cache::Service {
 public:
  static constexpr int kMaxKeys = 1000;            // per Stat, Delete, Touch
  static constexpr int kMaxVerifyKeys = 16;        // per Stat with verify (each read whole)
  static constexpr uint32_t kDefaultLimit = 100;   // List
  static constexpr uint32_t kMaxLimit = 1000;      // List
  static constexpr size_t kMaxScannedFactor = 20;  // List examines at most this x limit keys per reply

  // `server` names the binary in log lines ("encoder", "decoder").
  CacheService(const Model& model, RedisStore& store, std::string server);

  // Called for every key Delete removed (e.g. to drop it from a decoder's
  // in-process cache). Set before the server starts.
  void OnDelete(std::function<void(const std::string& key)> f) { on_delete_ = std::move(f); }

  grpc::Status Stat(grpc::ServerContext* ctx, const v1::StatRequest* req, v1::StatResponse* resp) override;
  grpc::Status Delete(grpc::ServerContext* ctx, const v1::DeleteRequest* req, v1::DeleteResponse* resp) override;
  grpc::Status Touch(grpc::ServerContext* ctx, const v1::TouchRequest* req, v1::TouchResponse* resp) override;
  grpc::Status List(grpc::ServerContext* ctx, const v1::ListRequest* req, v1::ListResponse* resp) override;
  grpc::Status Totals(grpc::ServerContext* ctx, const v1::TotalsRequest* req, v1::TotalsResponse* resp) override;

 private:
  absl::Status DoStat(const v1::StatRequest& req, v1::StatResponse* resp);
  absl::Status DoList(const v1::ListRequest& req, v1::ListResponse* resp);
  absl::Status DoTotals(v1::TotalsResponse* resp);
  // Inspect `keys` and describe each from its header.
  absl::StatusOr<std::vector<v1::CacheEntryInfo>> Describe(const std::vector<std::string>& keys);
  // Reads each OK entry of `infos` whole and checks it (verify).
  absl::Status Verify(std::vector<v1::CacheEntryInfo>& infos);

  const Model& model_;
  RedisStore& store_;
  const std::string server_;
  std::function<void(const std::string& key)> on_delete_;
};

}  // namespace ape

#endif  // APESERVE_COMMON_SERVER_CACHE_SERVICE_H_
