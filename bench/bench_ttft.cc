// Time to first token: SEQUENTIAL (prefix + contexts + query prefilled from
// scratch) against APE with the contexts loaded from Redis, at 1, 4, 16 and
// 64 contexts of 256 tokens, on a random-weight model of a realistic shape.
// Also decode tokens/s with and without APE attention. Markdown to stdout,
// JSON lines to --json, progress to stderr. --max_sequential_tokens=0 skips
// SEQUENTIAL (minutes at 16K tokens); --ape_repeats and --hot_cache_mb time
// warm APE requests (KV pool warm; entries served from memory). Next to each
// APE decode rate, the time a token takes against the time to read its bytes
// once (every weight matrix in its stored type plus the float16 K/V of every
// cached slot) at the read bandwidth measured right after that decode: the
// fastest decode step against the fastest read pass, both the least disturbed
// sample of one pass over memory on this shared machine, and the mean step.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "bench/random_model.h"
#include "common/engine/quantize_model.h"
#include "common/engine/transformer.h"
#include "common/pipeline/decode_pipeline.h"
#include "common/pipeline/hot_cache.h"
#include "tests/process_util.h"

ABSL_FLAG(std::string, shape, "qwen2.5-0.5b", "model shape");
ABSL_FLAG(std::string, type, "F32",
          "weight type of the random model (F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)");
ABSL_FLAG(std::string, model, "", "a GGUF file to use instead of a random model (e.g. one from apectl quantize)");
ABSL_FLAG(std::vector<std::string>, contexts, std::vector<std::string>({"1", "4", "16", "64"}), "context counts");
ABSL_FLAG(int, context_tokens, 256, "tokens per context");
ABSL_FLAG(int, query_tokens, 32, "query tokens");
ABSL_FLAG(int, decode_tokens, 16, "tokens generated per request");
ABSL_FLAG(int, max_sequential_tokens, 1 << 20, "skip SEQUENTIAL above this many prompt tokens");
ABSL_FLAG(std::string, json, "", "append one JSON line per measurement here");
ABSL_FLAG(std::string, redis, "",
          "a running Redis (URI) to use instead of a private redis-server: entries already there are not encoded again "
          "(it needs --proto-max-bulk-len 512mb for big entries)");
ABSL_FLAG(int, ape_repeats, 1,
          "APE requests per context count, the best TTFT kept (the first one warms the KV pool); SEQUENTIAL runs once");
ABSL_FLAG(std::string, kv_dtype, "float16", "dtype of the cached entries: float16, float32 or int8");
ABSL_FLAG(int, hot_cache_mb, 0,
          "> 0: also time APE with a hot-entry cache of this size (the decoder's --hot_cache_mb), after one request "
          "filled it");

namespace ape::bench {
namespace {

using Clock = std::chrono::steady_clock;

struct Run {
  double ttft_ms = 0, decode_tps = 0, load_ms = 0, prefill_ms = 0;
  double fastest_token_ms = 0;  // the quickest decode step (token to token)
};

Run Measure(const Model& m, RedisStore* store, const DecodeInput& in, HotCache* hot = nullptr) {
  DecodeStats st;
  DecodeHooks hooks;
  hooks.hot_cache = hot;
  auto t0 = Clock::now();
  double first = 0, fastest = 0;
  Clock::time_point last;
  auto r = RunDecode(
      m, store, in, hooks,
      [&](const TokenEvent&) {
        const auto now = Clock::now();
        if (first == 0) {
          first = std::chrono::duration<double, std::milli>(now - t0).count();
        } else {
          const double step = std::chrono::duration<double, std::milli>(now - last).count();
          if (fastest == 0 || step < fastest) fastest = step;
        }
        last = now;
        return true;
      },
      &st);
  Run out;
  if (!r.ok()) {
    std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
    return out;
  }
  out.ttft_ms = first;
  out.decode_tps = r->tokens.size() > 1 ? (r->tokens.size() - 1) / r->decode_seconds : 0;
  out.load_ms = st.cache_load_ms;
  out.prefill_ms = st.prefill_ms;
  out.fastest_token_ms = fastest;
  return out;
}

int Main() {
  std::unique_ptr<Model> model;
  std::string what;
  if (!absl::GetFlag(FLAGS_model).empty()) {
    auto m = Model::Load(absl::GetFlag(FLAGS_model));
    if (!m.ok()) {
      std::fprintf(stderr, "%s\n", m.status().ToString().c_str());
      return 2;
    }
    model = *std::move(m);
    what = absl::GetFlag(FLAGS_model) + " (" + model->weight_types() + ")";
  } else {
    auto shape = ShapeByName(absl::GetFlag(FLAGS_shape));
    auto type = ParseQuantizeType(absl::GetFlag(FLAGS_type));
    if (!shape.ok() || !type.ok()) {
      std::fprintf(stderr, "bad --shape or --type\n");
      return 2;
    }
    model = RandomModel(*shape, 3, *type);
    what = absl::GetFlag(FLAGS_shape) + " shape, random " + absl::GetFlag(FLAGS_type) + " weights";
  }
  const ModelConfig& c = model->config();
  std::unique_ptr<testing::RedisServer> redis;
  std::string uri = absl::GetFlag(FLAGS_redis);
  if (uri.empty()) {
    redis = std::make_unique<testing::RedisServer>(std::vector<std::string>{"--proto-max-bulk-len", "512mb"});
    if (!redis->ok()) return 1;
    uri = redis->uri();
  }
  auto config = ParseRedisUri(uri);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", config.status().ToString().c_str());
    return 2;
  }
  RedisStore store(*config);
  std::ofstream json;
  if (!absl::GetFlag(FLAGS_json).empty()) json.open(absl::GetFlag(FLAGS_json), std::ios::app);
  const int lc = absl::GetFlag(FLAGS_context_tokens), lq = absl::GetFlag(FLAGS_query_tokens);
  absl::StatusOr<KvDtype> dtype = ParseKvDtype(absl::GetFlag(FLAGS_kv_dtype));
  if (!dtype.ok()) {
    std::fprintf(stderr, "--kv_dtype: %s\n", dtype.status().ToString().c_str());
    return 2;
  }
  // Bytes a decoded token reads: the weights, then per cached slot its K and
  // V in every layer, in the entries' dtype.
  const double weight_bytes = WeightBytesPerToken(model->weights());
  const double kv_bytes_per_slot = static_cast<double>(KvBytesPerToken(c, *dtype));
  std::printf("## Time to first token: %s, %s KV, %d threads, contexts of %d tokens, %d-token query\n\n", what.c_str(),
              KvDtypeName(*dtype), ComputeThreads(), lc, lq);
  std::printf(
      "| contexts | prompt tokens | SEQUENTIAL TTFT | APE TTFT (Redis load + query prefill) | speedup | APE cache load "
      "| SEQUENTIAL decode | APE decode | APE decode step / streaming weights + KV: fastest (mean) |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const auto& ns : absl::GetFlag(FLAGS_contexts)) {
    const int n = std::stoi(ns);
    DecodeInput in;
    in.prefix_tokens = {1, 10, 11, 12, 13, 14, 15, 16};
    for (int i = 0; i < n; ++i) {
      std::vector<int32_t> t(lc);
      for (int j = 0; j < lc; ++j) t[j] = 3 + (i * 7919 + j * 31) % (c.vocab_size - 3);
      in.contexts.push_back({"", t});
    }
    for (int j = 0; j < lq; ++j) in.query_tokens.push_back(3 + (j * 17) % (c.vocab_size - 3));
    in.generate.max_tokens = absl::GetFlag(FLAGS_decode_tokens);
    in.dtype = *dtype;
    // Fill the cache (the encoder's job, not timed), then time APE from Redis.
    std::fprintf(stderr, "%d contexts: encoding into Redis...\n", n);
    EncodeInput enc;
    enc.prefix_tokens = in.prefix_tokens;
    enc.dtype = *dtype;
    for (auto& s : in.contexts) enc.contexts.push_back(*s.tokens);
    auto e = EncodeContexts(*model, store, enc);
    if (!e.ok()) {
      std::fprintf(stderr, "%s\n", e.status().ToString().c_str());
      return 1;
    }
    std::fprintf(stderr, "%d contexts: APE...\n", n);
    in.mode = DecodeMode::kApe;
    Run ape;
    for (int r = 0; r < std::max(1, absl::GetFlag(FLAGS_ape_repeats)); ++r) {
      const Run one = Measure(*model, &store, in);
      std::fprintf(stderr, "  APE TTFT %.0f ms (load %.0f ms, prefill %.0f ms)\n", one.ttft_ms, one.load_ms,
                   one.prefill_ms);
      if (r == 0 || one.ttft_ms < ape.ttft_ms) ape = one;
    }
    // The decode's reads at this moment's bandwidth: what the token would
    // take if it only streamed its bytes once.
    const int slots = in.prefix_tokens.size() + n * lc + lq + in.generate.max_tokens / 2;
    const double bw = ReadBandwidthGBs(size_t{1} << 30, 5);
    const double stream_s = (weight_bytes + slots * kv_bytes_per_slot) / (bw * 1e9);
    const double stream_ratio = ape.fastest_token_ms / 1e3 / stream_s;
    const double mean_ratio = ape.decode_tps > 0 ? 1.0 / ape.decode_tps / stream_s : 0;
    std::fprintf(stderr,
                 "  APE decode %.2f tok/s (fastest step %.1f ms): %.2fx (mean %.2fx) streaming %.0f MB at %.1f GB/s\n",
                 ape.decode_tps, ape.fastest_token_ms, stream_ratio, mean_ratio,
                 (weight_bytes + slots * kv_bytes_per_slot) / 1e6, bw);
    Run hot_run;
    if (absl::GetFlag(FLAGS_hot_cache_mb) > 0) {
      HotCache hot(static_cast<size_t>(absl::GetFlag(FLAGS_hot_cache_mb)) << 20);
      (void)Measure(*model, &store, in, &hot);  // fills it
      for (int r = 0; r < std::max(1, absl::GetFlag(FLAGS_ape_repeats)); ++r) {
        const Run one = Measure(*model, &store, in, &hot);
        if (r == 0 || one.ttft_ms < hot_run.ttft_ms) hot_run = one;
      }
      std::fprintf(stderr, "  APE TTFT with the hot cache %.0f ms (load %.0f ms), %zu entries held\n", hot_run.ttft_ms,
                   hot_run.load_ms, hot.stats().entries);
    }
    const int prompt = in.prefix_tokens.size() + n * lc + lq;
    Run seq;
    bool seq_ok = prompt <= absl::GetFlag(FLAGS_max_sequential_tokens);
    if (seq_ok) {
      std::fprintf(stderr, "%d contexts: SEQUENTIAL (%d tokens)...\n", n, prompt);
      in.mode = DecodeMode::kSequential;
      seq = Measure(*model, nullptr, in);
    }
    std::printf("| %d | %d | %s | %.0f ms | %s | %.0f ms | %.2f tok/s | %.2f tok/s | %.2fx (%.2fx) at %.1f GB/s |\n", n,
                prompt, seq_ok ? absl::StrFormat("%.0f ms", seq.ttft_ms).c_str() : "skipped", ape.ttft_ms,
                seq_ok ? absl::StrFormat("%.1fx", seq.ttft_ms / ape.ttft_ms).c_str() : "-", ape.load_ms, seq.decode_tps,
                ape.decode_tps, stream_ratio, mean_ratio, bw);
    std::fflush(stdout);
    if (json.is_open()) {
      json << absl::StrFormat(
          "{\"shape\":\"%s\",\"contexts\":%d,\"context_tokens\":%d,\"prompt_tokens\":%d,\"sequential_ttft_ms\":%.3f,"
          "\"ape_ttft_ms\":%.3f,\"ape_cache_load_ms\":%.3f,\"sequential_decode_tps\":%.3f,\"ape_decode_tps\":%.3f,"
          "\"ape_hot_ttft_ms\":%.3f,\"ape_fastest_token_ms\":%.3f,\"ape_decode_stream_ratio\":%.3f,\"ape_decode_mean_"
          "stream_ratio\":%.3f,\"bandwidth_gbs\":%.2f,\"threads\":%d,\"weights\":\"%s\",\"kv_dtype\":\"%s\"}\n",
          absl::GetFlag(FLAGS_shape), n, lc, prompt, seq_ok ? seq.ttft_ms : -1.0, ape.ttft_ms, ape.load_ms,
          seq.decode_tps, ape.decode_tps, absl::GetFlag(FLAGS_hot_cache_mb) > 0 ? hot_run.ttft_ms : -1.0,
          ape.fastest_token_ms, stream_ratio, mean_ratio, bw, ComputeThreads(),
          model->weight_types().empty() ? absl::GetFlag(FLAGS_type) : model->weight_types(), KvDtypeName(*dtype));
      json.flush();
    }
  }
  return 0;
}

}  // namespace
}  // namespace ape::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  ape::SetComputeThreads(0);
  return ape::bench::Main();
}
