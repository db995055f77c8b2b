// ape-encoder: a stateless gRPC server that encodes contexts into Redis.
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/engine/transformer.h"
#include "common/server/model_and_store.h"
#include "encoder_service/encoder_service.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "address to listen on (host:port)");
ABSL_FLAG(std::string, redis, "redis://127.0.0.1:6379", "Redis URI: redis://[[user]:password@]host[:port][/db] or unix:///path[?db=N]");
ABSL_FLAG(std::string, model, "", "model file (GGUF, or llama2.c .bin with --tokenizer)");
ABSL_FLAG(std::string, tokenizer, "", "tokenizer file for llama2.c checkpoints");
ABSL_FLAG(std::string, kv_dtype, "float16", "stored KV dtype when a request does not say: float16 or float32");
ABSL_FLAG(int, ttl_seconds, 0, "expiry of new cache entries when a request does not say; 0 = none");
ABSL_FLAG(int, max_contexts, 64, "contexts per request, at most");
ABSL_FLAG(int, max_context_tokens, 0, "tokens per context, at most; 0 = the model's context length");
ABSL_FLAG(int, max_prefix_tokens, 0, "prefix tokens, at most; 0 = the model's context length");
ABSL_FLAG(int, max_message_mb, 64, "largest gRPC message accepted or sent, MiB");
ABSL_FLAG(int, threads, 0, "compute threads (OpenBLAS and ours); 0 = all cores");
ABSL_FLAG(int, max_concurrent, 1, "requests computing at once");
ABSL_FLAG(int, max_queue, 16, "requests waiting for compute before RESOURCE_EXHAUSTED");
ABSL_FLAG(int, redis_timeout_ms, 5000, "Redis command timeout, ms (connect: 1000)");
ABSL_FLAG(int, redis_chunk_mb, 64, "size of one stored chunk of a big entry, MiB");

int main(int argc, char** argv) {
  ape::InstallTerminationHandlers();
  absl::SetProgramUsageMessage("ape-encoder --model M [--tokenizer T] [--listen host:port] [--redis URI]");
  absl::ParseCommandLine(argc, argv);
  ape::SetComputeThreads(absl::GetFlag(FLAGS_threads));
  auto loaded = ape::LoadModelAndStore("ape-encoder", absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_tokenizer),
                                       absl::GetFlag(FLAGS_redis), absl::GetFlag(FLAGS_redis_timeout_ms),
                                       size_t(std::max(1, absl::GetFlag(FLAGS_redis_chunk_mb))) << 20);
  if (!loaded.ok()) {
    std::fprintf(stderr, "ape-encoder: %s\n", loaded.status().ToString().c_str());
    return 1;
  }
  const ape::Model& model = *loaded->model;
  const ape::ModelConfig& c = model.config();
  ape::EncoderLimits limits;
  limits.max_contexts = absl::GetFlag(FLAGS_max_contexts);
  limits.max_context_tokens = absl::GetFlag(FLAGS_max_context_tokens) > 0 ? absl::GetFlag(FLAGS_max_context_tokens) : c.context_length;
  limits.max_prefix_tokens = absl::GetFlag(FLAGS_max_prefix_tokens) > 0 ? absl::GetFlag(FLAGS_max_prefix_tokens) : c.context_length;
  const std::string dtype = absl::GetFlag(FLAGS_kv_dtype);
  if (dtype != "float16" && dtype != "float32") {
    std::fprintf(stderr, "ape-encoder: --kv_dtype must be float16 or float32\n");
    return 1;
  }
  limits.default_dtype = dtype == "float16" ? ape::KvDtype::kFloat16 : ape::KvDtype::kFloat32;
  limits.default_ttl_seconds = absl::GetFlag(FLAGS_ttl_seconds);
  limits.max_concurrent = std::max(1, absl::GetFlag(FLAGS_max_concurrent));
  limits.max_queue = std::max(0, absl::GetFlag(FLAGS_max_queue));
  ape::EncoderService service(model, *loaded->store, limits);
  ape::ServerOptions opts{absl::GetFlag(FLAGS_listen), absl::GetFlag(FLAGS_max_message_mb) << 20, "ape-encoder"};
  return ape::RunServer(opts, {&service});
}
