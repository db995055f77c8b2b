// bench_load: a load generator for ape.v1.Decoder. N client streams, each a
// thread with its own channel, send Generate requests back to back for a
// bounded time (--seconds) or number of requests (--requests), over a seeded
// mix of document sets, modes and max_tokens. Measured per request on the
// client: time to first token (send -> first token message), inter-token
// latencies (between consecutive token messages), tokens, the gRPC code.
// Prints the aggregate as a markdown table to stdout, one JSON record to
// --json_out, a progress line to stderr.
//
// One command runs the whole sweep (servers, streams 1, 2, 4, 8, plot):
//   /usr/bin/python3 bench/run_load.py     (writes bench/results/load.{json,md,png})
// By hand, against running servers (deploy/local/start.sh):
//   build/bin/bench_load --decoder=127.0.0.1:50062 --encoder=127.0.0.1:50061
//       --streams=4 --seconds=30 --json_out=/tmp/load4.json
//
// Definitions (also in bench/results/load.md):
// - tokens_per_second: generated tokens received inside the steady window
//   divided by its length. The window opens when every stream has sent its
//   first measured request and closes at --seconds or when the first stream
//   runs out of requests (--requests): while it is open all N streams are
//   busy, so the rate is the server's at N concurrent requests, not diluted by
//   the ramp-down tail. At --seconds the requests still running are cancelled
//   ("cut"): their tokens and latencies so far count, they are no error.
// - TTFT: from the call to the first TokenDelta with id >= 0, over requests
//   that got one. ITL: gaps between consecutive TokenDeltas with id >= 0, over
//   all requests (a request's gaps all count: p99 sees the stalls).
// - errors: requests that ended with a status other than OK (or OK without a
//   Final message), by code; cut requests are not errors.
//
// Channels: one per stream (distinct connections, GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL),
// as N independent users would be; one shared HTTP/2 connection would
// multiplex the streams over one socket and one server-side transport, which
// is not what separate clients look like. --shared_channel tests that case.
#include <unistd.h>
#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "ape/v1/decoder.grpc.pb.h"
#include "ape/v1/encoder.grpc.pb.h"
#include "grpcpp/grpcpp.h"

ABSL_FLAG(std::string, decoder, "127.0.0.1:50062",
          "ape-decoder address host:port; a comma list h1:p1,h2:p2 is balanced round-robin");
ABSL_FLAG(std::string, encoder, "",
          "ape-encoder address; needed for --context_by=key or mix (documents are encoded once, before the run)");
ABSL_FLAG(int, streams, 1, "concurrent client streams (threads), each sending one request at a time");
ABSL_FLAG(double, seconds, 30, "length of the measured run, s (0 = until --requests are done)");
ABSL_FLAG(int, requests, 0, "measured requests in all, shared by the streams (0 = until --seconds)");
ABSL_FLAG(bool, warmup, true, "each stream first sends one short request (4 tokens) that is not measured");
ABSL_FLAG(std::string, documents, "",
          "documents: a folder (each regular file one document) or a file (each non-empty line one document); "
          "empty: --num_documents generated ones");
ABSL_FLAG(int, num_documents, 16, "generated documents (without --documents)");
ABSL_FLAG(int, document_words, 200, "words per generated document");
ABSL_FLAG(std::string, contexts, "1,2,4", "documents per request, a comma list drawn from uniformly");
ABSL_FLAG(std::string, modes, "ape", "modes drawn from uniformly: comma list of ape, parallel, sequential");
ABSL_FLAG(std::string, max_tokens, "64", "max_tokens per request, a comma list drawn from uniformly");
ABSL_FLAG(std::string, context_by, "key",
          "how requests name documents: key (pre-encoded with --encoder), text (encoded on the fly on a miss), "
          "mix (each context either way)");
ABSL_FLAG(std::string, prefix, "You are a helpful assistant. Answer from the documents.\n",
          "shared prefix text (a model without BOS, e.g. Qwen, needs one)");
ABSL_FLAG(float, temperature, 0, "sampling temperature (0 = greedy)");
ABSL_FLAG(uint64_t, seed, 1, "seed of the generated documents and of the request mix");
ABSL_FLAG(double, request_timeout_s, 300, "deadline of one request, s");
ABSL_FLAG(double, connect_timeout_s, 10, "wait this long for the servers to accept connections, s");
ABSL_FLAG(bool, shared_channel, false, "all streams on one channel (one connection) instead of one each");
ABSL_FLAG(std::string, json_out, "", "write the JSON record here (also printed to stdout)");
ABSL_FLAG(bool, markdown_header, true, "print the markdown table's header before its row");

namespace ape::bench {
namespace {

namespace v1 = ::ape::v1;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// ---------------------------------------------------------------------------
// Flags parsed into the request mix.

struct Mix {
  std::vector<int> contexts;  // documents per request, drawn from uniformly
  std::vector<v1::Mode> modes;
  std::vector<int> max_tokens;
  enum class By { kKey, kText, kMix } by = By::kKey;
};

absl::StatusOr<std::vector<int>> ParseInts(const std::string& flag, const std::string& text, int lo, int hi) {
  std::vector<int> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int v = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &v) || v < lo || v > hi) {
      return absl::InvalidArgumentError(
          absl::StrFormat("--%s: '%s' is not an integer in [%d, %d]", flag, std::string(part), lo, hi));
    }
    out.push_back(v);
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, " is empty"));
  return out;
}

absl::StatusOr<Mix> ParseMix() {
  Mix mix;
  auto contexts = ParseInts("contexts", absl::GetFlag(FLAGS_contexts), 0, 256);
  if (!contexts.ok()) return contexts.status();
  mix.contexts = *contexts;
  auto max_tokens = ParseInts("max_tokens", absl::GetFlag(FLAGS_max_tokens), 1, 1 << 20);
  if (!max_tokens.ok()) return max_tokens.status();
  mix.max_tokens = *max_tokens;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_modes), ',', absl::SkipWhitespace())) {
    const std::string name = absl::StrCat("MODE_", absl::AsciiStrToUpper(absl::StripAsciiWhitespace(part)));
    v1::Mode mode;
    if (!v1::Mode_Parse(name, &mode) || mode == v1::MODE_UNSPECIFIED) {
      return absl::InvalidArgumentError(absl::StrCat("--modes: '", part, "' is not one of ape, parallel, sequential"));
    }
    mix.modes.push_back(mode);
  }
  if (mix.modes.empty()) return absl::InvalidArgumentError("--modes is empty");
  const std::string by = absl::GetFlag(FLAGS_context_by);
  if (by == "key") {
    mix.by = Mix::By::kKey;
  } else if (by == "text") {
    mix.by = Mix::By::kText;
  } else if (by == "mix") {
    mix.by = Mix::By::kMix;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--context_by: '", by, "' is not key, text or mix"));
  }
  return mix;
}

// ---------------------------------------------------------------------------
// Documents: read from --documents or generated from a seeded word list, so
// that they tokenize like prose (about 1.3 tokens per word with a BPE vocab).

constexpr const char* kWords[] = {
    "the",     "river",   "valley",     "north",    "city",     "council", "built",  "bridge",   "stone",    "market",
    "summer",  "winter",  "harbour",    "ships",    "grain",    "wool",    "trade",  "road",     "century",  "after",
    "before",  "during",  "mayor",      "school",   "library",  "opened",  "closed", "people",   "village",  "farm",
    "railway", "station", "line",       "engine",   "factory",  "workers", "strike", "wages",    "rose",     "fell",
    "report",  "found",   "water",      "supply",   "tower",    "clock",   "church", "square",   "festival", "music",
    "painter", "museum",  "collection", "letters",  "archive",  "record",  "flood",  "storm",    "repair",   "canal",
    "lock",    "mill",    "copper",     "iron",     "coal",     "mine",    "shaft",  "hill",     "forest",   "oak",
    "birch",   "deer",    "fox",        "owl",      "garden",   "apple",   "pear",   "cider",    "bakery",   "bread",
    "census",  "counted", "houses",     "families", "children", "teacher", "doctor", "hospital", "ward",     "beds",
    "and",     "of",      "in",         "was",      "were",     "with",    "from",   "by",       "its",      "their",
};

std::vector<std::string> GenerateDocuments(int n, int words, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> pick(0, std::size(kWords) - 1);
  std::uniform_int_distribution<int> sentence_len(6, 14);
  std::vector<std::string> docs;
  for (int d = 0; d < n; ++d) {
    std::string text = absl::StrFormat("Record %d of the town archive.", d + 1);
    for (int w = 0, left = 0; w < words; ++w) {
      if (left == 0) {  // a new sentence, capitalised
        left = sentence_len(rng);
        std::string word = kWords[pick(rng)];
        word[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(word[0])));
        absl::StrAppend(&text, " ", word);
      } else {
        absl::StrAppend(&text, " ", kWords[pick(rng)]);
      }
      if (--left == 0 || w + 1 == words) text += ".";
    }
    docs.push_back(text + "\n");
  }
  return docs;
}

absl::StatusOr<std::vector<std::string>> ReadDocuments(const std::string& path) {
  std::vector<std::string> files, docs;
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    for (auto& e : std::filesystem::directory_iterator(path, ec))
      if (e.is_regular_file()) files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
      std::ifstream in(f, std::ios::binary);
      std::ostringstream ss;
      ss << in.rdbuf();
      if (!in.bad() && !ss.str().empty()) docs.push_back(ss.str());
    }
  } else {
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("--documents: cannot read ", path));
    for (std::string line; std::getline(in, line);)
      if (!absl::StripAsciiWhitespace(line).empty()) docs.push_back(line + "\n");
  }
  if (docs.empty()) return absl::InvalidArgumentError(absl::StrCat("--documents: no documents in ", path));
  return docs;
}

// ---------------------------------------------------------------------------
// Channels and the one-time setup: model info, documents encoded to keys.

// "host:port" as is; "h1:p1,h2:p2" as gRPC's static list "ipv4:h1:p1,h2:p2"
// with round-robin (as apectl does).
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address, bool own_connection) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  std::string target = address;
  if (address.find(',') != std::string::npos && address.find(":/") == std::string::npos) {
    target = "ipv4:" + address;
    args.SetLoadBalancingPolicyName("round_robin");
  }
  // Without this, channels with equal arguments share subchannels (one TCP
  // connection); with it, each channel connects on its own.
  if (own_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

absl::Status WaitConnected(grpc::Channel& channel, const std::string& what) {
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(absl::GetFlag(FLAGS_connect_timeout_s) * 1e3));
  if (!channel.WaitForConnected(deadline)) {
    return absl::UnavailableError(absl::StrCat(what, ": no connection within --connect_timeout_s"));
  }
  return absl::OkStatus();
}

absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), absl::StrCat(what, ": ", s.error_message()));
}

// Encodes every document after --prefix (batches of 32, within the
// encoder's default --max_contexts 64) and returns their cache keys.
absl::StatusOr<std::vector<std::string>> EncodeDocuments(const std::string& address,
                                                         const std::vector<std::string>& docs, double* mean_tokens) {
  auto channel = MakeChannel(address, false);
  if (auto s = WaitConnected(*channel, "encoder " + address); !s.ok()) return s;
  auto stub = v1::Encoder::NewStub(channel);
  std::vector<std::string> keys;
  uint64_t tokens = 0;
  for (size_t begin = 0; begin < docs.size(); begin += 32) {
    v1::EncodeRequest req;
    req.mutable_prefix()->set_text(absl::GetFlag(FLAGS_prefix));
    for (size_t i = begin; i < std::min(docs.size(), begin + 32); ++i) req.add_contexts()->set_text(docs[i]);
    v1::EncodeResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(10));
    if (auto s = stub->Encode(&ctx, req, &resp); !s.ok()) return FromGrpc(s, "Encoder.Encode");
    for (const auto& e : resp.contexts()) {
      keys.push_back(e.key());
      tokens += e.num_tokens();
    }
  }
  *mean_tokens = double(tokens) / std::max<size_t>(1, keys.size());
  std::fprintf(stderr, "bench_load: %zu documents encoded (%.0f tokens each on average)\n", keys.size(), *mean_tokens);
  return keys;
}

// ---------------------------------------------------------------------------
// The request mix: request i is a pure function of (--seed, i), so the same
// flags send the same requests whatever the thread interleaving.

constexpr const char* kQuestions[] = {
    "What do the records say about the bridge?", "Summarise the documents in two sentences.",
    "Which trades are mentioned, and when?",     "What happened after the flood?",
    "List the buildings that were opened.",      "Who worked at the mill and the mine?",
};

struct Shared {
  std::vector<std::string> docs, keys;  // keys[i] is docs[i]'s cache key (key or mix)
  double document_tokens = 0;           // mean tokens per document (known once encoded)
  Mix mix;
};

v1::GenerateRequest MakeRequest(const Shared& sh, uint64_t index, bool warmup) {
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed) * 0x9E3779B97F4A7C15ull + index);
  auto pick = [&rng](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng); };
  v1::GenerateRequest req;
  req.set_prefix(absl::GetFlag(FLAGS_prefix));
  const int n_contexts = std::min<int>(sh.mix.contexts[pick(sh.mix.contexts.size())], sh.docs.size());
  // Distinct documents: a partial Fisher-Yates shuffle of the indices.
  std::vector<int> order(sh.docs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
  for (int i = 0; i < n_contexts; ++i) std::swap(order[i], order[i + pick(order.size() - i)]);
  for (int i = 0; i < n_contexts; ++i) {
    const int d = order[i];
    const bool by_key = sh.mix.by == Mix::By::kKey || (sh.mix.by == Mix::By::kMix && pick(2) == 0);
    if (by_key) {
      req.add_contexts()->set_key(sh.keys[d]);
    } else {
      req.add_contexts()->set_text(sh.docs[d]);
    }
  }
  req.set_query(kQuestions[pick(std::size(kQuestions))]);
  req.set_mode(sh.mix.modes[pick(sh.mix.modes.size())]);
  req.set_max_tokens(warmup ? 4 : sh.mix.max_tokens[pick(sh.mix.max_tokens.size())]);
  req.mutable_sampling()->set_temperature(absl::GetFlag(FLAGS_temperature));
  req.mutable_sampling()->set_seed(index);
  return req;
}

// ---------------------------------------------------------------------------
// One request, measured.

struct Sample {
  grpc::StatusCode code = grpc::StatusCode::OK;
  bool ok = false;                                      // OK status and a Final message
  bool cut = false;                                     // cancelled by us at the end of --seconds
  bool sent = false;                                    // false: the run stopped before it was sent (not counted)
  double ttft_ms = -1;                                  // -1: no token arrived
  std::vector<float> token_times_s;                     // arrival of each token, s since the run's start
  std::string error;                                    // first error message of its kind, for the log
  double server_queue_ms = -1, server_prefill_ms = -1;  // Final.timings (-1: no Final)
};

// The run's shared clock and stop signal, and each stream's current call
// (so that the main thread can cancel it at the deadline).
struct RunState {
  Clock::time_point t0;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> next_request{0};
  uint64_t max_requests = 0;     // 0 = unbounded
  std::atomic<int> warmed{0};    // streams done with their warm-up
  std::atomic<bool> go{false};   // set (after t0) once all are warm
  std::atomic<int> started{0};   // streams that sent their first measured request
  std::atomic<int> finished{0};  // streams out of work
  std::atomic<int64_t> window_open_us{-1}, first_done_us{-1};
  // Progress counters.
  std::atomic<uint64_t> tokens{0}, done{0}, errors{0};
  struct Slot {
    std::mutex mu;
    grpc::ClientContext* ctx = nullptr;
  };
  std::vector<std::unique_ptr<Slot>> slots;
};

Sample RunOne(v1::Decoder::Stub& stub, const v1::GenerateRequest& req, RunState& run, RunState::Slot* slot) {
  Sample s;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(absl::GetFlag(FLAGS_request_timeout_s) * 1e3)));
  if (slot != nullptr) {
    std::lock_guard<std::mutex> lock(slot->mu);
    if (run.stop.load()) {  // the deadline passed while we were building the request
      s.cut = true;
      return s;
    }
    slot->ctx = &ctx;
  }
  s.sent = true;
  const auto start = Clock::now();
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse resp;
  bool got_final = false;
  while (reader->Read(&resp)) {
    if (resp.has_token() && resp.token().id() >= 0) {
      const auto now = Clock::now();
      if (s.ttft_ms < 0) s.ttft_ms = std::chrono::duration<double, std::milli>(now - start).count();
      s.token_times_s.push_back(static_cast<float>(Seconds(run.t0, now)));
      run.tokens.fetch_add(1, std::memory_order_relaxed);
    } else if (resp.has_final()) {
      got_final = true;
      s.server_queue_ms = resp.final().timings().queue_ms();
      s.server_prefill_ms = resp.final().timings().prefill_ms();
    }
  }
  const grpc::Status status = reader->Finish();
  if (slot != nullptr) {
    std::lock_guard<std::mutex> lock(slot->mu);
    slot->ctx = nullptr;
  }
  s.code = status.error_code();
  if (status.ok() && got_final) {
    s.ok = true;
  } else if (status.error_code() == grpc::StatusCode::CANCELLED && run.stop.load()) {
    s.cut = true;
  } else if (status.ok()) {
    s.code = grpc::StatusCode::INTERNAL;
    s.error = "stream ended OK without a Final message";
  } else {
    s.error = status.error_message();
  }
  return s;
}

int64_t MicrosSince(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count();
}

// A stream: one warm-up request, then (once every stream is warm and the
// main thread has set t0) measured requests back to back until the run stops
// or the shared request budget is spent.
void StreamLoop(int stream, std::shared_ptr<grpc::Channel> channel, const Shared& sh, RunState& run,
                std::vector<Sample>* out) {
  auto stub = v1::Decoder::NewStub(channel);
  if (absl::GetFlag(FLAGS_warmup)) {
    Sample w = RunOne(*stub, MakeRequest(sh, ~uint64_t{0} - stream, true), run, nullptr);
    if (!w.ok) std::fprintf(stderr, "bench_load: warm-up of stream %d: %s\n", stream, w.error.c_str());
  }
  run.warmed.fetch_add(1);
  while (!run.go.load(std::memory_order_acquire)) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  bool first = true;
  while (!run.stop.load()) {
    const uint64_t i = run.next_request.fetch_add(1);
    if (run.max_requests != 0 && i >= run.max_requests) break;
    if (first) {
      first = false;
      if (run.started.fetch_add(1) + 1 == static_cast<int>(run.slots.size())) run.window_open_us = MicrosSince(run.t0);
    }
    Sample s = RunOne(*stub, MakeRequest(sh, i, false), run, run.slots[stream].get());
    if (!s.sent) break;
    run.done.fetch_add(1, std::memory_order_relaxed);
    if (!s.ok && !s.cut) run.errors.fetch_add(1, std::memory_order_relaxed);
    out->push_back(std::move(s));
  }
  // The first stream out of work closes the steady window.
  int64_t expected = -1;
  run.first_done_us.compare_exchange_strong(expected, MicrosSince(run.t0));
  run.finished.fetch_add(1);
}

// ---------------------------------------------------------------------------
// Aggregation and output.

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double rank = p / 100 * (v.size() - 1);  // linear between closest ranks
  const size_t lo = static_cast<size_t>(rank);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (rank - lo);
}

std::string CodeName(grpc::StatusCode code) {
  static const char* kNames[] = {
      "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
      "DATA_LOSS", "UNAUTHENTICATED"};
  const int c = static_cast<int>(code);
  return c >= 0 && c < static_cast<int>(std::size(kNames)) ? kNames[c] : absl::StrCat("CODE_", c);
}

struct Report {
  int streams = 0;
  uint64_t requests = 0, ok = 0, cut = 0, errors = 0, tokens = 0, window_tokens = 0;
  double window_s = 0, wall_s = 0, tokens_per_second = 0, overall_tokens_per_second = 0;
  double ttft_p50 = 0, ttft_p99 = 0, itl_p50 = 0, itl_p99 = 0, itl_mean = 0, stream_tps_p50 = 0;
  double queue_p50 = 0, queue_p99 = 0, prefill_p50 = 0, prefill_p99 = 0;  // server-side, from Final
  std::map<std::string, uint64_t> errors_by_code;
  std::map<std::string, std::string> error_examples;
};

Report Aggregate(const std::vector<std::vector<Sample>>& per_stream, double window_open, double window_close,
                 double wall_s) {
  Report r;
  r.streams = static_cast<int>(per_stream.size());
  std::vector<double> ttft, itl, stream_tps, queue, prefill;
  double itl_sum = 0;
  for (const auto& samples : per_stream) {
    for (const Sample& s : samples) {
      ++r.requests;
      r.ok += s.ok;
      r.cut += s.cut;
      if (!s.ok && !s.cut) {
        ++r.errors;
        ++r.errors_by_code[CodeName(s.code)];
        r.error_examples.emplace(CodeName(s.code), s.error);
      }
      if (s.ttft_ms >= 0) ttft.push_back(s.ttft_ms);
      if (s.server_queue_ms >= 0) queue.push_back(s.server_queue_ms);
      if (s.server_prefill_ms >= 0) prefill.push_back(s.server_prefill_ms);
      for (size_t k = 0; k < s.token_times_s.size(); ++k) {
        const double t = s.token_times_s[k];
        if (t >= window_open && t <= window_close) ++r.window_tokens;
        if (k > 0) {
          itl.push_back(1e3 * (t - s.token_times_s[k - 1]));
          itl_sum += itl.back();
        }
      }
      r.tokens += s.token_times_s.size();
      // A request's own decode rate (tokens after the first over their span).
      if (s.token_times_s.size() > 1)
        stream_tps.push_back((s.token_times_s.size() - 1) / (s.token_times_s.back() - s.token_times_s.front()));
    }
  }
  r.window_s = window_close - window_open;
  r.wall_s = wall_s;
  r.tokens_per_second = r.window_s > 0 ? r.window_tokens / r.window_s : 0;
  r.overall_tokens_per_second = wall_s > 0 ? r.tokens / wall_s : 0;
  r.ttft_p50 = Percentile(ttft, 50);
  r.ttft_p99 = Percentile(ttft, 99);
  r.itl_p50 = Percentile(itl, 50);
  r.itl_p99 = Percentile(itl, 99);
  r.itl_mean = itl.empty() ? 0 : itl_sum / itl.size();
  r.stream_tps_p50 = Percentile(stream_tps, 50);
  r.queue_p50 = Percentile(queue, 50);
  r.queue_p99 = Percentile(queue, 99);
  r.prefill_p50 = Percentile(prefill, 50);
  r.prefill_p99 = Percentile(prefill, 99);
  return r;
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      out += absl::StrFormat("\\u%04x", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string ToJson(const Report& r, const Shared& sh, const v1::ModelInfoResponse& model) {
  std::vector<std::string> codes;
  for (const auto& [code, n] : r.errors_by_code) codes.push_back(absl::StrCat(JsonString(code), ": ", n));
  return absl::StrFormat(
      "{\"streams\": %d, \"tokens_per_second\": %.3f, \"ttft_p50_ms\": %.2f, \"ttft_p99_ms\": %.2f, "
      "\"itl_p50_ms\": %.2f, \"itl_p99_ms\": %.2f, \"errors\": %d, "
      "\"errors_by_code\": {%s}, \"requests\": %d, \"ok\": %d, \"cut\": %d, \"tokens\": %d, "
      "\"window_tokens\": %d, \"window_s\": %.3f, \"wall_s\": %.3f, \"overall_tokens_per_second\": %.3f, "
      "\"itl_mean_ms\": %.2f, \"request_tokens_per_second_p50\": %.3f, "
      "\"server_queue_ms_p50\": %.2f, \"server_queue_ms_p99\": %.2f, \"server_prefill_ms_p50\": %.2f, "
      "\"server_prefill_ms_p99\": %.2f, \"documents\": %d, \"document_tokens_mean\": %.1f, "
      "\"modes\": %s, \"contexts\": %s, \"max_tokens\": %s, \"context_by\": %s, \"seed\": %d, "
      "\"model\": %s, \"model_path\": %s}",
      r.streams, r.tokens_per_second, r.ttft_p50, r.ttft_p99, r.itl_p50, r.itl_p99, r.errors,
      absl::StrJoin(codes, ", "), r.requests, r.ok, r.cut, r.tokens, r.window_tokens, r.window_s, r.wall_s,
      r.overall_tokens_per_second, r.itl_mean, r.stream_tps_p50, r.queue_p50, r.queue_p99, r.prefill_p50, r.prefill_p99,
      sh.docs.size(), sh.document_tokens, JsonString(absl::GetFlag(FLAGS_modes)),
      JsonString(absl::GetFlag(FLAGS_contexts)), JsonString(absl::GetFlag(FLAGS_max_tokens)),
      JsonString(absl::GetFlag(FLAGS_context_by)), absl::GetFlag(FLAGS_seed),
      JsonString(absl::StrFormat("%s dim %d layers %d", model.architecture(), model.dim(), model.n_layers())),
      JsonString(model.model_path()));
}

void PrintMarkdown(const Report& r) {
  if (absl::GetFlag(FLAGS_markdown_header)) {
    std::printf(
        "| streams | requests (ok/cut/err) | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
        "errors |\n|---:|---:|---:|---:|---:|---:|---:|---|\n");
  }
  std::vector<std::string> codes;
  for (const auto& [code, n] : r.errors_by_code) codes.push_back(absl::StrCat(code, " ", n));
  absl::PrintF("| %d | %d (%d/%d/%d) | %.2f | %.1f | %.1f | %.1f | %.1f | %s |\n", r.streams, r.requests, r.ok, r.cut,
               r.errors, r.tokens_per_second, r.ttft_p50, r.ttft_p99, r.itl_p50, r.itl_p99,
               codes.empty() ? "0" : absl::StrJoin(codes, ", "));
}

// ---------------------------------------------------------------------------

absl::Status Main() {
  const int n_streams = absl::GetFlag(FLAGS_streams);
  const double seconds = absl::GetFlag(FLAGS_seconds);
  const int requests = absl::GetFlag(FLAGS_requests);
  if (n_streams < 1 || n_streams > 4096) return absl::InvalidArgumentError("--streams must be in [1, 4096]");
  if (seconds < 0 || requests < 0 || (seconds == 0 && requests == 0))
    return absl::InvalidArgumentError("bound the run: --seconds > 0 or --requests > 0");
  Shared sh;
  auto mix = ParseMix();
  if (!mix.ok()) return mix.status();
  sh.mix = *mix;
  if (const std::string path = absl::GetFlag(FLAGS_documents); !path.empty()) {
    auto docs = ReadDocuments(path);
    if (!docs.ok()) return docs.status();
    sh.docs = *std::move(docs);
  } else {
    if (absl::GetFlag(FLAGS_num_documents) < 1 || absl::GetFlag(FLAGS_document_words) < 1)
      return absl::InvalidArgumentError("--num_documents and --document_words must be at least 1");
    sh.docs = GenerateDocuments(absl::GetFlag(FLAGS_num_documents), absl::GetFlag(FLAGS_document_words),
                                absl::GetFlag(FLAGS_seed));
  }

  // The decoder: reachable, and its model (for the record).
  const std::string address = absl::GetFlag(FLAGS_decoder);
  auto probe = MakeChannel(address, false);
  if (auto s = WaitConnected(*probe, "decoder " + address); !s.ok()) return s;
  v1::ModelInfoResponse model;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    if (auto s = v1::Decoder::NewStub(probe)->ModelInfo(&ctx, v1::ModelInfoRequest(), &model); !s.ok())
      return FromGrpc(s, "Decoder.ModelInfo");
  }
  if (sh.mix.by != Mix::By::kText) {
    if (absl::GetFlag(FLAGS_encoder).empty())
      return absl::InvalidArgumentError("--context_by=key or mix needs --encoder (or use --context_by=text)");
    auto keys = EncodeDocuments(absl::GetFlag(FLAGS_encoder), sh.docs, &sh.document_tokens);
    if (!keys.ok()) return keys.status();
    sh.keys = *std::move(keys);
  }
  std::fprintf(stderr, "bench_load: %d streams, %s, model %s (dim %u, %u layers), %zu documents\n", n_streams,
               seconds > 0 ? absl::StrFormat("%.0f s", seconds).c_str() : absl::StrCat(requests, " requests").c_str(),
               model.model_path().c_str(), model.dim(), model.n_layers(), sh.docs.size());

  // Streams: each its own channel unless --shared_channel.
  RunState run;
  run.max_requests = requests;
  for (int i = 0; i < n_streams; ++i) run.slots.push_back(std::make_unique<RunState::Slot>());
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int i = 0; i < n_streams; ++i)
    channels.push_back(absl::GetFlag(FLAGS_shared_channel) && i > 0 ? channels[0] : MakeChannel(address, true));
  std::vector<std::vector<Sample>> samples(n_streams);
  std::vector<std::thread> threads;
  for (int i = 0; i < n_streams; ++i)
    threads.emplace_back(StreamLoop, i, channels[i], std::cref(sh), std::ref(run), &samples[i]);

  // Warm-ups first; then t0, and all streams start together.
  if (absl::GetFlag(FLAGS_warmup)) std::fprintf(stderr, "bench_load: warming up\n");
  while (run.warmed.load() < n_streams) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  run.t0 = Clock::now();
  run.go.store(true, std::memory_order_release);
  const bool tty = isatty(STDERR_FILENO);
  double last_print = -1;
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const double t = Seconds(run.t0, Clock::now());
    const bool all_done = run.finished.load() == n_streams;
    if (seconds > 0 && t >= seconds && !run.stop.load()) {
      run.stop = true;  // no new requests; cancel the running ones
      for (auto& slot : run.slots) {
        std::lock_guard<std::mutex> lock(slot->mu);
        if (slot->ctx != nullptr) slot->ctx->TryCancel();
      }
    }
    if (t - last_print >= (tty ? 0.5 : 5.0) || run.stop.load() || all_done) {
      last_print = t;
      std::fprintf(stderr, "%s[%6.1f s] streams %d  requests %llu  errors %llu  tokens %llu  %.1f tok/s%s",
                   tty ? "\r" : "", t, n_streams, static_cast<unsigned long long>(run.done.load()),
                   static_cast<unsigned long long>(run.errors.load()),
                   static_cast<unsigned long long>(run.tokens.load()), t > 0 ? run.tokens.load() / t : 0.0,
                   tty ? "   " : "\n");
    }
    if (run.stop.load() || all_done) break;
  }
  for (auto& th : threads) th.join();
  const double wall_s = Seconds(run.t0, Clock::now());
  if (tty) std::fprintf(stderr, "\n");

  // The steady window: all streams busy (see the top of the file).
  const double open = std::max<double>(0, run.window_open_us.load() / 1e6);
  double close = run.first_done_us.load() >= 0 ? run.first_done_us.load() / 1e6 : wall_s;
  if (seconds > 0) close = std::min(close, seconds);
  Report r = Aggregate(samples, open, close, wall_s);
  for (const auto& [code, message] : r.error_examples)
    std::fprintf(stderr, "bench_load: %s, e.g.: %s\n", code.c_str(), message.c_str());
  PrintMarkdown(r);
  const std::string json = ToJson(r, sh, model);
  std::printf("%s\n", json.c_str());
  if (const std::string path = absl::GetFlag(FLAGS_json_out); !path.empty()) {
    std::ofstream out(path);
    out << json << "\n";
    if (!out) return absl::InternalError(absl::StrCat("--json_out: cannot write ", path));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace ape::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "load generator for ape.v1.Decoder: N concurrent Generate streams; tokens/s, TTFT and inter-token "
      "latency p50/p99, errors by gRPC code (see the top of bench/bench_load.cc)");
  absl::ParseCommandLine(argc, argv);
  if (absl::Status s = ape::bench::Main(); !s.ok()) {
    std::fprintf(stderr, "bench_load: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
