// apectl run / info: local generation and model description, no server.
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "clients/apectl/commands.h"
#include "common/engine/chat_template.h"
#include "common/engine/generate.h"
#include "common/engine/model.h"
#include "common/engine/transformer.h"

ABSL_FLAG(std::string, model, "", "model file: GGUF, or a llama2.c checkpoint (.bin)");
ABSL_FLAG(std::string, tokenizer, "", "tokenizer file for llama2.c checkpoints");
ABSL_FLAG(std::string, prompt, "", "prompt text (BOS is prepended when the model asks for it: add_bos)");
ABSL_FLAG(std::string, prompt_ids, "",
          "prompt as comma-separated token ids, used exactly as given (no BOS added); replaces --prompt");
ABSL_FLAG(bool, print_ids, false,
          "run, generate: print the generated token ids instead of the text: comma-separated on one line, as "
          "--prompt_ids takes them (generation still stops at EOS)");
ABSL_FLAG(int, max_tokens, 256, "tokens to generate after the prompt");
ABSL_FLAG(float, temperature, 0.f, "sampling temperature; 0 = greedy");
ABSL_FLAG(int, top_k, 0, "keep the k most likely tokens; 0 = off");
ABSL_FLAG(float, top_p, 1.f, "nucleus sampling mass; 1 = off");
ABSL_FLAG(float, min_p, 0.f, "drop tokens below min_p x the best; 0 = off");
ABSL_FLAG(float, repetition_penalty, 1.f, "penalty for recent tokens; 1 = off");
ABSL_FLAG(uint64_t, seed, 0, "random seed for sampling");
ABSL_FLAG(std::vector<std::string>, stop, {}, "comma-separated stop strings");
ABSL_FLAG(int, threads, 0, "compute threads; 0 = all cores");
ABSL_FLAG(bool, parse_special, false,
          "tokenize: text of control tokens (e.g. <|im_start|>) becomes those tokens; else it is plain text");

namespace ape::apectl {
namespace {

// "1,2,3" -> {1, 2, 3}; every id must be a token of the model.
absl::StatusOr<std::vector<int32_t>> ParseIds(const std::string& text, int vocab_size) {
  std::vector<int32_t> ids;
  for (absl::string_view field : absl::StrSplit(text, ',')) {
    int32_t id;
    if (!absl::SimpleAtoi(field, &id) || id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("--prompt_ids: '", field, "' is not a token id in [0, ", vocab_size, ")"));
    }
    ids.push_back(id);
  }
  return ids;
}

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
  std::printf("vocab:         %d (tokenizer %s, bos %d%s, eos %d)\n", c.vocab_size, m.tokenizer().source().c_str(),
              m.tokenizer().bos_id(), m.tokenizer().add_bos() ? "" : " not added", m.tokenizer().eos_id());
  std::printf("tokenizer:     %s%s%s\n", m.tokenizer_model().c_str(), m.tokenizer_pre().empty() ? "" : ", pre ",
              m.tokenizer_pre().c_str());
  // The family of tokenizer.chat_template (Jinja) the servers render for requests with chat.
  std::printf("chat template: %s\n", ChatFamilyName(DetectChatFormat(m.chat_template()).family));
  std::printf("attention:     rope %s%s%s%s\n", c.rope_style == RopeStyle::kNeox ? "neox" : "interleaved",
              c.rope_freq_scale != 1.f ? absl::StrFormat(", linear scale %g", c.rope_freq_scale).c_str() : "",
              c.qkv_bias ? ", q/k/v biases" : "", c.qk_norm ? ", q/k head norms" : "");
  std::printf("output:        %s\n", c.tied_output ? "tied to token embedding" : "separate classifier");
  const ModelWeights& w = m.weights();
  std::printf("weights:       %s (kept in the file's types, memory-mapped: %.1f MiB of matrices)\n",
              m.weight_types().c_str(), w.MatrixBytes() / 1048576.0);
  std::printf("memory:        %.1f MiB (the mapped file) + KV cache per token below\n", m.file_bytes() / 1048576.0);
  std::printf("kv cache:      %.1f KiB per token (float32 K and V, all layers)\n",
              2.0 * c.n_layers * c.kv_dim() * sizeof(float) / 1024);
  std::printf("fingerprint:   %s\n", m.fingerprint().c_str());
  std::fprintf(stderr, "fingerprint computed in %.3f ms\n", m.fingerprint_seconds() * 1e3);
  return 0;
}

// apectl tokenize reads only the tokenizer: a GGUF file's metadata (so a
// vocabulary-only GGUF works), or with --tokenizer a llama2.c checkpoint and
// its tokenizer file.
absl::StatusOr<Tokenizer> TokenizerFromFlags() {
  const std::string path = absl::GetFlag(FLAGS_model);
  if (path.empty()) return absl::InvalidArgumentError("--model is required");
  if (absl::GetFlag(FLAGS_tokenizer).empty()) return Tokenizer::FromGgufFile(path);
  auto model = LoadFromFlags();
  if (!model.ok()) return model.status();
  return (*model)->tokenizer();
}

int TokenizeCommand(const std::vector<std::string>& args) {
  auto tok = TokenizerFromFlags();
  if (!tok.ok()) {
    std::fprintf(stderr, "apectl tokenize: %s\n", tok.status().ToString().c_str());
    return 1;
  }
  // One line of space-separated ids per argument (no BOS).
  for (const auto& text : args) {
    std::vector<int32_t> ids = tok->Encode(text, /*bos=*/false, /*eos=*/false, absl::GetFlag(FLAGS_parse_special));
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
  const bool print_ids = absl::GetFlag(FLAGS_print_ids);
  std::vector<int32_t> prompt;
  if (absl::GetFlag(FLAGS_prompt_ids).empty()) {
    prompt = tok.Encode(absl::GetFlag(FLAGS_prompt), tok.add_bos(), /*eos=*/false);
    if (prompt.empty()) {
      std::fprintf(stderr, "apectl run: the prompt is empty and this model adds no BOS: give --prompt text\n");
      return 2;
    }
  } else if (auto ids = ParseIds(absl::GetFlag(FLAGS_prompt_ids), m.config().vocab_size); ids.ok()) {
    prompt = *std::move(ids);
  } else {
    std::fprintf(stderr, "apectl run: %s\n", ids.status().ToString().c_str());
    return 2;
  }
  std::vector<int32_t> positions(prompt.size());
  for (size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<int32_t>(i);

  auto t0 = std::chrono::steady_clock::now();
  Transformer tf(m);
  KvCache cache(m.config(), static_cast<int>(prompt.size()) + opt.max_tokens);
  std::vector<float> logits(m.config().vocab_size);
  tf.Forward(prompt, positions, cache, ApeParams{}, logits.data());
  auto t1 = std::chrono::steady_clock::now();

  // Print as llama2.c does: the prompt's pieces after BOS, then the stream;
  // or, with --print_ids, only the generated ids ("5,17,17,...").
  if (!print_ids) {
    const bool bos = prompt[0] == tok.bos_id();  // its text is not printed (nor the space after it)
    std::string prompt_text = bos ? tok.DecodeAll(std::span(prompt).subspan(1), prompt[0]) : tok.DecodeAll(prompt);
    std::fwrite(prompt_text.data(), 1, prompt_text.size(), stdout);
    std::fflush(stdout);
  }
  int printed = 0;
  GenerateResult r = Generate(tf, cache, ApeParams{}, std::move(logits), prompt, static_cast<int32_t>(prompt.size()),
                              opt, [&](const TokenEvent& ev) {
                                if (!print_ids) {
                                  std::fwrite(ev.text.data(), 1, ev.text.size(), stdout);
                                } else if (ev.id >= 0) {
                                  std::printf(printed++ ? ",%d" : "%d", ev.id);
                                }
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
