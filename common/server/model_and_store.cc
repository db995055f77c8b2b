#include "common/server/model_and_store.h"

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/engine/status_macros.h"
#include "common/server/metrics.h"
#include "common/server/security.h"

namespace ape {
namespace {

// The Redis settings of `redis_uri` with the password (and user) from
// --redis_password_file / the environment; `auth` says where they came from,
// for the start-up line (never the password itself).
absl::StatusOr<RedisConfig> RedisConfigWithSecrets(const std::string& name, const std::string& redis_uri,
                                                   std::string* auth) {
  absl::StatusOr<RedisConfig> parsed = ParseRedisUri(redis_uri);
  if (!parsed.ok()) {  // its message quotes the URI, password and all
    return absl::Status(parsed.status().code(),
                        absl::StrReplaceAll(parsed.status().message(), {{redis_uri, RedactRedisUri(redis_uri)}}));
  }
  RedisConfig redis = *std::move(parsed);
  const bool uri_has_password = !redis.password.empty();
  ASSIGN_OR_RETURN(const std::string source, ApplyRedisSecrets(RedisSecretSourcesFromFlags(), &redis));
  if (uri_has_password) {
    std::fprintf(stderr,
                 "%s: warning: the --redis URI holds a password, which ps and pod specs show; use "
                 "--redis_password_file or $APESERVE_REDIS_PASSWORD%s\n",
                 name.c_str(), source == "the --redis URI" ? "" : absl::StrCat(" (", source, " wins)").c_str());
  }
  *auth = source.empty() ? "no password"
                         : absl::StrCat("password from ", source, redis.user.empty() ? "" : ", user " + redis.user);
  return redis;
}

// Redis traffic and latency per store call, as metrics.
void InstrumentStore(RedisStore& store, const std::string& server) {
  metrics::Registry& reg = metrics::Registry::Global();
  metrics::Counter& read =
      reg.GetCounter("ape_redis_read_bytes_total", "Cache entry bytes read from Redis", {{"server", server}});
  metrics::Counter& written =
      reg.GetCounter("ape_redis_written_bytes_total", "Cache entry bytes written to Redis", {{"server", server}});
  store.set_observer([&reg, &read, &written, server](const RedisStore::CallStats& c) {
    read.Inc(static_cast<double>(c.bytes_read));
    written.Inc(static_cast<double>(c.bytes_written));
    reg.GetHistogram("ape_redis_call_seconds", "Redis store calls (a whole pipelined call), by operation",
                     metrics::LatencyBuckets(), {{"server", server}, {"op", c.op}})
        .Observe(c.seconds);
    if (!c.ok)
      reg.GetCounter("ape_redis_errors_total", "Redis store calls that failed, by operation",
                     {{"server", server}, {"op", c.op}})
          .Inc();
  });
}

}  // namespace

absl::StatusOr<ModelAndStore> LoadModelAndStore(const std::string& name, const std::string& model_path,
                                                const std::string& tokenizer_path, const std::string& redis_uri,
                                                int redis_timeout_ms, int redis_chunk_mb) {
  constexpr int kMaxChunkMb = 511;  // a chunk is one Redis string: under its 512 MiB limit
  if (redis_chunk_mb < 1 || redis_chunk_mb > kMaxChunkMb) {
    return absl::InvalidArgumentError(
        absl::StrCat("--redis_chunk_mb=", redis_chunk_mb, ": must be 1 to ", kMaxChunkMb, " MiB"));
  }
  // 1. TLS files and Redis secrets first: a bad one refuses to start before the slow model load.
  RETURN_IF_ERROR(InitSecurityFromFlags());
  if (const ChannelSecurity& c = EncoderChannelSecurityFromFlags(); c.tls)
    std::fprintf(stderr, "%s: encoder channel: %s\n", name.c_str(), c.description.c_str());
  std::string auth;
  ASSIGN_OR_RETURN(RedisConfig redis, RedisConfigWithSecrets(name, redis_uri, &auth));
  redis.command_timeout_ms = redis_timeout_ms;
  redis.chunk_bytes = static_cast<size_t>(redis_chunk_mb) << 20;
  // 2. The model, then the store.
  ModelAndStore out;
  ASSIGN_OR_RETURN(out.model, Model::Load(model_path, tokenizer_path));
  out.store = std::make_unique<RedisStore>(redis);
  const std::string server = name.rfind("ape-", 0) == 0 ? name.substr(4) : name;
  InstrumentStore(*out.store, server);
  metrics::Registry::Global()
      .GetGauge("ape_model_info", "The served model (always 1; the labels describe it)",
                {{"server", server},
                 {"architecture", out.model->config().architecture},
                 {"fingerprint", out.model->fingerprint()},
                 {"weight_types", out.model->weight_types()},
                 {"format", out.model->format()}})
      .Set(1);
  if (auto s = out.store->Ping(); !s.ok())
    std::fprintf(stderr, "%s: warning: %s\n", name.c_str(), s.ToString().c_str());
  std::fprintf(stderr, "%s: model %s (%s, fingerprint %s), redis %s (%s)\n", name.c_str(), model_path.c_str(),
               out.model->format().c_str(), out.model->fingerprint().c_str(), redis.Describe().c_str(), auth.c_str());
  return out;
}

}  // namespace ape
