// What apectl's remote commands share (remote_commands.cc): channels as the
// --tls*, --round-robin and --max-message-mb flags say, call deadlines
// (--timeout-s), and the error line of a failed call.
#ifndef APESERVE_CLIENTS_APECTL_REMOTE_UTIL_H_
#define APESERVE_CLIENTS_APECTL_REMOTE_UTIL_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

namespace ape::apectl {

// "host:port" as is; "h1:p1,h2:p2" as gRPC's static list "ipv4:h1:p1,h2:p2";
// a target with a scheme (dns:///, ipv4:, unix:) as is.
std::string ChannelTarget(const std::string& address);
// A channel to `address`, or null after printing why not ("apectl <command>: ...").
std::shared_ptr<grpc::Channel> Channel(const char* command, const std::string& address);
void SetDeadline(grpc::ClientContext& ctx);
// Prints "apectl <what>: <CODE>: <message>" to stderr; returns 1.
int Fail(const char* what, const grpc::Status& s);

}  // namespace ape::apectl

#endif  // APESERVE_CLIENTS_APECTL_REMOTE_UTIL_H_
