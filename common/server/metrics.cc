#include "common/server/metrics.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace ape::metrics {
namespace {

std::string EscapeLabel(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::string RenderLabels(const Labels& labels, const std::string& extra = "") {
  std::string out;
  for (const auto& [k, v] : labels) absl::StrAppend(&out, out.empty() ? "" : ",", k, "=\"", EscapeLabel(v), "\"");
  if (!extra.empty()) absl::StrAppend(&out, out.empty() ? "" : ",", extra);
  return out.empty() ? "" : absl::StrCat("{", out, "}");
}

// Adds `extra` (k="v") inside rendered labels.
std::string WithLabel(const std::string& rendered, const std::string& extra) {
  if (rendered.empty()) return absl::StrCat("{", extra, "}");
  return absl::StrCat(rendered.substr(0, rendered.size() - 1), ",", extra, "}");
}

std::string Number(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  if (v == std::floor(v) && std::fabs(v) < 1e15) return absl::StrCat(static_cast<int64_t>(v));
  // The shortest of 15 or 17 significant digits that reads back as v.
  std::string s = absl::StrFormat("%.15g", v);
  double back = 0;
  if (absl::SimpleAtod(s, &back) && back == v) return s;
  return absl::StrFormat("%.17g", v);
}

}  // namespace

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double v) {
  const size_t i = std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();  // le: v <= bound
  std::lock_guard<std::mutex> lock(mu_);
  ++counts_[i];
  sum_ += v;
  ++count_;
}

Histogram::Snapshot Histogram::Snap() const {
  Snapshot s;
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t running = 0;
  for (uint64_t c : counts_) s.cumulative.push_back(running += c);
  s.sum = sum_;
  s.count = count_;
  return s;
}

std::vector<double> LatencyBuckets() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

Registry& Registry::Global() {
  static Registry* r = new Registry();  // never destroyed: threads may still count at exit
  return *r;
}

Registry::Series& Registry::Get(const std::string& name, const std::string& type, const std::string& help,
                                const Labels& labels) {
  // Caller holds mu_.
  Family& f = families_[name];
  if (f.type.empty()) {
    f.type = type;
    f.help = help;
  }
  const std::string rendered = RenderLabels(labels);
  Series& s = f.series[rendered];
  s.labels = rendered;
  return s;
}

Counter& Registry::GetCounter(const std::string& name, const std::string& help, const Labels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  Series& s = Get(name, "counter", help, labels);
  if (!s.counter) s.counter = std::make_unique<Counter>();
  return *s.counter;
}

Gauge& Registry::GetGauge(const std::string& name, const std::string& help, const Labels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  Series& s = Get(name, "gauge", help, labels);
  if (!s.gauge) s.gauge = std::make_unique<Gauge>();
  return *s.gauge;
}

Histogram& Registry::GetHistogram(const std::string& name, const std::string& help, const std::vector<double>& bounds,
                                  const Labels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  Series& s = Get(name, "histogram", help, labels);
  if (!s.histogram) {
    // One family, one set of buckets: later series take the first's.
    const Family& f = families_[name];
    const std::vector<double>* first = &bounds;
    for (const auto& [unused, other] : f.series)
      if (other.histogram) first = &other.histogram->bounds();
    s.histogram = std::make_unique<Histogram>(*first);
  }
  return *s.histogram;
}

void Registry::SetGaugeFunction(const std::string& name, const std::string& help, const Labels& labels,
                                std::function<double()> fn) {
  std::lock_guard<std::mutex> lock(mu_);
  Get(name, "gauge", help, labels).fn = std::move(fn);
}

void Registry::SetCounterFunction(const std::string& name, const std::string& help, const Labels& labels,
                                  std::function<double()> fn) {
  std::lock_guard<std::mutex> lock(mu_);
  Get(name, "counter", help, labels).fn = std::move(fn);
}

std::string Registry::Render() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  for (const auto& [name, f] : families_) {
    absl::StrAppend(&out, "# HELP ", name, " ", f.help, "\n# TYPE ", name, " ", f.type, "\n");
    for (const auto& [unused, s] : f.series) {
      if (s.counter) absl::StrAppend(&out, name, s.labels, " ", Number(s.counter->Value()), "\n");
      if (s.gauge) absl::StrAppend(&out, name, s.labels, " ", Number(s.gauge->Value()), "\n");
      if (s.fn) absl::StrAppend(&out, name, s.labels, " ", Number(s.fn()), "\n");
      if (s.histogram) {
        const Histogram::Snapshot snap = s.histogram->Snap();
        const std::vector<double>& b = s.histogram->bounds();
        for (size_t i = 0; i <= b.size(); ++i) {
          const std::string le = absl::StrCat("le=\"", i < b.size() ? Number(b[i]) : "+Inf", "\"");
          absl::StrAppend(&out, name, "_bucket", WithLabel(s.labels, le), " ", snap.cumulative[i], "\n");
        }
        absl::StrAppend(&out, name, "_sum", s.labels, " ", Number(snap.sum), "\n");
        absl::StrAppend(&out, name, "_count", s.labels, " ", snap.count, "\n");
      }
    }
  }
  return out;
}

// ---- HTTP ---------------------------------------------------------------------

namespace {

MHD_Result Answer(void*, MHD_Connection* connection, const char* url, const char* method, const char*, const char*,
                  size_t*, void**) {
  const bool get = std::strcmp(method, "GET") == 0 || std::strcmp(method, "HEAD") == 0;
  const bool metrics = std::strcmp(url, "/metrics") == 0;
  const std::string body = get && metrics ? Registry::Global().Render() : "not found: GET /metrics\n";
  MHD_Response* response =
      MHD_create_response_from_buffer(body.size(), const_cast<char*>(body.data()), MHD_RESPMEM_MUST_COPY);
  if (response == nullptr) return MHD_NO;
  MHD_add_response_header(response, "Content-Type",
                          get && metrics ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain");
  const MHD_Result r = MHD_queue_response(connection, get && metrics ? MHD_HTTP_OK : MHD_HTTP_NOT_FOUND, response);
  MHD_destroy_response(response);
  return r;
}

}  // namespace

absl::StatusOr<std::unique_ptr<HttpEndpoint>> HttpEndpoint::Start(const std::string& listen) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics_listen=", listen, ": ", why));
  };
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) return bad("expected host:port");
  std::string host = listen.substr(0, colon);
  int port = 0;
  if (!absl::SimpleAtoi(listen.substr(colon + 1), &port) || port < 0 || port > 65535) return bad("bad port");
  sockaddr_in v4{};
  sockaddr_in6 v6{};
  const sockaddr* addr = nullptr;
  unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
    v6.sin6_family = AF_INET6;
    v6.sin6_port = htons(static_cast<uint16_t>(port));
    if (inet_pton(AF_INET6, host.c_str(), &v6.sin6_addr) != 1) return bad("not an IPv6 address");
    addr = reinterpret_cast<const sockaddr*>(&v6);
    flags |= MHD_USE_IPv6;
  } else {
    v4.sin_family = AF_INET;
    v4.sin_port = htons(static_cast<uint16_t>(port));
    if (host.empty()) {
      v4.sin_addr.s_addr = htonl(INADDR_ANY);
    } else if (inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host.c_str(), &v4.sin_addr) != 1) {
      return bad("not an IPv4 address (use a numeric address, or [IPv6])");
    }
    addr = reinterpret_cast<const sockaddr*>(&v4);
  }
  MHD_Daemon* d = MHD_start_daemon(flags, static_cast<uint16_t>(port), nullptr, nullptr, &Answer, nullptr,
                                   MHD_OPTION_SOCK_ADDR, addr, MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
  if (d == nullptr) return absl::UnavailableError(absl::StrCat("--metrics_listen=", listen, ": cannot listen"));
  return std::unique_ptr<HttpEndpoint>(new HttpEndpoint(d));
}

HttpEndpoint::~HttpEndpoint() { MHD_stop_daemon(static_cast<MHD_Daemon*>(daemon_)); }

}  // namespace ape::metrics
