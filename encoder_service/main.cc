// ape-encoder: a stateless gRPC server that encodes contexts into Redis.
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/engine/transformer.h"
#include "common/server/cache_service.h"
#include "common/server/kv_dtype.h"
#include "common/server/model_and_store.h"
#include "encoder_service/encoder_service.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "address to listen on (host:port)");
ABSL_FLAG(std::string, redis, "redis://127.0.0.1:6379",
          "Redis URI: redis://[[user]:password@]host[:port][/db], unix:///path[?db=N] or "
          "redis+cluster://[[user]:password@]host:port[,host:port...] (Redis Cluster seed nodes)");
ABSL_FLAG(std::string, model, "", "model file (GGUF, or llama2.c .bin with --tokenizer)");
ABSL_FLAG(std::string, tokenizer, "", "tokenizer file for llama2.c checkpoints");
ABSL_FLAG(ape::KvDtype, kv_dtype, ape::KvDtype::kFloat16,
          "stored KV dtype when a request does not say: float16, float32 or int8");
ABSL_FLAG(int, ttl_seconds, 0, "expiry of new cache entries when a request does not say; 0 = none");
ABSL_FLAG(int, max_contexts, 256,
          "contexts per request, at most (as the decoder's default: it sends all of a request's missing contexts in "
          "one Encode)");
ABSL_FLAG(int, max_context_tokens, 0, "tokens per context, at most; 0 = the model's context length");
ABSL_FLAG(int, max_prefix_tokens, 0, "prefix tokens, at most; 0 = the model's context length");
ABSL_FLAG(int, max_positions, 0,
          "prefix + context tokens (the last position a context is encoded at), at most; 0 = the model's context "
          "length (raise it only to measure quality past the window)");
ABSL_FLAG(int64_t, max_request_kv_mb, 1024,
          "float32 KV cache of one request (prefix + longest context: slots x 2 x n_layers x kv_dim x 4 bytes), at "
          "most, MiB");
ABSL_FLAG(int64_t, max_text_bytes, 1 << 20, "bytes of one text field of a request (prefix, context, Tokenize text)");
ABSL_FLAG(int64_t, max_request_text_bytes, 16 << 20, "bytes of all text fields of a request together, at most");
ABSL_FLAG(int, max_message_mb, 64, "largest gRPC message accepted or sent, MiB (1 to 2047)");
ABSL_FLAG(int, threads, 0, "compute threads (OpenBLAS and ours); 0 = all cores");
ABSL_FLAG(int, max_concurrent, 1, "requests computing at once");
ABSL_FLAG(int, max_queue, 16, "requests waiting for compute before RESOURCE_EXHAUSTED");
ABSL_FLAG(int, redis_timeout_ms, 5000, "Redis command timeout, ms (connect: 1000)");
ABSL_FLAG(int, redis_chunk_mb, 64, "size of one stored chunk of a big entry, MiB (1 to 511)");

int main(int argc, char** argv) {
  ape::InstallTerminationHandlers();
  absl::SetProgramUsageMessage("ape-encoder --model M [--tokenizer T] [--listen host:port] [--redis URI]");
  absl::ParseCommandLine(argc, argv);
  ape::SetComputeThreads(absl::GetFlag(FLAGS_threads));
  auto message_bytes = ape::MessageBytesFromMb(absl::GetFlag(FLAGS_max_message_mb), "max_message_mb");
  if (!message_bytes.ok()) {
    std::fprintf(stderr, "ape-encoder: %s\n", message_bytes.status().ToString().c_str());
    return 1;
  }
  auto loaded = ape::LoadModelAndStore("ape-encoder", absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_tokenizer),
                                       absl::GetFlag(FLAGS_redis), absl::GetFlag(FLAGS_redis_timeout_ms),
                                       absl::GetFlag(FLAGS_redis_chunk_mb));
  if (!loaded.ok()) {
    std::fprintf(stderr, "ape-encoder: %s\n", loaded.status().ToString().c_str());
    return 1;
  }
  const ape::Model& model = *loaded->model;
  const int context_length = model.config().context_length;
  auto or_context_length = [context_length](int flag) { return flag > 0 ? flag : context_length; };
  const ape::EncoderLimits limits{
      .max_contexts = absl::GetFlag(FLAGS_max_contexts),
      .max_context_tokens = or_context_length(absl::GetFlag(FLAGS_max_context_tokens)),
      .max_prefix_tokens = or_context_length(absl::GetFlag(FLAGS_max_prefix_tokens)),
      .max_positions = or_context_length(absl::GetFlag(FLAGS_max_positions)),
      .max_request_kv_mb = absl::GetFlag(FLAGS_max_request_kv_mb),
      .text = {.max_field_bytes = absl::GetFlag(FLAGS_max_text_bytes),
               .max_request_bytes = absl::GetFlag(FLAGS_max_request_text_bytes)},
      .default_dtype = absl::GetFlag(FLAGS_kv_dtype),
      .default_ttl_seconds = absl::GetFlag(FLAGS_ttl_seconds),
      .max_concurrent = std::max(1, absl::GetFlag(FLAGS_max_concurrent)),
      .max_queue = std::max(0, absl::GetFlag(FLAGS_max_queue)),
  };
  ape::EncoderService service(model, *loaded->store, limits);
  const ape::ServerOptions opts{
      .listen = absl::GetFlag(FLAGS_listen), .max_message_bytes = *message_bytes, .name = "ape-encoder"};
  ape::CacheService cache(model, *loaded->store, "encoder");
  std::vector<grpc::Service*> services = {&service};
  if (ape::CacheAdminFromFlags()) services.push_back(&cache);
  return ape::RunServer(opts, services);
}
