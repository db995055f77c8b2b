// ape-decoder: loads cached contexts and answers queries with APE, streaming.
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/engine/transformer.h"
#include "common/server/model_and_store.h"
#include "decoder_service/decoder_service.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50052", "address to listen on (host:port)");
ABSL_FLAG(std::string, redis, "redis://127.0.0.1:6379", "Redis URI: redis://[[user]:password@]host[:port][/db] or unix:///path[?db=N]");
ABSL_FLAG(std::string, model, "", "model file (GGUF, or llama2.c .bin with --tokenizer)");
ABSL_FLAG(std::string, tokenizer, "", "tokenizer file for llama2.c checkpoints");
ABSL_FLAG(std::string, encoder, "", "ape-encoder address for contexts missing from the cache; empty = encode locally");
ABSL_FLAG(std::string, ape_preset, "", "APE preset JSON (T, S); default: <model>.ape.json if present, else T=S=0.9");
ABSL_FLAG(std::string, kv_dtype, "float16", "dtype of entries for contexts sent as content: float16 or float32");
ABSL_FLAG(int, ttl_seconds, 0, "expiry of entries encoded on the fly; 0 = none");
ABSL_FLAG(int, max_contexts, 256, "contexts per request, at most");
ABSL_FLAG(int, max_context_tokens, 0, "tokens per context, at most; 0 = the model's context length");
ABSL_FLAG(int, max_prompt_tokens, 1 << 18, "KV slots per request (prompt + generated), at most");
ABSL_FLAG(int, max_new_tokens, 1024, "generated tokens per request, at most");
ABSL_FLAG(int, max_message_mb, 64, "largest gRPC message, MiB");
ABSL_FLAG(int, threads, 0, "compute threads (OpenBLAS and ours); 0 = all cores");
ABSL_FLAG(int, max_concurrent, 1, "requests computing at once");
ABSL_FLAG(int, max_queue, 16, "requests waiting for compute before RESOURCE_EXHAUSTED");
ABSL_FLAG(int, redis_timeout_ms, 5000, "Redis command timeout, ms");

int main(int argc, char** argv) {
  ape::InstallTerminationHandlers();
  absl::SetProgramUsageMessage("ape-decoder --model M [--tokenizer T] [--listen host:port] [--redis URI] [--encoder host:port]");
  absl::ParseCommandLine(argc, argv);
  ape::SetComputeThreads(absl::GetFlag(FLAGS_threads));
  auto loaded = ape::LoadModelAndStore("ape-decoder", absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_tokenizer),
                                       absl::GetFlag(FLAGS_redis), absl::GetFlag(FLAGS_redis_timeout_ms), size_t{64} << 20);
  if (!loaded.ok()) {
    std::fprintf(stderr, "ape-decoder: %s\n", loaded.status().ToString().c_str());
    return 1;
  }
  const ape::Model& model = *loaded->model;
  ape::ApePreset preset = ape::PresetForModel(absl::GetFlag(FLAGS_model));
  if (!absl::GetFlag(FLAGS_ape_preset).empty()) {
    auto p = ape::LoadApePreset(absl::GetFlag(FLAGS_ape_preset));
    if (!p.ok()) {
      std::fprintf(stderr, "ape-decoder: %s\n", p.status().ToString().c_str());
      return 1;
    }
    preset = *p;
  }
  const std::string dtype = absl::GetFlag(FLAGS_kv_dtype);
  if (dtype != "float16" && dtype != "float32") {
    std::fprintf(stderr, "ape-decoder: --kv_dtype must be float16 or float32\n");
    return 1;
  }
  const ape::ModelConfig& c = model.config();
  ape::DecoderLimits limits;
  limits.max_contexts = absl::GetFlag(FLAGS_max_contexts);
  limits.max_context_tokens = absl::GetFlag(FLAGS_max_context_tokens) > 0 ? absl::GetFlag(FLAGS_max_context_tokens) : c.context_length;
  limits.max_prompt_tokens = absl::GetFlag(FLAGS_max_prompt_tokens);
  limits.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  limits.max_concurrent = std::max(1, absl::GetFlag(FLAGS_max_concurrent));
  limits.max_queue = std::max(0, absl::GetFlag(FLAGS_max_queue));
  limits.default_dtype = dtype == "float16" ? ape::KvDtype::kFloat16 : ape::KvDtype::kFloat32;
  limits.ttl_seconds = absl::GetFlag(FLAGS_ttl_seconds);
  std::fprintf(stderr, "ape-decoder: encoder %s, APE T=%.2f S=%.2f (%s)\n",
               absl::GetFlag(FLAGS_encoder).empty() ? "local" : absl::GetFlag(FLAGS_encoder).c_str(),
               preset.temperature, preset.scale, preset.source.c_str());
  ape::DecoderService service(model, loaded->store.get(), limits, preset, absl::GetFlag(FLAGS_encoder));
  ape::ServerOptions opts{absl::GetFlag(FLAGS_listen), absl::GetFlag(FLAGS_max_message_mb) << 20, "ape-decoder"};
  return ape::RunServer(opts, {&service});
}
