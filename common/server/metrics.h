// Prometheus metrics of both servers: a small thread-safe registry of
// counters, gauges (set, or computed at scrape time) and histograms with
// fixed buckets, rendered in the Prometheus text format (version 0.0.4),
// and an HTTP endpoint serving it (libmicrohttpd; --metrics_listen, see
// server_util.h). No external Prometheus library: Debian bookworm packages
// none for C++, and this is all the format needs.
//
// Series are created on first use and live for the process; the references
// the registry returns stay valid, so hot paths keep them (a function-local
// static) and pay one atomic add (counters) or one short lock (histograms).
#ifndef APESERVE_COMMON_SERVER_METRICS_H_
#define APESERVE_COMMON_SERVER_METRICS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace ape::metrics {

// Label name -> value, in the order given (rendered in that order).
using Labels = std::vector<std::pair<std::string, std::string>>;

class Counter {
 public:
  void Inc(double v = 1) { value_.fetch_add(v, std::memory_order_relaxed); }
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Add(double v) { value_.fetch_add(v, std::memory_order_relaxed); }
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

class Histogram {
 public:
  // Upper bounds, increasing; +Inf is implied.
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);
  struct Snapshot {
    std::vector<uint64_t> cumulative;  // per bound, then +Inf
    double sum = 0;
    uint64_t count = 0;
  };
  Snapshot Snap() const;
  const std::vector<double>& bounds() const { return bounds_; }

 private:
  const std::vector<double> bounds_;
  mutable std::mutex mu_;
  std::vector<uint64_t> counts_;  // per bucket (not cumulative), guarded by mu_
  double sum_ = 0;
  uint64_t count_ = 0;
};

// Buckets for latencies in seconds: 0.5 ms to 60 s.
std::vector<double> LatencyBuckets();

class Registry {
 public:
  // The process's registry (what /metrics serves).
  static Registry& Global();

  // The series of `name` with `labels`, created on first use. A name keeps
  // the type, help and (histograms) buckets of its first registration.
  Counter& GetCounter(const std::string& name, const std::string& help, const Labels& labels = {});
  Gauge& GetGauge(const std::string& name, const std::string& help, const Labels& labels = {});
  Histogram& GetHistogram(const std::string& name, const std::string& help, const std::vector<double>& bounds,
                          const Labels& labels = {});
  // A gauge whose value `fn` computes at each scrape (it must stay callable
  // until the metrics endpoint stops). Registering the same series again
  // replaces the function.
  void SetGaugeFunction(const std::string& name, const std::string& help, const Labels& labels,
                        std::function<double()> fn);

  // A counter whose total `fn` reads at each scrape from a source that
  // keeps it (it must never go down), e.g. an engine's step count.
  void SetCounterFunction(const std::string& name, const std::string& help, const Labels& labels,
                          std::function<double()> fn);

  // Everything, in the Prometheus text format, families sorted by name.
  std::string Render() const;

 private:
  struct Series {
    std::string labels;  // rendered: {a="x",b="y"} or ""
    std::unique_ptr<Counter> counter;
    std::unique_ptr<Gauge> gauge;
    std::unique_ptr<Histogram> histogram;
    std::function<double()> fn;
  };
  struct Family {
    std::string type, help;
    std::map<std::string, Series> series;  // by rendered labels
  };
  Series& Get(const std::string& name, const std::string& type, const std::string& help, const Labels& labels);

  mutable std::mutex mu_;
  std::map<std::string, Family> families_;  // guarded by mu_
};

// An HTTP server answering GET /metrics with Registry::Global() (and 404
// for anything else), on its own thread (libmicrohttpd), until destroyed.
class HttpEndpoint {
 public:
  // `listen` is host:port (an IPv4 or [IPv6] literal; empty host = all
  // interfaces). INVALID_ARGUMENT for a malformed address, UNAVAILABLE when
  // it cannot listen.
  static absl::StatusOr<std::unique_ptr<HttpEndpoint>> Start(const std::string& listen);
  ~HttpEndpoint();
  HttpEndpoint(const HttpEndpoint&) = delete;
  HttpEndpoint& operator=(const HttpEndpoint&) = delete;

 private:
  explicit HttpEndpoint(void* daemon) : daemon_(daemon) {}
  void* daemon_;  // struct MHD_Daemon*
};

}  // namespace ape::metrics

#endif  // APESERVE_COMMON_SERVER_METRICS_H_
