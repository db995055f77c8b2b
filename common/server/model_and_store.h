// Start-up shared by ape-encoder and ape-decoder: check the TLS files of the
// --tls_* and --encoder_tls_* flags (security.h) before anything slow, parse
// the Redis URI, take the Redis password from --redis_password_file, else
// $APESERVE_REDIS_PASSWORD, else the URI (and the user from
// $APESERVE_REDIS_USER, else the URI), load the model, and make the store (a
// failed first PING is only a warning: requests fail with UNAVAILABLE until
// Redis is reachable). No message or log line carries the password: a URI
// is echoed with its user:password@ redacted.
// `redis_chunk_mb` (--redis_chunk_mb of both servers) is the size of one
// stored chunk of an entry: 1 to 511 MiB (Redis's bulk string limit is 512
// MiB), INVALID_ARGUMENT otherwise.
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
                                                int redis_timeout_ms, int redis_chunk_mb);

}  // namespace ape

#endif  // APESERVE_COMMON_SERVER_MODEL_AND_STORE_H_
