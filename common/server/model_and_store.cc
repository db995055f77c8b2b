#include "common/server/model_and_store.h"

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "common/engine/status_macros.h"

namespace ape {

absl::StatusOr<ModelAndStore> LoadModelAndStore(const std::string& name, const std::string& model_path,
                                                const std::string& tokenizer_path, const std::string& redis_uri,
                                                int redis_timeout_ms, int redis_chunk_mb) {
  constexpr int kMaxChunkMb = 511;  // a chunk is one Redis string: under its 512 MiB limit
  if (redis_chunk_mb < 1 || redis_chunk_mb > kMaxChunkMb) {
    return absl::InvalidArgumentError(
        absl::StrCat("--redis_chunk_mb=", redis_chunk_mb, ": must be 1 to ", kMaxChunkMb, " MiB"));
  }
  ModelAndStore out;
  ASSIGN_OR_RETURN(out.model, Model::Load(model_path, tokenizer_path));
  ASSIGN_OR_RETURN(RedisConfig redis, ParseRedisUri(redis_uri));
  redis.command_timeout_ms = redis_timeout_ms;
  redis.chunk_bytes = static_cast<size_t>(redis_chunk_mb) << 20;
  out.store = std::make_unique<RedisStore>(redis);
  if (auto s = out.store->Ping(); !s.ok())
    std::fprintf(stderr, "%s: warning: %s\n", name.c_str(), s.ToString().c_str());
  std::fprintf(stderr, "%s: model %s (%s, fingerprint %s), redis %s\n", name.c_str(), model_path.c_str(),
               out.model->format().c_str(), out.model->fingerprint().c_str(), redis.Describe().c_str());
  return out;
}

}  // namespace ape
