#include "common/server/security.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "common/engine/status_macros.h"

ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain this server presents; with --tls_key, gRPC is served over TLS only. "
          "Empty = plaintext (a warning is logged at start-up)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key (unencrypted) of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle: clients must present a certificate it verifies (mutual TLS); needs --tls_cert. "
          "Empty = no client certificate asked for");
ABSL_FLAG(bool, encoder_tls, false,
          "ape-decoder: speak TLS to --encoder, verifying it with the system roots unless --encoder_tls_ca "
          "(implied by any other --encoder_tls_* flag)");
ABSL_FLAG(std::string, encoder_tls_ca, "",
          "ape-decoder: PEM CA bundle that verifies --encoder's certificate (implies TLS to --encoder)");
ABSL_FLAG(std::string, encoder_tls_cert, "",
          "ape-decoder: PEM client certificate for --encoder's mutual TLS (with --encoder_tls_key; implies TLS)");
ABSL_FLAG(std::string, encoder_tls_key, "", "ape-decoder: PEM private key (unencrypted) of --encoder_tls_cert");
ABSL_FLAG(std::string, encoder_tls_server_name, "",
          "ape-decoder: name to verify in --encoder's certificate; empty = the host of --encoder");
ABSL_FLAG(std::string, redis_password_file, "",
          "file holding the Redis password (trailing newlines stripped). Precedence: this file, then "
          "$APESERVE_REDIS_PASSWORD, then a password in the --redis URI (which shows in ps; avoid it). "
          "$APESERVE_REDIS_USER, when set, is the ACL user");

namespace ape {
namespace {

constexpr size_t kMaxPemBytes = 1 << 20;        // a certificate bundle is kilobytes
constexpr size_t kMaxPasswordBytes = 64 << 10;  // Redis passwords are short

// The whole file `path` named by --`flag`; INVALID_ARGUMENT naming both.
absl::StatusOr<std::string> ReadFlagFile(absl::string_view flag, const std::string& path, size_t max_bytes) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": ", why));
  };
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return bad(absl::StrCat("cannot open: ", std::strerror(errno)));
  std::string out;
  char buf[8192];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0 && out.size() <= max_bytes) out.append(buf, n);
  const bool failed = std::ferror(f);
  const int err = errno;
  std::fclose(f);
  if (failed) return bad(absl::StrCat("cannot read: ", std::strerror(err)));
  if (out.size() > max_bytes) return bad(absl::StrCat("larger than ", max_bytes, " bytes"));
  if (out.empty()) return bad("file is empty");
  return out;
}

struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;

std::unique_ptr<BIO, BioFree> MemBio(const std::string& pem) {
  return std::unique_ptr<BIO, BioFree>(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// Never prompts for a passphrase on the terminal: an encrypted key fails.
int NoPassphrase(char*, int, int, void*) { return 0; }

// The first certificate of a PEM bundle (the leaf of a chain); an error if
// none parses or the leaf has expired.
absl::StatusOr<X509Ptr> LeafCertificate(absl::string_view flag, const std::string& path, const std::string& pem) {
  auto bio = MemBio(pem);
  X509Ptr cert(PEM_read_bio_X509(bio.get(), nullptr, NoPassphrase, nullptr));
  ERR_clear_error();
  if (!cert) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, "=", path, ": no PEM certificate (-----BEGIN CERTIFICATE-----) in the file"));
  }
  if (X509_cmp_current_time(X509_get0_notAfter(cert.get())) < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": the certificate has expired"));
  }
  return cert;
}

// A certificate and its key, read and checked as a pair.
struct KeyPair {
  std::string cert_pem, key_pem;
};
absl::StatusOr<KeyPair> ReadKeyPair(absl::string_view cert_flag, const std::string& cert_path,
                                    absl::string_view key_flag, const std::string& key_path) {
  if (cert_path.empty() != key_path.empty()) {
    return absl::InvalidArgumentError(cert_path.empty() ? absl::StrCat("--", key_flag, " needs --", cert_flag)
                                                        : absl::StrCat("--", cert_flag, " needs --", key_flag));
  }
  KeyPair out;
  ASSIGN_OR_RETURN(out.cert_pem, ReadFlagFile(cert_flag, cert_path, kMaxPemBytes));
  ASSIGN_OR_RETURN(out.key_pem, ReadFlagFile(key_flag, key_path, kMaxPemBytes));
  ASSIGN_OR_RETURN(X509Ptr cert, LeafCertificate(cert_flag, cert_path, out.cert_pem));
  auto bio = MemBio(out.key_pem);
  PkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, NoPassphrase, nullptr));
  ERR_clear_error();
  if (!key) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", key_flag, "=", key_path, ": no unencrypted PEM private key (-----BEGIN PRIVATE KEY-----)"));
  }
  const bool match = X509_check_private_key(cert.get(), key.get()) == 1;
  ERR_clear_error();
  if (!match) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", key_flag, "=", key_path, " is not the key of the certificate in --", cert_flag, "=", cert_path));
  }
  return out;
}

// A CA bundle: at least one certificate.
absl::StatusOr<std::string> ReadCaBundle(absl::string_view flag, const std::string& path) {
  ASSIGN_OR_RETURN(std::string pem, ReadFlagFile(flag, path, kMaxPemBytes));
  RETURN_IF_ERROR(LeafCertificate(flag, path, pem).status());
  return pem;
}

std::optional<std::string> NonEmptyEnv(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

}  // namespace

absl::StatusOr<ServerSecurity> MakeServerSecurity(const ServerTlsFiles& files, absl::string_view flag_prefix) {
  const std::string cert_flag = absl::StrCat(flag_prefix, "cert"), key_flag = absl::StrCat(flag_prefix, "key"),
                    ca_flag = absl::StrCat(flag_prefix, "client_ca");
  ServerSecurity out;
  if (files.cert.empty() && files.key.empty()) {
    if (!files.client_ca.empty())
      return absl::InvalidArgumentError(absl::StrCat("--", ca_flag, " needs --", cert_flag));
    out.credentials = grpc::InsecureServerCredentials();
    out.description = "plaintext";
    return out;
  }
  ASSIGN_OR_RETURN(KeyPair pair, ReadKeyPair(cert_flag, files.cert, key_flag, files.key));
  grpc::SslServerCredentialsOptions opts(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  out.description = absl::StrCat("TLS (certificate ", files.cert, ")");
  if (!files.client_ca.empty()) {
    ASSIGN_OR_RETURN(opts.pem_root_certs, ReadCaBundle(ca_flag, files.client_ca));
    opts.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
    out.description = absl::StrCat("mutual TLS (certificate ", files.cert, ", client certificates verified by ",
                                   files.client_ca, ")");
  }
  opts.pem_key_cert_pairs.push_back({pair.key_pem, pair.cert_pem});
  out.credentials = grpc::SslServerCredentials(opts);
  out.tls = true;
  return out;
}

absl::StatusOr<ChannelSecurity> MakeChannelSecurity(const ChannelTlsFiles& files, absl::string_view flag_prefix) {
  const std::string cert_flag = absl::StrCat(flag_prefix, "cert"), key_flag = absl::StrCat(flag_prefix, "key"),
                    ca_flag = absl::StrCat(flag_prefix, "ca");
  ChannelSecurity out;
  const bool tls = files.tls || !files.ca.empty() || !files.cert.empty() || !files.key.empty();
  if (!tls) {
    if (!files.server_name.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag_prefix, "server_name needs TLS (--", ca_flag, ")"));
    }
    out.credentials = grpc::InsecureChannelCredentials();
    out.description = "plaintext";
    return out;
  }
  grpc::SslCredentialsOptions opts;  // empty pem_root_certs = the system roots
  out.description = "TLS (server verified by the system roots";
  if (!files.ca.empty()) {
    ASSIGN_OR_RETURN(opts.pem_root_certs, ReadCaBundle(ca_flag, files.ca));
    out.description = absl::StrCat("TLS (server verified by ", files.ca);
  }
  if (!files.cert.empty() || !files.key.empty()) {
    ASSIGN_OR_RETURN(KeyPair pair, ReadKeyPair(cert_flag, files.cert, key_flag, files.key));
    opts.pem_cert_chain = std::move(pair.cert_pem);
    opts.pem_private_key = std::move(pair.key_pem);
    absl::StrAppend(&out.description, ", client certificate ", files.cert);
  }
  if (!files.server_name.empty()) absl::StrAppend(&out.description, ", as ", files.server_name);
  out.description += ")";
  out.credentials = grpc::SslCredentials(opts);
  out.tls = true;
  out.server_name = files.server_name;
  return out;
}

absl::StatusOr<std::string> ApplyRedisSecrets(const RedisSecretSources& sources, RedisConfig* config) {
  if (sources.env_user) config->user = *sources.env_user;
  if (!sources.password_file.empty()) {
    ASSIGN_OR_RETURN(std::string password,
                     ReadFlagFile("redis_password_file", sources.password_file, kMaxPasswordBytes));
    while (!password.empty() && (password.back() == '\n' || password.back() == '\r')) password.pop_back();
    if (password.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--redis_password_file=", sources.password_file, ": holds only a newline, no password"));
    }
    config->password = std::move(password);
    return std::string("--redis_password_file");
  }
  if (sources.env_password) {
    config->password = *sources.env_password;
    return std::string("$APESERVE_REDIS_PASSWORD");
  }
  return config->password.empty() ? std::string() : std::string("the --redis URI");
}

std::string RedactRedisUri(absl::string_view uri) {
  const size_t scheme_end = uri.find("://");
  const size_t at = uri.rfind('@');
  if (at == absl::string_view::npos) return std::string(uri);
  const size_t userinfo = scheme_end == absl::string_view::npos || scheme_end > at ? 0 : scheme_end + 3;
  return absl::StrCat(uri.substr(0, userinfo), "***", uri.substr(at));
}

namespace {

struct FlagSecurity {
  ServerSecurity server;
  ChannelSecurity encoder_channel;
};

absl::StatusOr<FlagSecurity> BuildFromFlags() {
  FlagSecurity out;
  ASSIGN_OR_RETURN(out.server, MakeServerSecurity({.cert = absl::GetFlag(FLAGS_tls_cert),
                                                   .key = absl::GetFlag(FLAGS_tls_key),
                                                   .client_ca = absl::GetFlag(FLAGS_tls_client_ca)}));
  ASSIGN_OR_RETURN(out.encoder_channel,
                   MakeChannelSecurity({.tls = absl::GetFlag(FLAGS_encoder_tls),
                                        .ca = absl::GetFlag(FLAGS_encoder_tls_ca),
                                        .cert = absl::GetFlag(FLAGS_encoder_tls_cert),
                                        .key = absl::GetFlag(FLAGS_encoder_tls_key),
                                        .server_name = absl::GetFlag(FLAGS_encoder_tls_server_name)}));
  return out;
}

// Built once, on first use (after flag parsing); immutable afterwards.
const absl::StatusOr<FlagSecurity>& FlagSecurityOnce() {
  static const auto* security = new absl::StatusOr<FlagSecurity>(BuildFromFlags());
  return *security;
}

const FlagSecurity& CheckedFlagSecurity() {
  const auto& s = FlagSecurityOnce();
  if (!s.ok()) {
    // Only a caller that skipped InitSecurityFromFlags() gets here; serving
    // without the TLS the operator asked for is never an option.
    std::fprintf(stderr, "apeserve: %s\n", s.status().ToString().c_str());
    std::exit(1);
  }
  return *s;
}

}  // namespace

absl::Status InitSecurityFromFlags() { return FlagSecurityOnce().status(); }

const ServerSecurity& ServerSecurityFromFlags() { return CheckedFlagSecurity().server; }

const ChannelSecurity& EncoderChannelSecurityFromFlags() { return CheckedFlagSecurity().encoder_channel; }

RedisSecretSources RedisSecretSourcesFromFlags() {
  return {.password_file = absl::GetFlag(FLAGS_redis_password_file),
          .env_password = NonEmptyEnv("APESERVE_REDIS_PASSWORD"),
          .env_user = NonEmptyEnv("APESERVE_REDIS_USER")};
}

}  // namespace ape
