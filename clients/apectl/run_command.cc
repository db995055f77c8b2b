// apectl run / info: local generation and model description, no server.
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_format.h"
#include "clients/apectl/commands.h"
#include "common/engine/generate.h"
#include "common/engine/model.h"
#include "common/engine/transformer.h"

ABSL_FLAG(std::string, model, "", "model file: GGUF, or a llama2.c checkpoint (.bin)");
ABSL_FLAG(std::string, tokenizer, "", "tokenizer file for llama2.c checkpoints");
ABSL_FLAG(std::string, prompt, "", "prompt text (BOS is prepended)");
ABSL_FLAG(int, max_tokens, 256, "tokens to generate after the prompt");
ABSL_FLAG(float, temperature, 0.f, "sampling temperature; 0 = greedy");
ABSL_FLAG(int, top_k, 0, "keep the k most likely tokens; 0 = off");
ABSL_FLAG(float, top_p, 1.f, "nucleus sampling mass; 1 = off");
ABSL_FLAG(float, min_p, 0.f, "drop tokens below min_p x the best; 0 = off");
ABSL_FLAG(float, repetition_penalty, 1.f, "penalty for recent tokens; 1 = off");
ABSL_FLAG(uint64_t, seed, 0, "random seed for sampling");
ABSL_FLAG(std::vector<std::string>, stop, {}, "comma-separated stop strings");
ABSL_FLAG(int, threads, 0, "compute threads; 0 = all cores");

namespace ape::apectl {
namespace {

absl::StatusOr<std::unique_ptr<Model>> LoadFromFlags() {
  const std::string path = absl::GetFlag(FLAGS_model);
  if (path.empty()) return absl::InvalidArgumentError("--model is required");
  return Model::Load(path, absl::GetFlag(FLAGS_tokenizer));
}

}  // namespace

int InfoCommand(const std::vector<std::string>&) {
  auto model = LoadFromFlags();
  if (!model.ok()) {
    std::fprintf(stderr, "apectl info: %s\n", model.status().ToString().c_str());
    return 1;
  }
  const Model& m = **model;
  const ModelConfig& c = m.config();
  std::printf("file:          %s (%s, %llu bytes)\n", m.path().c_str(), m.format().c_str(),
              static_cast<unsigned long long>(m.file_bytes()));
  std::printf("architecture:  %s\n", c.architecture.c_str());
  std::printf("parameters:    %lld\n", static_cast<long long>(c.num_params()));
  std::printf("dim:           %d\nhidden_dim:    %d\nlayers:        %d\n", c.dim, c.hidden_dim, c.n_layers);
  std::printf("heads:         %d (kv heads %d, head dim %d)\n", c.n_heads, c.n_kv_heads, c.head_dim);
  std::printf("rope:          dim %d, base %g%s\n", c.rope_dim, c.rope_base,
              c.rope_freq_factors.empty() ? "" : ", with frequency factors");
  std::printf("rms_eps:       %g\ncontext:       %d\n", c.rms_eps, c.context_length);
  std::printf("vocab:         %d (tokenizer %s, bos %d, eos %d)\n", c.vocab_size, m.tokenizer().source().c_str(),
              m.tokenizer().bos_id(), m.tokenizer().eos_id());
  std::printf("output:        %s\n", c.tied_output ? "tied to token embedding" : "separate classifier");
  std::printf("weights:       %s (held as float32: %.1f MiB)\n", m.weight_types().c_str(),
              c.num_params() * 4.0 / (1 << 20));
  std::printf("fingerprint:   %s\n", m.fingerprint().c_str());
  std::fprintf(stderr, "fingerprint computed in %.3f ms\n", m.fingerprint_seconds() * 1e3);
  return 0;
}

int TokenizeCommand(const std::vector<std::string>& args) {
  auto model = LoadFromFlags();
  if (!model.ok()) {
    std::fprintf(stderr, "apectl tokenize: %s\n", model.status().ToString().c_str());
    return 1;
  }
  // One line of space-separated ids per argument (no BOS).
  for (const auto& text : args) {
    std::vector<int32_t> ids = (*model)->tokenizer().Encode(text, /*bos=*/false, /*eos=*/false);
    for (size_t i = 0; i < ids.size(); ++i) std::printf(i ? " %d" : "%d", ids[i]);
    std::printf("\n");
  }
  return 0;
}

int RunCommand(const std::vector<std::string>&) {
  SetComputeThreads(absl::GetFlag(FLAGS_threads));
  auto model = LoadFromFlags();
  if (!model.ok()) {
    std::fprintf(stderr, "apectl run: %s\n", model.status().ToString().c_str());
    return 1;
  }
  const Model& m = **model;
  GenerateOptions opt;
  opt.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  opt.stop = absl::GetFlag(FLAGS_stop);
  opt.sampling.temperature = absl::GetFlag(FLAGS_temperature);
  opt.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  opt.sampling.top_p = absl::GetFlag(FLAGS_top_p);
  opt.sampling.min_p = absl::GetFlag(FLAGS_min_p);
  opt.sampling.repetition_penalty = absl::GetFlag(FLAGS_repetition_penalty);
  opt.sampling.seed = absl::GetFlag(FLAGS_seed);
  if (auto s = ValidateSamplingParams(opt.sampling); !s.ok() || opt.max_tokens < 0) {
    std::fprintf(stderr, "apectl run: %s\n", s.ok() ? "--max-tokens must be >= 0" : s.ToString().c_str());
    return 2;
  }
  const Tokenizer& tok = m.tokenizer();
  std::vector<int32_t> prompt = tok.Encode(absl::GetFlag(FLAGS_prompt), /*bos=*/true, /*eos=*/false);
  std::vector<int32_t> positions(prompt.size());
  for (size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<int32_t>(i);

  auto t0 = std::chrono::steady_clock::now();
  Transformer tf(m);
  KvCache cache(m.config(), static_cast<int>(prompt.size()) + opt.max_tokens);
  std::vector<float> logits(m.config().vocab_size);
  tf.Forward(prompt, positions, cache, ApeParams{}, logits.data());
  auto t1 = std::chrono::steady_clock::now();

  // Print as llama2.c does: the prompt's pieces after BOS, then the stream.
  std::string prompt_text = tok.DecodeAll(std::span(prompt).subspan(1), prompt[0]);
  std::fwrite(prompt_text.data(), 1, prompt_text.size(), stdout);
  std::fflush(stdout);
  GenerateResult r = Generate(tf, cache, ApeParams{}, std::move(logits), prompt, static_cast<int32_t>(prompt.size()),
                              opt, [](const TokenEvent& ev) {
                                std::fwrite(ev.text.data(), 1, ev.text.size(), stdout);
                                std::fflush(stdout);
                                return true;
                              });
  std::printf("\n");
  const double prefill = std::chrono::duration<double>(t1 - t0).count();
  std::fprintf(stderr, "prompt %zu tokens in %.1f ms; generated %zu tokens, %.1f tok/s; finish %s\n", prompt.size(),
               prefill * 1e3, r.tokens.size(), r.tokens.size() > 1 ? (r.tokens.size() - 1) / r.decode_seconds : 0.0,
               FinishReasonName(r.reason));
  return 0;
}

}  // namespace ape::apectl
