// Engine benchmark: prefill and decode tokens/s on a random-weight model of
// a realistic shape in each weight type asked for (or on a real GGUF file),
// next to this machine's OpenBLAS sgemm GFLOP/s and memory bandwidth
// measured in the same run. Results (Markdown) to stdout, progress to stderr.
// Decode is set against streaming the weights once at the best read pass's
// bandwidth two ways: the mean step of --decode tokens (best of --repeats),
// and the fastest single step, which like a read pass is one pass over the
// weights (on this shared machine the longer window collects more
// disturbance than the best of 5 short passes it is compared with).
//   bench_engine --shape tinyllama-1.1b --types F32,F16,Q8_0,Q4_0,Q4_K,Q6_K
//   bench_engine --model model.gguf
#include <malloc.h>

#include <chrono>
#include <cstdio>
#include <numeric>
#include <thread>
#include <vector>

#include <fstream>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "bench/random_model.h"
#include "common/engine/quant.h"
#include "common/engine/quantize_model.h"
#include "common/engine/transformer.h"
#include "xxhash.h"

ABSL_FLAG(std::string, shape, "qwen2.5-0.5b", "model shape: qwen2.5-0.5b, llama-3.2-1b, tinyllama-1.1b, small");
ABSL_FLAG(int, prefill, 512, "prompt tokens prefilled in one Forward call");
ABSL_FLAG(int, block, 256,
          "tokens per internal block of the prefill (the Transformer's max_batch, which sizes its activation scratch; "
          "256 is the engine's default, which the services use); 0 = the whole prompt as one block");
ABSL_FLAG(int, decode, 32, "tokens decoded one at a time after the prompt");
ABSL_FLAG(int, threads, 0, "compute threads; 0 = all cores");
ABSL_FLAG(int, repeats, 3, "repeats; the best is reported");
ABSL_FLAG(std::string, types, "F32",
          "weight types of the random model, comma-separated (F32,F16,BF16,Q8_0,Q4_0,Q5_0,Q5_1,Q4_K,Q5_K,Q6_K)");
ABSL_FLAG(std::string, model, "", "a GGUF file to benchmark instead of a random model");
ABSL_FLAG(std::string, kernels, "", "weight kernels' ISA (avx2, avx512-vnni); empty = the best this CPU has");

namespace ape::bench {
namespace {

// XXH3-128 (the model fingerprint's hash) over a 1 GiB buffer.
double FingerprintGBs() {
  std::vector<uint8_t> buf(size_t{1} << 30, 7);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    double t0 = Now();
    XXH128_hash_t h = XXH3_128bits(buf.data(), buf.size());
    double dt = Now() - t0;
    if (h.low64 == 42) std::fprintf(stderr, "!");
    best = std::max(best, buf.size() / dt / 1e9);
  }
  return best;
}

// The model's layer matrices, {rows, cols}: the shapes prefill multiplies.
std::vector<std::pair<int, int>> PrefillShapes(const ModelConfig& c) {
  return {{c.q_dim(), c.dim}, {c.kv_dim(), c.dim}, {c.dim, c.q_dim()}, {c.hidden_dim, c.dim}, {c.dim, c.hidden_dim}};
}

// A field of /proc/self/status in bytes ("VmRSS": resident set size;
// "RssAnon": its anonymous part, "RssFile": mapped file pages).
int64_t StatusBytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1)) * 1024;
  }
  return 0;
}
int64_t RssBytes() { return StatusBytes("VmRSS"); }

struct Row {
  std::string name;
  double weight_gb = 0, prefill_tps = 0, prefill_gflops = 0, decode_tps = 0, stream_ratio = 0, step_ratio = 0;
  double batch8_ratio = 0;  // a forward pass of 8 decode tokens / one of 1 token
  // Resident memory the model took (the process's peak over its baseline
  // before the model: libraries, the probes' buffers), against file + KV + 10%.
  double rss_gb = 0, budget_gb = 0;
};

constexpr int kBatch = 8;  // tokens of the decode-batch measurement

// Prefill `np` tokens then decode `nd`, then one decode batch of kBatch
// tokens, best of --repeats.
Row Measure(const Model& model, const std::string& name, int np, int nd, double bw, double file_gb,
            int64_t baseline_rss) {
  const ModelConfig& c = model.config();
  const double layer_params = double(c.q_dim()) * c.dim * 2 + 2.0 * c.kv_dim() * c.dim + 3.0 * c.hidden_dim * c.dim;
  const double flops_per_token = 2.0 * (c.n_layers * layer_params);
  const double bytes_per_token = WeightBytesPerToken(model.weights());
  std::vector<int32_t> tokens(np), pos(np + nd + kBatch);
  for (int i = 0; i < np; ++i) tokens[i] = 3 + (i * 37) % (c.vocab_size - 3);
  std::iota(pos.begin(), pos.end(), 0);
  const int block = absl::GetFlag(FLAGS_block);
  Transformer tf(model, std::max(block > 0 ? std::min(block, np) : np, kBatch));
  std::vector<float> logits(c.vocab_size);
  double best_prefill = 1e30, best_decode = 1e30, best_batch8 = 1e30, best_step = 1e30;
  int64_t rss = 0;
  const double kv_gb = 2.0 * c.n_layers * c.kv_dim() * sizeof(float) * (np + nd) / 1e9;
  for (int rep = 0; rep < absl::GetFlag(FLAGS_repeats); ++rep) {
    KvCache cache(c, np + nd + kBatch);
    double t0 = Now();
    tf.Forward(tokens, std::span(pos).first(np), cache, ApeParams{}, logits.data());
    double t1 = Now();
    for (int i = 0; i < nd; ++i) {
      int32_t tok = 3 + i;
      const double s0 = Now();
      tf.Forward({&tok, 1}, {&pos[np + i], 1}, cache, ApeParams{}, logits.data());
      best_step = std::min(best_step, Now() - s0);
    }
    double t2 = Now();
    // A decode batch: 8 tokens in one forward pass (each weight read once).
    tf.Forward(std::span(tokens).first(kBatch), std::span(pos).subspan(np + nd, kBatch), cache, ApeParams{},
               logits.data());
    double t3 = Now();
    best_batch8 = std::min(best_batch8, t3 - t2);
    best_prefill = std::min(best_prefill, t1 - t0);
    best_decode = std::min(best_decode, (t2 - t1) / nd);
    rss = std::max(rss, RssBytes());
    std::fprintf(stderr,
                 "%s repeat %d: prefill %.2f s, decode %.1f ms/token, batch of %d %.1f ms; resident %.3f GB "
                 "(anonymous %.3f, file pages %.3f)\n",
                 name.c_str(), rep + 1, t1 - t0, (t2 - t1) / nd * 1e3, kBatch, (t3 - t2) * 1e3, RssBytes() / 1e9,
                 StatusBytes("RssAnon") / 1e9, StatusBytes("RssFile") / 1e9);
  }
  Row r;
  r.name = name;
  r.weight_gb = bytes_per_token / 1e9;
  r.prefill_tps = np / best_prefill;
  r.prefill_gflops = flops_per_token * np / best_prefill / 1e9;
  r.decode_tps = 1 / best_decode;
  r.stream_ratio = best_decode / (bytes_per_token / (bw * 1e9));
  r.step_ratio = best_step / (bytes_per_token / (bw * 1e9));
  r.batch8_ratio = best_batch8 / best_decode;
  r.rss_gb = (rss - baseline_rss) / 1e9;
  r.budget_gb = (file_gb + kv_gb) * 1.1;
  return r;
}

int Main() {
  SetComputeThreads(absl::GetFlag(FLAGS_threads));
  if (!ForceKernelIsaForTesting(absl::GetFlag(FLAGS_kernels).c_str())) {
    std::fprintf(stderr, "--kernels=%s: not available on this CPU\n", absl::GetFlag(FLAGS_kernels).c_str());
    return 2;
  }
  const int np = absl::GetFlag(FLAGS_prefill), nd = absl::GetFlag(FLAGS_decode);
  const std::string model_path = absl::GetFlag(FLAGS_model);
  auto load = [&]() -> std::unique_ptr<Model> {
    std::fprintf(stderr, "loading %s...\n", model_path.c_str());
    auto m = Model::Load(model_path);
    if (!m.ok()) std::fprintf(stderr, "%s\n", m.status().ToString().c_str());
    return m.ok() ? *std::move(m) : nullptr;
  };
  std::unique_ptr<Model> file_model;
  ModelConfig c;
  std::string title;
  if (!model_path.empty()) {
    // The shape first (the probes use it); the model is dropped and loaded
    // again after them, so the process's baseline does not include it.
    file_model = load();
    if (file_model == nullptr) return 2;
    c = file_model->config();
    title = absl::StrCat(model_path, " (", file_model->weight_types(), ")");
    file_model.reset();
  } else {
    auto shape = ShapeByName(absl::GetFlag(FLAGS_shape));
    if (!shape.ok()) {
      std::fprintf(stderr, "%s\n", shape.status().ToString().c_str());
      return 2;
    }
    c = *shape;
    title = absl::StrCat(absl::GetFlag(FLAGS_shape), " shape, random weights");
  }
  std::fprintf(stderr, "measuring memory bandwidth...\n");
  const double bw = ReadBandwidthGBs(size_t{1} << 30, 5);
  std::fprintf(stderr, "measuring fingerprint hashing...\n");
  const double fp_gbs = FingerprintGBs();
  std::fprintf(stderr, "measuring sgemm...\n");
  const SgemmProbe sgemm_probe = MeasureSgemm(PrefillShapes(c), np, 3);
  const double sgemm = sgemm_probe.best();
  // Resident memory before any model: libraries and what the probes keep
  // (OpenBLAS's per-thread buffers).
  const int64_t baseline_rss = RssBytes();

  std::vector<Row> rows;
  if (!model_path.empty()) {
    file_model = load();
    if (file_model == nullptr) return 2;
    rows.push_back(Measure(*file_model, "file", np, nd, bw, file_model->file_bytes() / 1e9, baseline_rss));
  } else {
    for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_types), ',')) {
      auto type = ParseQuantizeType(std::string(name));
      if (!type.ok()) {
        std::fprintf(stderr, "%s\n", type.status().ToString().c_str());
        return 2;
      }
      std::fprintf(stderr, "building random %s model in %s...\n", absl::GetFlag(FLAGS_shape).c_str(),
                   std::string(name).c_str());
      auto model = RandomModel(c, 1, *type);
      // Give back the heap pages of building it (float32 matrices quantized
      // and freed), as Model::Load does after parsing a file.
      malloc_trim(0);
      rows.push_back(
          Measure(*model, std::string(name), np, nd, bw, model->weights().MatrixBytes() / 1e9, baseline_rss));
    }
  }
  // Attention alone at the same shape (all layers), to show its share.
  double attn_seconds = 1e30;
  {
    KvCache cache(c, np);
    for (auto& x : cache.k) x = 0.01f;
    for (auto& x : cache.v) x = 0.01f;
    cache.size = np;
    std::vector<float> q(size_t(np) * c.q_dim(), 0.01f), out(q.size());
    for (int rep = 0; rep < 2; ++rep) {
      double t0 = Now();
      for (int l = 0; l < c.n_layers; ++l)
        ApeAttention(q.data(), np, 0, cache, 0, c.n_heads, c.n_kv_heads, c.head_dim, ApeParams{}, out.data());
      attn_seconds = std::min(attn_seconds, Now() - t0);
    }
  }
  std::printf("## Engine: %s, %d threads, kernels %s\n\n", title.c_str(), ComputeThreads(), KernelIsa());
  std::printf("| measure | value |\n|---|---:|\n");
  std::printf("| parameters | %.0f M |\n", c.num_params() / 1e6);
  std::printf("| memory read bandwidth | %.1f GB/s |\n", bw);
  std::printf("| resident memory before the model (libraries, probe buffers) | %.3f GB |\n", baseline_rss / 1e9);
  std::printf("| sgemm at prefill shapes (m=%d), OpenBLAS (%s kernels) on %d threads | %.1f GFLOP/s |\n", np,
              openblas_get_corename(), ComputeThreads(), sgemm_probe.openblas_threads);
  std::printf("| sgemm at prefill shapes (m=%d), MatMul F32 (%s on row bands) | %.1f GFLOP/s |\n", np,
              BlasHasCpuKernels() ? "one-thread OpenBLAS" : "FloatGemm", sgemm_probe.engine_bands);
  std::printf("| causal attention of %d tokens, all layers | %.2f s |\n", np, attn_seconds);
  std::printf("| model fingerprint (XXH3-128) | %.1f GB/s = %.3f s per GB |\n\n", fp_gbs, 1.0 / fp_gbs);
  std::printf(
      "| weights | GB read per token | prefill %d tok/s | prefill GFLOP/s (%% of sgemm) | decode tok/s | "
      "decode / weight-streaming time: mean (fastest step) | decode batch of 8 / 1 token | resident GB over the "
      "baseline (budget: file + "
      "KV + 10%%) |\n",
      np);
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %.3f | %.1f | %.1f (%.0f%%) | %.2f | %.2fx (%.2fx) | %.2fx | %.2f (%.2f) |\n", r.name.c_str(),
                r.weight_gb, r.prefill_tps, r.prefill_gflops, 100 * r.prefill_gflops / sgemm, r.decode_tps,
                r.stream_ratio, r.step_ratio, r.batch8_ratio, r.rss_gb, r.budget_gb);
  }
  return 0;
}

}  // namespace
}  // namespace ape::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return ape::bench::Main();
}
