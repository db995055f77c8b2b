// ape-decoder: loads cached contexts and answers queries with APE, streaming.
#include <algorithm>
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/engine/transformer.h"
#include "common/server/cache_service.h"
#include "common/server/kv_dtype.h"
#include "common/server/model_and_store.h"
#include "decoder_service/decoder_service.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50052", "address to listen on (host:port)");
ABSL_FLAG(std::string, redis, "redis://127.0.0.1:6379",
          "Redis URI: redis://[[user]:password@]host[:port][/db], unix:///path[?db=N] or "
          "redis+cluster://[[user]:password@]host:port[,host:port...] (Redis Cluster seed nodes)");
ABSL_FLAG(std::string, model, "", "model file (GGUF, or llama2.c .bin with --tokenizer)");
ABSL_FLAG(std::string, tokenizer, "", "tokenizer file for llama2.c checkpoints");
ABSL_FLAG(std::string, encoder, "",
          "ape-encoder address for contexts missing from the cache: host:port, ipv4:A:P,B:P (a list) or "
          "dns:///name:port, balanced round-robin over every address; empty = encode locally");
ABSL_FLAG(std::string, ape_preset, "", "APE preset JSON (T, S); default: <model>.ape.json if present, else T=S=0.9");
ABSL_FLAG(ape::KvDtype, kv_dtype, ape::KvDtype::kFloat16,
          "dtype of entries for contexts sent as content when a request does not say: float16, float32 or int8");
ABSL_FLAG(int, ttl_seconds, 0, "expiry of entries encoded on the fly; 0 = none");
ABSL_FLAG(int, max_contexts, 256, "contexts per request, at most");
ABSL_FLAG(int, max_context_tokens, 0, "tokens per context, at most; 0 = the model's context length");
ABSL_FLAG(int, max_prefix_tokens, 0, "prefix tokens (BOS included), at most; 0 = the model's context length");
ABSL_FLAG(int, max_query_tokens, 0, "query tokens, at most; 0 = the model's context length");
ABSL_FLAG(int, max_positions, 0,
          "positional extent of a request, at most: prefix + longest context (SEQUENTIAL: all contexts) + query + "
          "max_tokens; 0 = the model's context length (raise it only to measure quality past the window)");
ABSL_FLAG(int64_t, max_request_kv_mb, 1024,
          "float32 KV cache of one request (prompt + generated: slots x 2 x n_layers x kv_dim x 4 bytes), at most, "
          "MiB; each of --max_concurrent requests may take this much");
ABSL_FLAG(int, max_prompt_tokens, 0,
          "KV slots per request (prompt + generated), at most; 0 = --max_request_kv_mb alone");
ABSL_FLAG(int64_t, max_text_bytes, 1 << 20, "bytes of one text field of a request (prefix, query, context), at most");
ABSL_FLAG(int64_t, max_request_text_bytes, 16 << 20, "bytes of all text fields of a request together, at most");
ABSL_FLAG(int, max_new_tokens, 1024, "generated tokens per request, at most");
ABSL_FLAG(int, max_message_mb, 64, "largest gRPC message accepted or sent (also to --encoder), MiB (1 to 2047)");
ABSL_FLAG(int, threads, 0, "compute threads (OpenBLAS and ours); 0 = all cores");
ABSL_FLAG(int64_t, hot_cache_mb, 0,
          "MiB of verified KV entries kept in the decoder's memory (LRU by bytes; a hit skips Redis); 0 = off");
ABSL_FLAG(int, max_concurrent, 8,
          "requests computing at once: the width of the decode batch (streams sharing one forward step; "
          "1 to 256); more wait in the queue");
ABSL_FLAG(int, prefill_chunk, 32,
          "prompt tokens prefilled between two decode steps: bounds how long a newcomer's prefill stalls the "
          "running streams (1 to 1024)");
ABSL_FLAG(int, max_queue, 16, "requests waiting for compute before RESOURCE_EXHAUSTED");
ABSL_FLAG(int, redis_timeout_ms, 5000, "Redis command timeout, ms");
ABSL_FLAG(int, redis_chunk_mb, 64, "size of one stored chunk of a big entry encoded here, MiB (1 to 511)");

int main(int argc, char** argv) {
  ape::InstallTerminationHandlers();
  absl::SetProgramUsageMessage(
      "ape-decoder --model M [--tokenizer T] [--listen host:port] [--redis URI] [--encoder host:port]");
  absl::ParseCommandLine(argc, argv);
  ape::SetComputeThreads(absl::GetFlag(FLAGS_threads));
  auto message_bytes = ape::MessageBytesFromMb(absl::GetFlag(FLAGS_max_message_mb), "max_message_mb");
  if (!message_bytes.ok()) {
    std::fprintf(stderr, "ape-decoder: %s\n", message_bytes.status().ToString().c_str());
    return 1;
  }
  auto loaded = ape::LoadModelAndStore("ape-decoder", absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_tokenizer),
                                       absl::GetFlag(FLAGS_redis), absl::GetFlag(FLAGS_redis_timeout_ms),
                                       absl::GetFlag(FLAGS_redis_chunk_mb));
  if (!loaded.ok()) {
    std::fprintf(stderr, "ape-decoder: %s\n", loaded.status().ToString().c_str());
    return 1;
  }
  const ape::Model& model = *loaded->model;
  // A preset that exists but cannot be used stops the server: serving with
  // defaults the operator did not choose would be a silent change of answers.
  auto preset = absl::GetFlag(FLAGS_ape_preset).empty() ? ape::PresetForModel(absl::GetFlag(FLAGS_model))
                                                        : ape::LoadApePreset(absl::GetFlag(FLAGS_ape_preset));
  if (!preset.ok()) {
    std::fprintf(stderr, "ape-decoder: APE preset: %s\n", preset.status().ToString().c_str());
    return 1;
  }
  if (!(preset->temperature >= ape::kMinApeParam && preset->temperature <= ape::kMaxApeParam &&
        preset->scale >= ape::kMinApeParam && preset->scale <= ape::kMaxApeParam)) {
    std::fprintf(stderr, "ape-decoder: APE preset T=%g S=%g (%s): each must be in [%g, %g]\n", preset->temperature,
                 preset->scale, preset->source.c_str(), ape::kMinApeParam, ape::kMaxApeParam);
    return 1;
  }
  const int context_length = model.config().context_length;
  auto or_context_length = [context_length](int flag) { return flag > 0 ? flag : context_length; };
  const ape::DecoderLimits limits{
      .max_contexts = absl::GetFlag(FLAGS_max_contexts),
      .max_context_tokens = or_context_length(absl::GetFlag(FLAGS_max_context_tokens)),
      .max_prefix_tokens = or_context_length(absl::GetFlag(FLAGS_max_prefix_tokens)),
      .max_query_tokens = or_context_length(absl::GetFlag(FLAGS_max_query_tokens)),
      .max_positions = or_context_length(absl::GetFlag(FLAGS_max_positions)),
      .max_request_kv_mb = absl::GetFlag(FLAGS_max_request_kv_mb),
      .max_prompt_tokens = std::max(0, absl::GetFlag(FLAGS_max_prompt_tokens)),
      .max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens),
      .text = {.max_field_bytes = absl::GetFlag(FLAGS_max_text_bytes),
               .max_request_bytes = absl::GetFlag(FLAGS_max_request_text_bytes)},
      .max_concurrent = std::clamp(absl::GetFlag(FLAGS_max_concurrent), 1, 256),
      .prefill_chunk = std::clamp(absl::GetFlag(FLAGS_prefill_chunk), 1, 1024),
      .max_queue = std::max(0, absl::GetFlag(FLAGS_max_queue)),
      .default_dtype = absl::GetFlag(FLAGS_kv_dtype),
      .ttl_seconds = absl::GetFlag(FLAGS_ttl_seconds),
      .hot_cache_mb = std::max<int64_t>(0, absl::GetFlag(FLAGS_hot_cache_mb)),
  };
  const std::string encoder = absl::GetFlag(FLAGS_encoder);
  std::fprintf(stderr, "ape-decoder: encoder %s, APE T=%.2f S=%.2f (%s)\n", encoder.empty() ? "local" : encoder.c_str(),
               preset->temperature, preset->scale, preset->source.c_str());
  const ape::KvBudget budget = ape::MakeKvBudget(model.config(), limits.max_request_kv_mb, limits.max_prompt_tokens);
  std::fprintf(stderr, "ape-decoder: per request at most %lld KV slots (%s), %d positions\n",
               static_cast<long long>(budget.max_slots), budget.limit.c_str(), limits.max_positions);
  ape::DecoderService service(model, loaded->store.get(), limits, *preset,
                              encoder.empty() ? nullptr : ape::MakeChannel(encoder, *message_bytes));
  const ape::ServerOptions opts{
      .listen = absl::GetFlag(FLAGS_listen), .max_message_bytes = *message_bytes, .name = "ape-decoder"};
  ape::CacheService cache(model, *loaded->store, "decoder");
  if (ape::HotCache* hot = service.hot_cache()) cache.OnDelete([hot](const std::string& key) { hot->Erase(key); });
  std::vector<grpc::Service*> services = {&service};
  if (ape::CacheAdminFromFlags()) services.push_back(&cache);
  return ape::RunServer(opts, services);
}
