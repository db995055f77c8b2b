// Engine benchmark: prefill and decode tokens/s on a random-weight model of
// a realistic shape in each weight type asked for (or on a real GGUF file),
// next to this machine's OpenBLAS sgemm GFLOP/s and memory bandwidth
// measured in the same run. Results (Markdown) to stdout, progress to stderr.
//   bench_engine --shape tinyllama-1.1b --types F32,F16,Q8_0,Q4_0,Q4_K,Q6_K
//   bench_engine --model model.gguf
#include <cblas.h>

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
#include "bench/random_model.h"
#include "common/engine/quant.h"
#include "common/engine/quantize_model.h"
#include "common/engine/transformer.h"
#include "xxhash.h"

ABSL_FLAG(std::string, shape, "qwen2.5-0.5b", "model shape: qwen2.5-0.5b, llama-3.2-1b, tinyllama-1.1b, small");
ABSL_FLAG(int, prefill, 512, "prompt tokens prefilled as one block");
ABSL_FLAG(int, decode, 32, "tokens decoded one at a time after the prompt");
ABSL_FLAG(int, threads, 0, "compute threads; 0 = all cores");
ABSL_FLAG(int, repeats, 3, "repeats; the best is reported");
ABSL_FLAG(std::string, types, "F32",
          "weight types of the random model, comma-separated (F32,F16,BF16,Q8_0,Q4_0,Q4_K,Q6_K)");
ABSL_FLAG(std::string, model, "", "a GGUF file to benchmark instead of a random model");

namespace ape::bench {
namespace {

double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Read bandwidth: sum a 2 GiB buffer with all threads, 64 independent
// float accumulators per thread so that the adds are not the limit.
double MemoryBandwidthGBs() {
  const size_t n = (size_t{2} << 30) / sizeof(float);
  std::vector<float> a(n, 1.f);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    double t0 = Now(), total = 0;
#pragma omp parallel reduction(+ : total)
    {
      float acc[64] = {};
#pragma omp for schedule(static)
      for (size_t b = 0; b < n / 64; ++b) {
#pragma omp simd
        for (int j = 0; j < 64; ++j) acc[j] += a[b * 64 + j];
      }
      for (float v : acc) total += v;
    }
    double dt = Now() - t0;
    if (total != static_cast<double>(n)) std::fprintf(stderr, "bandwidth sum mismatch\n");
    best = std::max(best, n * sizeof(float) / dt / 1e9);
  }
  return best;
}

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

// sgemm at the model's prefill shapes: [m x in] * [out x in]^T for each matrix.
double SgemmGflops(const ModelConfig& c, int m) {
  const int shapes[][2] = {
      {c.q_dim(), c.dim}, {c.kv_dim(), c.dim}, {c.dim, c.q_dim()}, {c.hidden_dim, c.dim}, {c.dim, c.hidden_dim}};
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    double flops = 0, t = 0;
    for (auto& s : shapes) {
      std::vector<float> x(size_t(m) * s[1], 0.01f), w(size_t(s[0]) * s[1], 0.02f), y(size_t(m) * s[0]);
      double t0 = Now();
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, s[0], s[1], 1.f, x.data(), s[1], w.data(), s[1], 0.f,
                  y.data(), s[0]);
      t += Now() - t0;
      flops += 2.0 * m * s[0] * s[1];
    }
    best = std::max(best, flops / t / 1e9);
  }
  return best;
}

// Resident set size of this process, bytes.
int64_t RssBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return 0;
}

struct Row {
  std::string name;
  double weight_gb = 0, prefill_tps = 0, prefill_gflops = 0, decode_tps = 0, stream_ratio = 0;
  double rss_gb = 0, budget_gb = 0;  // resident memory vs file + KV + 10%
};

// Prefill `np` tokens then decode `nd`, best of --repeats.
Row Measure(const Model& model, const std::string& name, int np, int nd, double bw, double file_gb) {
  const ModelConfig& c = model.config();
  const ModelWeights& w = model.weights();
  const double layer_params = double(c.q_dim()) * c.dim * 2 + 2.0 * c.kv_dim() * c.dim + 3.0 * c.hidden_dim * c.dim;
  const double flops_per_token = 2.0 * (c.n_layers * layer_params);
  // Bytes streamed per decoded token: every layer matrix and the classifier
  // (the embedding contributes one row), in their stored types.
  const double bytes_per_token = double(w.MatrixBytes() - (w.wcls.empty() ? 0 : w.tok_emb.bytes()));
  std::vector<int32_t> tokens(np), pos(np + nd);
  for (int i = 0; i < np; ++i) tokens[i] = 3 + (i * 37) % (c.vocab_size - 3);
  std::iota(pos.begin(), pos.end(), 0);
  Transformer tf(model, np);
  std::vector<float> logits(c.vocab_size);
  double best_prefill = 1e30, best_decode = 1e30;
  int64_t rss = 0;
  const double kv_gb = 2.0 * c.n_layers * c.kv_dim() * sizeof(float) * (np + nd) / 1e9;
  for (int rep = 0; rep < absl::GetFlag(FLAGS_repeats); ++rep) {
    KvCache cache(c, np + nd);
    double t0 = Now();
    tf.Forward(tokens, std::span(pos).first(np), cache, ApeParams{}, logits.data());
    double t1 = Now();
    for (int i = 0; i < nd; ++i) {
      int32_t tok = 3 + i;
      tf.Forward({&tok, 1}, {&pos[np + i], 1}, cache, ApeParams{}, logits.data());
    }
    double t2 = Now();
    best_prefill = std::min(best_prefill, t1 - t0);
    best_decode = std::min(best_decode, (t2 - t1) / nd);
    rss = std::max(rss, RssBytes());
    std::fprintf(stderr, "%s repeat %d: prefill %.2f s, decode %.1f ms/token\n", name.c_str(), rep + 1, t1 - t0,
                 (t2 - t1) / nd * 1e3);
  }
  Row r;
  r.name = name;
  r.weight_gb = bytes_per_token / 1e9;
  r.prefill_tps = np / best_prefill;
  r.prefill_gflops = flops_per_token * np / best_prefill / 1e9;
  r.decode_tps = 1 / best_decode;
  r.stream_ratio = best_decode / (bytes_per_token / (bw * 1e9));
  r.rss_gb = rss / 1e9;
  r.budget_gb = (file_gb + kv_gb) * 1.1;
  return r;
}

int Main() {
  SetComputeThreads(absl::GetFlag(FLAGS_threads));
  const int np = absl::GetFlag(FLAGS_prefill), nd = absl::GetFlag(FLAGS_decode);
  const std::string model_path = absl::GetFlag(FLAGS_model);
  std::unique_ptr<Model> file_model;
  ModelConfig c;
  std::string title;
  if (!model_path.empty()) {
    std::fprintf(stderr, "loading %s...\n", model_path.c_str());
    auto m = Model::Load(model_path);
    if (!m.ok()) {
      std::fprintf(stderr, "%s\n", m.status().ToString().c_str());
      return 2;
    }
    file_model = *std::move(m);
    c = file_model->config();
    title = absl::StrCat(model_path, " (", file_model->weight_types(), ")");
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
  const double bw = MemoryBandwidthGBs();
  std::fprintf(stderr, "measuring fingerprint hashing...\n");
  const double fp_gbs = FingerprintGBs();
  std::fprintf(stderr, "measuring sgemm...\n");
  const double sgemm = SgemmGflops(c, np);

  std::vector<Row> rows;
  if (file_model) {
    rows.push_back(Measure(*file_model, "file", np, nd, bw, file_model->file_bytes() / 1e9));
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
      rows.push_back(Measure(*model, std::string(name), np, nd, bw, model->weights().MatrixBytes() / 1e9));
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
  std::printf("| OpenBLAS sgemm at prefill shapes (m=%d) | %.1f GFLOP/s |\n", np, sgemm);
  std::printf("| causal attention of %d tokens, all layers | %.2f s |\n", np, attn_seconds);
  std::printf("| model fingerprint (XXH3-128) | %.1f GB/s = %.3f s per GB |\n\n", fp_gbs, 1.0 / fp_gbs);
  std::printf(
      "| weights | GB read per token | prefill %d tok/s | prefill GFLOP/s (%% of sgemm) | decode tok/s | "
      "decode / weight-streaming time | resident GB (budget: file + KV + 10%%) |\n",
      np);
  std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %.3f | %.1f | %.1f (%.0f%%) | %.2f | %.2fx | %.2f (%.2f) |\n", r.name.c_str(), r.weight_gb,
                r.prefill_tps, r.prefill_gflops, 100 * r.prefill_gflops / sgemm, r.decode_tps, r.stream_ratio, r.rss_gb,
                r.budget_gb);
  }
  return 0;
}

}  // namespace
}  // namespace ape::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return ape::bench::Main();
}
