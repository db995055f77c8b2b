// Transport security and secrets both servers share:
//   - gRPC TLS on the listening port (--tls_cert, --tls_key; --tls_client_ca
//     for mutual TLS), used by RunServer;
//   - TLS on the decoder's channel to --encoder (--encoder_tls,
//     --encoder_tls_ca, --encoder_tls_cert, --encoder_tls_key,
//     --encoder_tls_server_name), used by MakeChannel;
//   - the Redis password from a file or the environment instead of the
//     command line, where `ps` and pod specs show it.
// The flags live in security.cc, so every binary linking ape_server has them
// and main() needs no code for them. Files are read and checked once, at
// start-up (InitSecurityFromFlags, which LoadModelAndStore calls first): a
// missing, unreadable, malformed, expired or mismatched file stops the server
// with a message naming the flag and the fault. Certificates are not
// reloaded: a renewed certificate takes a restart.
#ifndef APESERVE_COMMON_SERVER_SECURITY_H_
#define APESERVE_COMMON_SERVER_SECURITY_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/store/redis_store.h"

namespace ape {

// A server's TLS files (PEM). All empty = plaintext.
struct ServerTlsFiles {
  std::string cert;       // certificate chain the server presents (--tls_cert)
  std::string key;        // its private key, unencrypted (--tls_key)
  std::string client_ca;  // non-empty: clients must present a certificate this CA bundle verifies
};

// A client channel's TLS settings (the decoder's channel to --encoder).
struct ChannelTlsFiles {
  bool tls = false;         // TLS even without `ca` (then the system roots verify the server)
  std::string ca;           // CA bundle that verifies the server; implies TLS
  std::string cert, key;    // client certificate and key for mutual TLS; imply TLS
  std::string server_name;  // name checked in the server's certificate; empty = the address's host
};

// Credentials built from checked files, and a one-line description for logs
// (paths only, never key material).
struct ServerSecurity {
  std::shared_ptr<grpc::ServerCredentials> credentials;
  bool tls = false;
  std::string description;  // "plaintext", "TLS", "mutual TLS (client CA <path>)"
};
struct ChannelSecurity {
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  bool tls = false;
  std::string server_name;  // SSL target name override; empty = none
  std::string description;
};

// Reads and checks the files: every certificate parses, the key parses, is
// not encrypted and matches the certificate, the certificate has not
// expired, a CA bundle holds at least one certificate; a key without its
// certificate (or the reverse) is an error. INVALID_ARGUMENT naming the
// flag (`flag_prefix` + "cert", ...) and the file otherwise.
absl::StatusOr<ServerSecurity> MakeServerSecurity(const ServerTlsFiles& files, absl::string_view flag_prefix = "tls_");
absl::StatusOr<ChannelSecurity> MakeChannelSecurity(const ChannelTlsFiles& files,
                                                    absl::string_view flag_prefix = "encoder_tls_");

// Where the Redis password may come from, besides the --redis URI.
struct RedisSecretSources {
  std::string password_file;                // --redis_password_file; empty = none
  std::optional<std::string> env_password;  // $APESERVE_REDIS_PASSWORD (unset or empty = none)
  std::optional<std::string> env_user;      // $APESERVE_REDIS_USER (unset or empty = none)
};

// Sets config->password by precedence: the password file (trailing newlines
// stripped; an empty or unreadable file is INVALID_ARGUMENT), else
// $APESERVE_REDIS_PASSWORD, else what the URI said. $APESERVE_REDIS_USER,
// when set, replaces the URI's user. Returns where the password came from,
// for logs: "--redis_password_file", "$APESERVE_REDIS_PASSWORD", "the --redis
// URI" or "" (no password).
absl::StatusOr<std::string> ApplyRedisSecrets(const RedisSecretSources& sources, RedisConfig* config);

// `uri` with any user:password@ replaced by "***@", for messages and logs.
std::string RedactRedisUri(absl::string_view uri);

// ---- From flags (and the environment) ---------------------------------------

// Reads the --tls_* and --encoder_tls_* flags, checks the files and keeps the
// credentials for the life of the process. Call after flag parsing;
// LoadModelAndStore calls it before loading the model. Later calls return
// the first result.
absl::Status InitSecurityFromFlags();

// The kept credentials. Precondition: InitSecurityFromFlags() returned OK.
const ServerSecurity& ServerSecurityFromFlags();
const ChannelSecurity& EncoderChannelSecurityFromFlags();

// --redis_password_file, $APESERVE_REDIS_PASSWORD and $APESERVE_REDIS_USER.
RedisSecretSources RedisSecretSourcesFromFlags();

}  // namespace ape

#endif  // APESERVE_COMMON_SERVER_SECURITY_H_
