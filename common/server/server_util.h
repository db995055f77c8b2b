// What both gRPC services share: status conversion, admission control, the
// per-request log line, and running a server until SIGTERM/SIGINT.
// This is service plumbing; the engine (common/*.h) knows no gRPC.
#ifndef APESERVE_COMMON_SERVER_SERVER_UTIL_H_
#define APESERVE_COMMON_SERVER_SERVER_UTIL_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/engine/timing.h"
#include "common/server/admission.h"
#include "common/server/security.h"

namespace ape {

// absl::Status -> grpc::Status, same code and message (done once, at the edge).
grpc::Status ToGrpcStatus(const absl::Status& s);

// Writes one request line to stderr: "<time> <service> <method> <status> <details>",
// and counts it in the metric ape_requests_total{server, method, code}.
void LogRequest(const std::string& service, const std::string& method, const absl::Status& status,
                const std::string& details);

// Every field is set by main() from its flags.
struct ServerOptions {
  std::string listen;     // host:port
  int max_message_bytes;  // largest message received or sent (--max_message_mb)
  std::string name;       // for logs
};

// A client channel to another of our servers (the decoder's --encoder):
// messages up to `max_message_bytes` both ways, round-robin over every
// address a dns:/// name resolves to, and `security`'s credentials (TLS and
// the name checked in the server's certificate, or plaintext).
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address, int max_message_bytes,
                                           const ChannelSecurity& security);
// The same with the --encoder_tls_* flags (security.h). Precondition:
// InitSecurityFromFlags() returned OK (LoadModelAndStore checks it).
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address, int max_message_bytes);

// 1 to 2047 MiB (a gRPC message size is an int) in bytes; INVALID_ARGUMENT
// naming `flag` otherwise.
absl::StatusOr<int> MessageBytesFromMb(int mb, const std::string& flag);

// Builds a server with the services, reflection, channelz
// (grpc.channelz.v1.Channelz) and the standard health service (SERVING),
// serves Prometheus metrics (metrics.h) on --metrics_listen when set, and blocks until SIGTERM or SIGINT, then shuts
// down gracefully (in-flight calls get `grace`). Listens with TLS as the
// --tls_cert, --tls_key and --tls_client_ca flags say (security.h), else in
// plaintext with a warning; bad TLS files refuse to start. Returns a process
// exit code.
int RunServer(const ServerOptions& opts, const std::vector<grpc::Service*>& services,
              std::chrono::seconds grace = std::chrono::seconds(5));

// Routes SIGTERM/SIGINT to RunServer's graceful shutdown; call first in main().
void InstallTerminationHandlers();

}  // namespace ape

#endif  // APESERVE_COMMON_SERVER_SERVER_UTIL_H_
