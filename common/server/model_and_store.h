// Start-up shared by ape-encoder and ape-decoder: load the model, parse the
// Redis URI, and make the store (a failed first PING is only a warning:
// requests fail with UNAVAILABLE until Redis is reachable).
#ifndef APESERVE_COMMON_SERVER_MODEL_AND_STORE_H_
#define APESERVE_COMMON_SERVER_MODEL_AND_STORE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/engine/model.h"
#include "common/store/redis_store.h"

namespace ape {

struct ModelAndStore {
  std::unique_ptr<Model> model;
  std::unique_ptr<RedisStore> store;
};

absl::StatusOr<ModelAndStore> LoadModelAndStore(const std::string& name, const std::string& model_path,
                                                const std::string& tokenizer_path, const std::string& redis_uri,
                                                int redis_timeout_ms, size_t redis_chunk_bytes);

}  // namespace ape

#endif  // APESERVE_COMMON_SERVER_MODEL_AND_STORE_H_
