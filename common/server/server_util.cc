#include "common/server/server_util.h"

#include <grpcpp/ext/channelz_service_plugin.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>

#include <cstdio>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/server/metrics.h"

ABSL_FLAG(std::string, metrics_listen, "",
          "serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 0.0.0.0:9090); empty = off");

namespace ape {

grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address, int max_message_bytes,
                                           const ChannelSecurity& security) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  args.SetLoadBalancingPolicyName("round_robin");  // over every address a dns:/// name resolves to
  if (!security.server_name.empty()) args.SetSslTargetNameOverride(security.server_name);
  return grpc::CreateCustomChannel(address, security.credentials, args);
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address, int max_message_bytes) {
  return MakeChannel(address, max_message_bytes, EncoderChannelSecurityFromFlags());
}

absl::StatusOr<int> MessageBytesFromMb(int mb, const std::string& flag) {
  constexpr int kMaxMb = 2047;  // 2047 << 20 still fits an int
  if (mb < 1 || mb > kMaxMb) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", mb, ": must be 1 to ", kMaxMb, " MiB"));
  }
  return mb << 20;
}

void LogRequest(const std::string& service, const std::string& method, const absl::Status& status,
                const std::string& details) {
  std::string line = absl::StrCat(absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()), " ",
                                  service, " ", method, " ", absl::StatusCodeToString(status.code()), " ", details);
  if (!status.ok()) absl::StrAppend(&line, " error=\"", status.message(), "\"");
  line += "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
  metrics::Registry::Global()
      .GetCounter("ape_requests_total", "gRPC requests answered, by server, method and status code",
                  {{"server", service}, {"method", method}, {"code", absl::StatusCodeToString(status.code())}})
      .Inc();
}

namespace {
// Self-pipe: the handler (which may run on any thread, including ones
// OpenBLAS started before main) writes the signal number; a thread reads it.
int g_signal_pipe[2] = {-1, -1};
void OnSignal(int sig) {
  const char c = static_cast<char>(sig);
  [[maybe_unused]] ssize_t n = write(g_signal_pipe[1], &c, 1);
}
}  // namespace

void InstallTerminationHandlers() {
  if (g_signal_pipe[0] >= 0) return;
  if (pipe(g_signal_pipe) != 0) return;
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

int RunServer(const ServerOptions& opts, const std::vector<grpc::Service*>& services, std::chrono::seconds grace) {
  if (absl::Status s = InitSecurityFromFlags(); !s.ok()) {
    std::fprintf(stderr, "%s: %s\n", opts.name.c_str(), s.ToString().c_str());
    return 1;
  }
  const ServerSecurity& security = ServerSecurityFromFlags();
  std::unique_ptr<metrics::HttpEndpoint> metrics_endpoint;
  if (const std::string listen = absl::GetFlag(FLAGS_metrics_listen); !listen.empty()) {
    absl::StatusOr<std::unique_ptr<metrics::HttpEndpoint>> started = metrics::HttpEndpoint::Start(listen);
    if (!started.ok()) {
      std::fprintf(stderr, "%s: %s\n", opts.name.c_str(), started.status().ToString().c_str());
      return 1;
    }
    metrics_endpoint = *std::move(started);
    std::fprintf(stderr, "%s: metrics on http://%s/metrics\n", opts.name.c_str(), listen.c_str());
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::channelz::experimental::InitChannelzService();  // grpc.channelz.v1.Channelz: live channel and call stats
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(opts.listen, security.credentials, &port);
  builder.SetMaxReceiveMessageSize(opts.max_message_bytes);
  builder.SetMaxSendMessageSize(opts.max_message_bytes);
  for (auto* s : services) builder.RegisterService(s);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "%s: cannot listen on %s\n", opts.name.c_str(), opts.listen.c_str());
    return 1;
  }
  server->GetHealthCheckService()->SetServingStatus(true);
  std::fprintf(stderr, "%s: listening on %s, %s\n", opts.name.c_str(), opts.listen.c_str(),
               security.description.c_str());
  if (!security.tls) {
    std::fprintf(stderr,
                 "%s: warning: gRPC traffic on %s is plaintext (no --tls_cert): anyone on the path can read and "
                 "send requests\n",
                 opts.name.c_str(), opts.listen.c_str());
  }
  InstallTerminationHandlers();
  std::thread waiter([&] {
    char c = 0;
    while (read(g_signal_pipe[0], &c, 1) < 0 && errno == EINTR) {}
    const int sig = c;
    std::fprintf(stderr, "%s: signal %d, shutting down\n", opts.name.c_str(), sig);
    server->GetHealthCheckService()->SetServingStatus(false);
    server->Shutdown(std::chrono::system_clock::now() + grace);
  });
  server->Wait();
  waiter.join();
  metrics_endpoint.reset();  // before the services (whose gauges it reads) go away
  std::fprintf(stderr, "%s: stopped\n", opts.name.c_str());
  return 0;
}

}  // namespace ape
