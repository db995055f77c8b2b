// KV store benchmark: encode tokens/s, bytes per token per dtype, and Redis
// write/read GB/s of KV blocks (1K and 32K tokens) through RedisStore, next
// to a plain single-command SET/GET of values of the same size on the same
// private redis-server (the baseline). Markdown to stdout, progress to stderr.
#include <hiredis/hiredis.h>

#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "bench/random_model.h"
#include "common/engine/transformer.h"
#include "common/kv/kv_block.h"
#include "common/pipeline/encode_pipeline.h"
#include "common/store/redis_store.h"
#include "tests/process_util.h"

ABSL_FLAG(std::string, shape, "qwen2.5-0.5b", "model shape for KV sizes and encode speed");
ABSL_FLAG(std::vector<std::string>, tokens, std::vector<std::string>({"1024", "32768"}), "block sizes in tokens");
ABSL_FLAG(int, encode_tokens, 1024, "context length for the encode-speed measurement");
ABSL_FLAG(int, repeats, 3, "repeats per measurement (best reported)");

namespace ape::bench {
namespace {

double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Plain SET/GET with hiredis: what Redis itself moves for one value.
struct Baseline {
  double set_s = -1, get_s = -1;
};
Baseline PlainSetGet(int port, const std::string& value, int repeats) {
  Baseline b;
  redisContext* c = redisConnect("127.0.0.1", port);
  for (int r = 0; r < repeats; ++r) {
    const char* argv[3] = {"SET", "baseline", value.data()};
    size_t lens[3] = {3, 8, value.size()};
    double t0 = Now();
    auto* rep = static_cast<redisReply*>(redisCommandArgv(c, 3, argv, lens));
    double t1 = Now();
    bool ok = rep && rep->type != REDIS_REPLY_ERROR;
    if (rep) freeReplyObject(rep);
    if (!ok) break;  // e.g. a value above proto-max-bulk-len (512 MiB)
    b.set_s = b.set_s < 0 ? t1 - t0 : std::min(b.set_s, t1 - t0);
    const char* gargv[2] = {"GET", "baseline"};
    size_t glens[2] = {3, 8};
    t0 = Now();
    rep = static_cast<redisReply*>(redisCommandArgv(c, 2, gargv, glens));
    t1 = Now();
    if (rep) freeReplyObject(rep);
    b.get_s = b.get_s < 0 ? t1 - t0 : std::min(b.get_s, t1 - t0);
  }
  freeReplyObject(redisCommand(c, "DEL baseline"));
  redisFree(c);
  return b;
}

int Main() {
  auto shape = ShapeByName(absl::GetFlag(FLAGS_shape));
  if (!shape.ok()) return 2;
  const ModelConfig c = *shape;
  const int repeats = absl::GetFlag(FLAGS_repeats);
  testing::RedisServer redis({"--proto-max-bulk-len", "512mb", "--client-query-buffer-limit", "1gb"});
  if (!redis.ok()) {
    std::fprintf(stderr, "cannot start redis-server\n");
    return 1;
  }
  RedisStore store(*ParseRedisUri(redis.uri()));

  std::printf("## KV store: %s shape (%d layers, %d KV heads x %d), private redis-server on loopback\n\n",
              absl::GetFlag(FLAGS_shape).c_str(), c.n_layers, c.n_kv_heads, c.head_dim);
  std::printf("| dtype | bytes per token |\n|---|---:|\n| float16 | %llu |\n| float32 | %llu |\n\n",
              (unsigned long long)KvBytesPerToken(c, KvDtype::kFloat16),
              (unsigned long long)KvBytesPerToken(c, KvDtype::kFloat32));

  // Encode speed: prefix + one context through EncodeContexts (compute + store).
  {
    std::fprintf(stderr, "encode speed...\n");
    auto model = RandomModel(c, 1);
    EncodeInput in;
    in.prefix_tokens = {1, 5, 6, 7};
    const int n = absl::GetFlag(FLAGS_encode_tokens);
    std::vector<int32_t> ctx(n);
    for (int i = 0; i < n; ++i) ctx[i] = 3 + (i * 31) % (c.vocab_size - 3);
    double best = 1e30;
    for (int r = 0; r < std::min(repeats, 2); ++r) {
      ctx[0] = 3 + r;  // a new key each time
      in.contexts = {ctx};
      double t0 = Now();
      auto out = EncodeContexts(*model, store, in);
      best = std::min(best, Now() - t0);
      if (!out.ok()) {
        std::fprintf(stderr, "%s\n", out.status().ToString().c_str());
        return 1;
      }
    }
    std::printf("encode (prefill + store, float16) of a %d-token context: %.1f tokens/s\n\n", n, n / best);
  }

  std::printf(
      "| block | dtype | bytes | RedisStore write | RedisStore read | parse+verify+load | plain SET | plain GET | "
      "write vs SET | read vs GET |\n");
  std::printf("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const auto& tok_str : absl::GetFlag(FLAGS_tokens)) {
    const int n = std::stoi(tok_str);
    for (KvDtype dtype : {KvDtype::kFloat16, KvDtype::kFloat32}) {
      std::fprintf(stderr, "block of %d tokens, %s...\n", n, KvDtypeName(dtype));
      // A block of random KV (layout and size are what matter here).
      KvBlockHeader h;
      h.n_layers = c.n_layers;
      h.n_kv_heads = c.n_kv_heads;
      h.head_dim = c.head_dim;
      h.dtype = dtype;
      h.num_tokens = n;
      h.first_position = 4;
      std::string block;
      {
        KvCache cache(c, n);
        std::mt19937 rng(1);
        std::normal_distribution<float> nd;
        for (size_t i = 0; i < std::min<size_t>(cache.k.size(), 1 << 20); ++i) cache.k[i] = cache.v[i] = nd(rng);
        std::vector<int32_t> toks(n, 7);
        block = SerializeKvBlock(h, toks, cache, 0);
      }
      const double gb = block.size() / 1e9;
      double wbest = 1e30, rbest = 1e30, pbest = 1e30;
      for (int r = 0; r < repeats; ++r) {
        double t0 = Now();
        auto s = store.Put("bench:block", block, 0);
        double t1 = Now();
        if (!s.ok()) {
          std::fprintf(stderr, "%s\n", s.ToString().c_str());
          return 1;
        }
        auto got = store.GetMany({"bench:block"});
        double t2 = Now();
        if (!got.ok() || !(*got)[0]) {
          std::fprintf(stderr, "read failed\n");
          return 1;
        }
        auto view = ParseKvBlock({reinterpret_cast<const uint8_t*>((*got)[0]->data()), (*got)[0]->size()});
        if (!view.ok()) {
          std::fprintf(stderr, "%s\n", view.status().ToString().c_str());
          return 1;
        }
        KvCache dst(c, n);
        if (!LoadKvBlock(*view, dst, 0).ok()) return 1;
        double t3 = Now();
        wbest = std::min(wbest, t1 - t0);
        rbest = std::min(rbest, t2 - t1);
        pbest = std::min(pbest, t3 - t2);
      }
      (void)store.Delete({"bench:block"});
      Baseline b = PlainSetGet(redis.port(), block, repeats);
      auto rate = [&](double s) {
        return s > 0 ? absl::StrFormat("%.2f GB/s", gb / s) : std::string("n/a (>512 MiB)");
      };
      auto ratio = [&](double ours, double base) {
        return base > 0 ? absl::StrFormat("%.2fx", base / ours) : std::string("-");
      };
      std::printf("| %d | %s | %.1f MiB | %.2f GB/s | %.2f GB/s | %.2f GB/s | %s | %s | %s | %s |\n", n,
                  KvDtypeName(dtype), block.size() / 1048576.0, gb / wbest, gb / rbest, gb / pbest,
                  rate(b.set_s).c_str(), rate(b.get_s).c_str(), ratio(wbest, b.set_s).c_str(),
                  ratio(rbest, b.get_s).c_str());
      std::fflush(stdout);
    }
  }
  std::printf("\n(ratios: baseline time / RedisStore time; 1.00x = as fast as a plain SET/GET of the same bytes)\n");
  return 0;
}

}  // namespace
}  // namespace ape::bench

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  ape::SetComputeThreads(0);
  return ape::bench::Main();
}
