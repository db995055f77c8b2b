// One layer's APE attention on the Qwen2.5-0.5B attention shape (14 query
// heads, 2 KV heads, head_dim 64): the per-row reference kernel against the
// matrix-product kernel, for
//   (a) a 32-row query block over 16K cached slots, block C = all but the prefix,
//   (b) decode: 1 row over the same 16K slots,
//   (a16), (b16) the same two over a float16 cache laid out as the decoder
//       lays out an APE request (read-only float16 segments of 256 slots,
//       one per cache entry, then the writable float32 rows),
//   (b16m) (b16) through the matrix-product kernels rather than the decode
//       kernel (ApeKernelOptions::decode_kernel = false): the decode path
//       before it, in the same run,
//   (c) causal prefill of 2048 rows, no context block,
//   (d) one 256-row block of a long causal prefill (the transformer's
//       max_batch), after 8K slots: how SEQUENTIAL prefill calls it,
// with the machine's ceilings measured in the same run: MatMul GFLOP/s on a
// 512x4096x4096 product, and read bandwidth. Each cache holds --layers
// layers and calls go round them, so K/V come from memory as in a forward
// pass, not from the last call's L3.
//
// The machine may be shared: every measurement (ceilings included) runs once
// per round, the rounds interleave them, and each keeps its best time.
//
// FLOPs: 4 * head_dim * n_heads per (row, visible key): the sum over rows of
// the keys each row sees, so causal prefill counts about half of rows^2.
// Markdown to stdout.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "bench/bench_util.h"
#include "common/engine/ape_attention.h"
#include "common/engine/half.h"
#include "common/engine/matvec.h"
#include "common/engine/threading.h"

ABSL_FLAG(int, threads, 2, "compute threads");
ABSL_FLAG(int, heads, 14, "query heads");
ABSL_FLAG(int, kv_heads, 2, "key/value heads");
ABSL_FLAG(int, head_dim, 64, "head dimension");
ABSL_FLAG(int, slots, 16384, "cached slots for the query block and decode");
ABSL_FLAG(int, prefix, 8, "prefix slots (block O); the rest of --slots is block C");
ABSL_FLAG(int, query_rows, 32, "rows of the APE query block (a)");
ABSL_FLAG(int, prefill_rows, 2048, "rows of the causal prefill (c)");
ABSL_FLAG(int, block_rows, 256, "rows of the prefill block (d)");
ABSL_FLAG(int, block_first_slot, 8192, "slots before the prefill block (d)");
ABSL_FLAG(int, layers, 24, "cache layers the calls rotate over");
ABSL_FLAG(int, rounds, 5, "rounds over all measurements");
ABSL_FLAG(double, seconds, 0.5, "minimum time of one measurement in one round");
ABSL_FLAG(int, segment_slots, 256,
          "float16 cases: cached slots per read-only segment (one cache entry: a context of this many tokens)");
ABSL_FLAG(std::string, cases, "",
          "comma-separated case tags to run (a, b, a16, b16, b16m, c, d); empty = all (and then the summary line)");
ABSL_FLAG(int, key_tile, ape::ApeKernelOptions{}.key_tile, "ApeKernelOptions::key_tile");
ABSL_FLAG(int, target_lanes, ape::ApeKernelOptions{}.target_lanes, "ApeKernelOptions::target_lanes");
ABSL_FLAG(int, min_chunk_keys, ape::ApeKernelOptions{}.min_chunk_keys, "ApeKernelOptions::min_chunk_keys");
ABSL_FLAG(bool, avx512, true, "ApeKernelOptions::avx512: AVX-512 lane blocks where the CPU has them");

namespace ape::bench {
namespace {

using Clock = std::chrono::steady_clock;

// A timed operation: one call per run (`call` counts up), best seconds kept.
struct Measurement {
  std::function<void(int call)> run;
  double best = 1e30;
  int calls = 0;
};

// Each round calls every measurement for at least `seconds` (and once).
void RunRounds(std::vector<Measurement*>& all, int rounds, double seconds) {
  for (int r = 0; r < rounds; ++r)
    for (Measurement* m : all)
      for (double total = 0; total < seconds || total == 0;) {
        const auto t0 = Clock::now();
        m->run(m->calls++);
        const double s = std::chrono::duration<double>(Clock::now() - t0).count();
        m->best = std::min(m->best, s);
        total += s;
      }
}

// Deterministic values in [-2, 2), cheap enough for hundreds of MB.
void Fill(float* x, size_t n, uint32_t seed) {
  uint32_t s = seed * 2654435761u + 1;
  for (size_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    x[i] = static_cast<float>(s >> 8) * (4.f / 16777216.f) - 2.f;
  }
}

// One attention case: its cache (shared with another case when given), the
// query rows, and the reference and new kernels as measurements.
struct Case {
  Case(std::string name, int n, int first_slot, ApeParams ape)
      : name(std::move(name)), n(n), first_slot(first_slot), ape(ape) {}
  std::string name;
  int n, first_slot;
  ApeParams ape;
  std::shared_ptr<KvCache> cache;
  std::vector<float> q, out;
  Measurement reference, fast;

  double Flops() const {
    double keys = 0;  // visible (row, key) pairs
    for (int i = 0; i < n; ++i) keys += first_slot + i + 1;
    return 4.0 * absl::GetFlag(FLAGS_head_dim) * absl::GetFlag(FLAGS_heads) * keys;
  }
  // K/V bytes one call reads (one layer), at the widths they are stored.
  double KvBytes() const { return static_cast<double>(cache->KvBytesRead(first_slot + n)); }
};

ModelConfig Config() {
  ModelConfig config;
  config.n_layers = absl::GetFlag(FLAGS_layers);
  config.n_heads = absl::GetFlag(FLAGS_heads);
  config.n_kv_heads = absl::GetFlag(FLAGS_kv_heads);
  config.head_dim = absl::GetFlag(FLAGS_head_dim);
  config.dim = config.n_heads * config.head_dim;
  return config;
}

std::shared_ptr<KvCache> RandomCache(int slots) {
  auto cache = std::make_shared<KvCache>(Config(), slots);
  cache->size = slots;
  Fill(cache->k.data(), cache->k.size(), 4);
  Fill(cache->v.data(), cache->v.size(), 5);
  return cache;
}

// The decoder's layout for an APE request: `cached` slots in float16
// read-only segments of --segment_slots (each in its own buffer, laid out
// as a cache entry's payload: per layer K then V), then `rows` writable
// float32 slots.
std::shared_ptr<KvCache> RandomHalfCache(int cached, int rows) {
  const ModelConfig config = Config();
  auto cache = std::make_shared<KvCache>(config, cached + rows, cached);
  const int per = std::max(1, absl::GetFlag(FLAGS_segment_slots));
  const size_t kv_dim = config.kv_dim();
  std::vector<float> f;
  for (int s0 = 0; s0 < cached; s0 += per) {
    const int count = std::min(per, cached - s0);
    const size_t half = count * kv_dim;
    auto buf = std::make_shared<std::vector<uint16_t>>(2 * half * config.n_layers);
    f.resize(buf->size());
    Fill(f.data(), f.size(), 7 + s0);
    FloatToHalf(f.data(), buf->data(), f.size());
    KvSegment seg;
    seg.count = count;
    seg.element = KvElement::kFloat16;
    seg.k = reinterpret_cast<const uint8_t*>(buf->data());
    seg.v = reinterpret_cast<const uint8_t*>(buf->data() + half);
    seg.row_stride = kv_dim * sizeof(uint16_t);
    seg.layer_stride = 2 * half * sizeof(uint16_t);
    seg.owner = buf;
    (void)cache->AppendReadOnly(std::move(seg), s0);
  }
  Fill(cache->k.data(), cache->k.size(), 4);
  Fill(cache->v.data(), cache->v.size(), 5);
  cache->size = cached + rows;
  return cache;
}

void SetUp(Case& k, std::shared_ptr<KvCache> cache, bool decode_kernel = true) {
  const int heads = absl::GetFlag(FLAGS_heads), kv_heads = absl::GetFlag(FLAGS_kv_heads);
  const int hd = absl::GetFlag(FLAGS_head_dim), layers = absl::GetFlag(FLAGS_layers);
  k.cache = cache != nullptr ? cache : RandomCache(k.first_slot + k.n);
  k.q.resize(static_cast<size_t>(k.n) * heads * hd);
  k.out.resize(k.q.size());
  Fill(k.q.data(), k.q.size(), 6);
  const ApeKernelOptions opt{absl::GetFlag(FLAGS_key_tile), absl::GetFlag(FLAGS_target_lanes),
                             absl::GetFlag(FLAGS_min_chunk_keys), decode_kernel, absl::GetFlag(FLAGS_avx512)};
  k.fast.run = [&k, heads, kv_heads, hd, layers, opt](int call) {
    ApeAttention(k.q.data(), k.n, k.first_slot, *k.cache, call % layers, heads, kv_heads, hd, k.ape, k.out.data(), opt);
  };
  k.reference.run = [&k, heads, kv_heads, hd, layers](int call) {
    ApeAttentionReference(k.q.data(), k.n, k.first_slot, *k.cache, call % layers, heads, kv_heads, hd, k.ape,
                          k.out.data());
  };
}

int Main() {
  SetComputeThreads(absl::GetFlag(FLAGS_threads));
  const int slots = absl::GetFlag(FLAGS_slots), prefix = absl::GetFlag(FLAGS_prefix);
  const int query_rows = absl::GetFlag(FLAGS_query_rows);
  const ApeParams ape{prefix, slots, 0.8f, 0.9f};
  Case cases[] = {
      {"(a) APE query block", query_rows, slots, ape},
      {"(b) APE decode", 1, slots, ape},
      {"(a16) APE query block, float16 cache", query_rows, slots, ape},
      {"(b16) APE decode, float16 cache", 1, slots, ape},
      {"(b16m) APE decode, float16 cache, matrix-product kernels", 1, slots, ape},
      {"(c) causal prefill", absl::GetFlag(FLAGS_prefill_rows), 0, ApeParams{}},
      {"(d) prefill block", absl::GetFlag(FLAGS_block_rows), absl::GetFlag(FLAGS_block_first_slot), ApeParams{}},
  };
  SetUp(cases[0], nullptr);
  SetUp(cases[1], cases[0].cache);  // the query block's cache, one row after its slots
  SetUp(cases[2], RandomHalfCache(slots, query_rows));
  SetUp(cases[3], cases[2].cache);
  SetUp(cases[4], cases[2].cache, /*decode_kernel=*/false);
  SetUp(cases[5], nullptr);
  SetUp(cases[6], nullptr);

  // The ceilings, measured as bench_engine does (bench_util.h): a
  // 512x4096x4096 product as the engine runs it (MatMul: one-thread sgemm on
  // bands of rows across the compute threads, OpenBLAS itself kept at one
  // thread, or FloatGemm where OpenBLAS runs generic kernels), and a read of
  // 512 MB on the compute threads.
  const int m = 512, n = 4096, kk = 4096;
  std::vector<float> a(static_cast<size_t>(m) * kk), b(static_cast<size_t>(n) * kk), c(static_cast<size_t>(m) * n);
  Fill(a.data(), a.size(), 1);
  Fill(b.data(), b.size(), 2);
  const WeightMatrix w = WeightMatrix::FromFloats(std::move(b), n, kk);
  Measurement sgemm{[&](int) { MatMul(a.data(), m, w, c.data(), n); }};
  const ReadBuffer buffer(size_t{512} << 20);
  Measurement read{[&](int) { ReadSeconds(buffer); }};

  std::vector<Measurement*> all = {&sgemm, &read};
  const std::string only = absl::GetFlag(FLAGS_cases);
  const auto selected = [&only](const Case& k) {
    if (only.empty()) return true;
    const std::string tag = k.name.substr(1, k.name.find(')') - 1);
    for (absl::string_view t : absl::StrSplit(only, ','))
      if (t == tag) return true;
    return false;
  };
  for (Case& k : cases)
    if (selected(k)) all.insert(all.end(), {&k.fast, &k.reference});
  RunRounds(all, absl::GetFlag(FLAGS_rounds), absl::GetFlag(FLAGS_seconds));

  const double sgemm_gflops = 2.0 * m * n * kk / sgemm.best * 1e-9;
  const double read_gbps = buffer.size() / read.best * 1e-9;
  std::printf("## APE attention, one layer: %d heads, %d KV heads, head_dim %d, %d threads\n\n",
              absl::GetFlag(FLAGS_heads), absl::GetFlag(FLAGS_kv_heads), absl::GetFlag(FLAGS_head_dim),
              ComputeThreads());
  std::printf(
      "Ceilings in this run: sgemm 512x4096x4096 %.1f GFLOP/s, read bandwidth %.1f GB/s. Best of %d rounds.\n\n",
      sgemm_gflops, read_gbps, absl::GetFlag(FLAGS_rounds));
  std::printf(
      "| case | rows | keys | reference ms | new ms | speedup | reference GFLOP/s | new GFLOP/s | new %% of sgemm "
      "| K/V MB read | K/V read GB/s | %% of bandwidth |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Case& k : cases) {
    if (!selected(k)) continue;
    const double ref = k.reference.best, fast = k.fast.best, gbps = k.KvBytes() / fast * 1e-9;
    std::printf("| %s | %d | %d | %.2f | %.2f | %.1fx | %.1f | %.1f | %.0f%% | %.1f | %.1f | %.0f%% |\n",
                k.name.c_str(), k.n, k.first_slot + k.n, ref * 1e3, fast * 1e3, ref / fast, k.Flops() / ref * 1e-9,
                k.Flops() / fast * 1e-9, 100 * k.Flops() / fast * 1e-9 / sgemm_gflops, k.KvBytes() * 1e-6, gbps,
                100 * gbps / read_gbps);
  }
  if (!only.empty()) return 0;
  // Decode with a float16 cache against float32: bytes and time per layer.
  const Case &d32 = cases[1], &d16 = cases[3], &q32 = cases[0], &q16 = cases[2];
  std::printf(
      "\nDecode over %d cached slots, per layer: float32 %.2f MB in %.3f ms, float16 %.2f MB in %.3f ms "
      "(%.2fx the bytes, %.2fx the time). Query block of %d rows: float16 %.2fx the time of float32.\n",
      slots, d32.KvBytes() * 1e-6, d32.fast.best * 1e3, d16.KvBytes() * 1e-6, d16.fast.best * 1e3,
      d16.KvBytes() / d32.KvBytes(), d16.fast.best / d32.fast.best, query_rows, q16.fast.best / q32.fast.best);
  return 0;
}

}  // namespace
}  // namespace ape::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return ape::bench::Main();
}
