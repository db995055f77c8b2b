// apectl encode / generate / model-info / health: the client side of the
// services, in plaintext or TLS (--tls, --tls_ca, --tls_cert, --tls_key).
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <iterator>
#include <mutex>
#include <optional>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "ape/v1/decoder.grpc.pb.h"
#include "ape/v1/encoder.grpc.pb.h"
#include "clients/apectl/commands.h"
#include "clients/apectl/remote_util.h"

ABSL_FLAG(std::string, encoder, "127.0.0.1:50051",
          "ape-encoder address: host:port, a comma-separated list of them, or dns:///name:port");
ABSL_FLAG(std::string, decoder, "127.0.0.1:50052",
          "ape-decoder address: host:port, a comma-separated list of them, or dns:///name:port");
ABSL_FLAG(bool, round_robin, false,
          "remote commands: balance calls over every address of the target (always on for an address list; with "
          "dns:///name:port, over every address the name resolves to, e.g. a Kubernetes headless Service)");
ABSL_FLAG(std::string, prefix, "",
          "shared prefix text (the server adds BOS when the model asks for it; with --chat: the system text)");
ABSL_FLAG(bool, chat, false,
          "encode, generate: wrap the prefix (system text), documents and query in the model's chat template "
          "(llama3, chatml or mistral-inst; see `apectl model-info`); encode and generate must agree");
ABSL_FLAG(bool, print_prompt_ids, false,
          "generate: print the prompt's token ids as the model read them (BOS, chat markers, documents, query) to "
          "stderr, comma-separated after \"prompt_ids=\"");
ABSL_FLAG(std::string, dtype, "float16", "KV dtype: float16, float32 or int8");
ABSL_FLAG(int, batch, 1,
          "encode: documents per Encode request (1: each document's result as soon as it is done; more: fewer "
          "round trips, at most the encoder's --max_contexts)");
ABSL_FLAG(std::vector<std::string>, context_key, {}, "comma-separated cache keys of contexts");
ABSL_FLAG(std::vector<std::string>, context_file, {}, "comma-separated files (or folders) used as contexts by content");
ABSL_FLAG(std::string, query, "", "the question");
ABSL_FLAG(std::string, mode, "ape", "ape, parallel or sequential");
ABSL_FLAG(float, ape_t, 0.f, "APE temperature T; 0 = the server's preset");
ABSL_FLAG(float, ape_s, 0.f, "APE scaling factor S; 0 = the server's preset");
ABSL_FLAG(int, timeout_s, 600, "deadline of each call, seconds");
ABSL_FLAG(int, max_message_mb, 64, "largest gRPC message sent or received, MiB (as the servers' --max_message_mb)");
ABSL_FLAG(bool, tls, false,
          "remote commands: TLS, verifying the server with the system roots unless --tls-ca "
          "(implied by --tls-ca, --tls-cert, --tls-key)");
ABSL_FLAG(std::string, tls_ca, "",
          "remote commands: PEM CA bundle that verifies the server's certificate (implies TLS)");
ABSL_FLAG(std::string, tls_cert, "",
          "remote commands: PEM client certificate for a server with --tls_client_ca (mutual TLS; with --tls-key)");
ABSL_FLAG(std::string, tls_key, "", "remote commands: PEM private key of --tls-cert");
ABSL_FLAG(std::string, tls_server_name, "",
          "remote commands: name to verify in the server's certificate; empty = the address's host");

ABSL_DECLARE_FLAG(int, max_tokens);
ABSL_DECLARE_FLAG(float, temperature);
ABSL_DECLARE_FLAG(int, top_k);
ABSL_DECLARE_FLAG(float, top_p);
ABSL_DECLARE_FLAG(float, min_p);
ABSL_DECLARE_FLAG(float, repetition_penalty);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(std::vector<std::string>, stop);
ABSL_DECLARE_FLAG(bool, print_ids);

namespace ape::apectl {
namespace {

// The whole file named by --`flag`, or an error naming both.
absl::StatusOr<std::string> ReadFlagFile(const char* flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": cannot open"));
  std::string pem((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": cannot read"));
  if (pem.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": file is empty"));
  return pem;
}

// Plaintext, or TLS as the --tls* flags say.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> Credentials() {
  const std::string ca = absl::GetFlag(FLAGS_tls_ca), cert = absl::GetFlag(FLAGS_tls_cert),
                    key = absl::GetFlag(FLAGS_tls_key);
  if (!absl::GetFlag(FLAGS_tls) && ca.empty() && cert.empty() && key.empty()) {
    if (!absl::GetFlag(FLAGS_tls_server_name).empty())
      return absl::InvalidArgumentError("--tls-server-name needs TLS (--tls or --tls-ca)");
    return grpc::InsecureChannelCredentials();
  }
  if (cert.empty() != key.empty()) return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  grpc::SslCredentialsOptions opts;  // empty pem_root_certs = the system roots
  if (!ca.empty()) {
    auto pem = ReadFlagFile("tls-ca", ca);
    if (!pem.ok()) return pem.status();
    opts.pem_root_certs = *pem;
  }
  if (!cert.empty()) {
    auto cert_pem = ReadFlagFile("tls-cert", cert);
    if (!cert_pem.ok()) return cert_pem.status();
    auto key_pem = ReadFlagFile("tls-key", key);
    if (!key_pem.ok()) return key_pem.status();
    opts.pem_cert_chain = *cert_pem;
    opts.pem_private_key = *key_pem;
  }
  return grpc::SslCredentials(opts);
}

}  // namespace

// "host:port" as is; "h1:p1,h2:p2" as gRPC's static list "ipv4:h1:p1,h2:p2"
// ("ipv6:" when bracketed); a target with a scheme (dns:///, ipv4:, unix:)
// as is.
std::string ChannelTarget(const std::string& address) {
  if (address.find(',') == std::string::npos || address.find(":/") != std::string::npos) return address;
  for (const char* scheme : {"ipv4:", "ipv6:", "unix:", "dns:"})
    if (address.rfind(scheme, 0) == 0) return address;
  return (address.rfind('[', 0) == 0 ? "ipv6:" : "ipv4:") + address;
}

// A channel to `address` (ChannelTarget), round-robin over its addresses
// for a list or with --round-robin, or null after printing why not.
std::shared_ptr<grpc::Channel> Channel(const char* command, const std::string& address) {
  auto creds = Credentials();
  if (!creds.ok()) {
    std::fprintf(stderr, "apectl %s: %s\n", command, std::string(creds.status().message()).c_str());
    return nullptr;
  }
  // Clamped to what a gRPC size (an int) holds, as the servers' flag is.
  const int max_message_bytes = std::clamp(absl::GetFlag(FLAGS_max_message_mb), 1, 2047) << 20;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  if (const std::string name = absl::GetFlag(FLAGS_tls_server_name); !name.empty()) args.SetSslTargetNameOverride(name);
  const std::string target = ChannelTarget(address);
  if (absl::GetFlag(FLAGS_round_robin) || target != address) args.SetLoadBalancingPolicyName("round_robin");
  return grpc::CreateCustomChannel(target, *creds, args);
}

void SetDeadline(grpc::ClientContext& ctx) {
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(absl::GetFlag(FLAGS_timeout_s)));
}

namespace {

// Files named on the command line; folders expand to their regular files, sorted.
std::vector<std::string> ExpandFiles(const std::vector<std::string>& args) {
  std::vector<std::string> files;
  for (const auto& a : args) {
    if (std::filesystem::is_directory(a)) {
      std::vector<std::string> in_dir;
      for (auto& e : std::filesystem::directory_iterator(a))
        if (e.is_regular_file()) in_dir.push_back(e.path());
      std::sort(in_dir.begin(), in_dir.end());
      files.insert(files.end(), in_dir.begin(), in_dir.end());
    } else {
      files.push_back(a);
    }
  }
  return files;
}

bool ReadText(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  while (!out->empty() && (out->back() == '\n' || out->back() == '\r')) out->pop_back();  // trailing newline
  return true;
}

// --dtype float16|float32|int8 as the API's enum (KV_DTYPE_FLOAT16 | ...):
// the names come from the proto, so there is no table to keep in step.
bool ParseDtype(const char* command, v1::KvDtype* dtype) {
  const std::string name = absl::GetFlag(FLAGS_dtype);
  if (name == absl::AsciiStrToLower(name) &&
      v1::KvDtype_Parse(absl::StrCat("KV_DTYPE_", absl::AsciiStrToUpper(name)), dtype) &&
      *dtype != v1::KV_DTYPE_UNSPECIFIED) {
    return true;
  }
  std::fprintf(stderr, "apectl %s: --dtype must be float16, float32 or int8, not '%s'\n", command, name.c_str());
  return false;
}

}  // namespace

int Fail(const char* what, const grpc::Status& s) {
  std::fprintf(stderr, "apectl %s: %s: %s\n", what,
               absl::StatusCodeToString(static_cast<absl::StatusCode>(s.error_code())).c_str(),
               s.error_message().c_str());
  return 1;
}

namespace {

// Encode progress on stderr: a bar redrawn in place on a terminal, else one
// plain line per document (its key, its request's time, cached or new).
class EncodeProgress {
 public:
  explicit EncodeProgress(size_t total) : total_(total), tty_(isatty(fileno(stderr))) {}
  void Document(const v1::CacheEntry& c, const std::string& file, double request_ms) {
    ++done_;
    if (!tty_) {
      std::fprintf(stderr, "encoded %zu/%zu %s %.1f ms %s %s\n", done_, total_, c.key().c_str(), request_ms,
                   c.already_cached() ? "cached" : "new", file.c_str());
      return;
    }
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(kWidth * done_ / std::max<size_t>(total_, 1));
    std::fprintf(stderr, "\r\033[Kencoding [%s%s] %zu/%zu  %.1f s  %s", std::string(filled, '#').c_str(),
                 std::string(kWidth - filled, '-').c_str(), done_, total_, Seconds(), file.c_str());
    if (done_ == total_) std::fprintf(stderr, "\n");
  }
  void Abort() {
    if (tty_ && done_ < total_) std::fprintf(stderr, "\n");
  }
  double Seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

 private:
  const size_t total_;
  const bool tty_;
  size_t done_ = 0;
  const std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

}  // namespace

int EncodeCommand(const std::vector<std::string>& args) {
  std::vector<std::string> files = ExpandFiles(args);
  if (files.empty()) {
    std::fprintf(stderr, "apectl encode: name files or folders of documents\n");
    return 2;
  }
  v1::KvDtype dtype;
  if (!ParseDtype("encode", &dtype)) return 2;
  const int batch = absl::GetFlag(FLAGS_batch);
  if (batch < 1) {
    std::fprintf(stderr, "apectl encode: --batch must be at least 1\n");
    return 2;
  }
  std::vector<std::string> texts(files.size());
  for (size_t i = 0; i < files.size(); ++i) {
    if (!ReadText(files[i], &texts[i])) {
      std::fprintf(stderr, "apectl encode: cannot read %s\n", files[i].c_str());
      return 1;
    }
  }
  auto channel = Channel("encode", absl::GetFlag(FLAGS_encoder));
  if (!channel) return 2;
  auto stub = v1::Encoder::NewStub(channel);
  // --batch documents per request (default 1: a result, and a line, as each
  // document is done); every request within the server's contract
  // (--max_contexts, --max_request_text_bytes) as one of that size would be.
  EncodeProgress progress(files.size());
  v1::EncodeResponse last;
  v1::EncodeTimings sum;
  int cached = 0;
  for (size_t first = 0; first < files.size(); first += batch) {
    const size_t end = std::min(files.size(), first + batch);
    v1::EncodeRequest req;
    req.mutable_prefix()->set_text(absl::GetFlag(FLAGS_prefix));
    req.set_chat(absl::GetFlag(FLAGS_chat));
    req.set_dtype(dtype);
    for (size_t i = first; i < end; ++i) req.add_contexts()->set_text(texts[i]);
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    v1::EncodeResponse resp;
    grpc::Status s = stub->Encode(&ctx, req, &resp);
    if (!s.ok()) {
      progress.Abort();
      std::fprintf(stderr, "apectl encode: %s%s: %zu of %zu documents encoded before\n", files[first].c_str(),
                   end - first > 1 ? absl::StrCat(" (and ", end - first - 1, " more)").c_str() : "", first,
                   files.size());
      return Fail("encode", s);
    }
    // stdout: "<key>\t<tokens>\t<bytes>\t<cached|new>\t<file>", one per context, as each is done.
    for (int i = 0; i < resp.contexts_size(); ++i) {
      const auto& c = resp.contexts(i);
      std::printf("%s\t%u\t%llu\t%s\t%s\n", c.key().c_str(), c.num_tokens(),
                  static_cast<unsigned long long>(c.stored_bytes()), c.already_cached() ? "cached" : "new",
                  files[first + i].c_str());
      std::fflush(stdout);
      progress.Document(c, files[first + i], resp.timings().total_ms());
      cached += c.already_cached();
    }
    const auto& t = resp.timings();
    sum.set_tokenize_ms(sum.tokenize_ms() + t.tokenize_ms());
    sum.set_lookup_ms(sum.lookup_ms() + t.lookup_ms());
    sum.set_prefill_ms(sum.prefill_ms() + t.prefill_ms());
    sum.set_store_ms(sum.store_ms() + t.store_ms());
    sum.set_total_ms(sum.total_ms() + t.total_ms());
    last = std::move(resp);
  }
  std::fprintf(stderr,
               "%zu documents (%zu new, %d cached) in %.2f s; prefix %s (%u tokens); model %s; tokenize %.1f ms, "
               "lookup %.1f ms, prefill %.1f ms, store %.1f ms, total %.1f ms\n",
               files.size(), files.size() - cached, cached, progress.Seconds(), last.prefix().key().c_str(),
               last.prefix().num_tokens(), last.model_fingerprint().c_str(), sum.tokenize_ms(), sum.lookup_ms(),
               sum.prefill_ms(), sum.store_ms(), sum.total_ms());
  return 0;
}

int GenerateCommand(const std::vector<std::string>&) {
  v1::KvDtype dtype;
  if (!ParseDtype("generate", &dtype)) return 2;
  v1::GenerateRequest req;
  req.set_prefix(absl::GetFlag(FLAGS_prefix));
  for (const auto& k : absl::GetFlag(FLAGS_context_key)) req.add_contexts()->set_key(k);
  for (const auto& f : ExpandFiles(absl::GetFlag(FLAGS_context_file))) {
    std::string text;
    if (!ReadText(f, &text)) {
      std::fprintf(stderr, "apectl generate: cannot read %s\n", f.c_str());
      return 1;
    }
    req.add_contexts()->set_text(text);
  }
  req.set_query(absl::GetFlag(FLAGS_query));
  req.set_chat(absl::GetFlag(FLAGS_chat));
  req.set_return_prompt_ids(absl::GetFlag(FLAGS_print_prompt_ids));
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode == "ape")
    req.set_mode(v1::MODE_APE);
  else if (mode == "parallel")
    req.set_mode(v1::MODE_PARALLEL);
  else if (mode == "sequential")
    req.set_mode(v1::MODE_SEQUENTIAL);
  else {
    std::fprintf(stderr, "apectl generate: --mode must be ape, parallel or sequential\n");
    return 2;
  }
  if (absl::GetFlag(FLAGS_ape_t) > 0) req.set_ape_temperature(absl::GetFlag(FLAGS_ape_t));
  if (absl::GetFlag(FLAGS_ape_s) > 0) req.set_ape_scale(absl::GetFlag(FLAGS_ape_s));
  req.set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  for (const auto& s : absl::GetFlag(FLAGS_stop)) req.add_stop(s);
  req.set_dtype(dtype);
  auto* sp = req.mutable_sampling();
  sp->set_temperature(absl::GetFlag(FLAGS_temperature));
  sp->set_top_k(absl::GetFlag(FLAGS_top_k));
  sp->set_top_p(absl::GetFlag(FLAGS_top_p));
  sp->set_min_p(absl::GetFlag(FLAGS_min_p));
  sp->set_repetition_penalty(absl::GetFlag(FLAGS_repetition_penalty));
  sp->set_seed(absl::GetFlag(FLAGS_seed));

  auto channel = Channel("generate", absl::GetFlag(FLAGS_decoder));
  if (!channel) return 2;
  auto stub = v1::Decoder::NewStub(channel);
  grpc::ClientContext ctx;
  SetDeadline(ctx);
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse msg;
  v1::Final fin;
  bool has_final = false;
  const bool print_ids = absl::GetFlag(FLAGS_print_ids);
  int printed = 0;
  while (reader->Read(&msg)) {
    if (msg.has_token()) {
      if (!print_ids) {
        std::fwrite(msg.token().text().data(), 1, msg.token().text().size(), stdout);
      } else if (msg.token().id() >= 0) {  // -1: a final flush of held-back text
        std::printf(printed++ ? ",%d" : "%d", msg.token().id());
      }
      std::fflush(stdout);
    } else if (msg.has_final()) {
      fin = msg.final();
      has_final = true;
    }
  }
  grpc::Status s = reader->Finish();
  std::printf("\n");
  std::fflush(stdout);  // the answer's line ends before the stats on stderr
  if (!s.ok()) return Fail("generate", s);
  if (has_final) {
    if (absl::GetFlag(FLAGS_print_prompt_ids)) {
      std::string ids;
      for (int32_t id : fin.prompt_ids()) absl::StrAppend(&ids, ids.empty() ? "" : ",", id);
      std::fprintf(stderr, "prompt_ids=%s\n", ids.c_str());
    }
    const auto& u = fin.usage();
    const auto& t = fin.timings();
    std::fprintf(
        stderr,
        "[%s T=%.2f S=%.2f] finish=%s prompt=%u cached=%u encoded=%u generated=%u | queue %.1f ms, cache load %.1f ms, "
        "encode %.1f ms, prefill %.1f ms, first token %.1f ms, decode %.1f tok/s, total %.1f ms\n",
        v1::Mode_Name(fin.mode()).c_str(), fin.ape_temperature(), fin.ape_scale(), fin.finish_reason().c_str(),
        u.prompt_tokens(), u.cached_tokens(), u.encoded_tokens(), u.generated_tokens(), t.queue_ms(), t.cache_load_ms(),
        t.encode_ms(), t.prefill_ms(), t.time_to_first_token_ms(), t.decode_tokens_per_second(), t.total_ms());
  }
  return 0;
}

int ModelInfoCommand(const std::vector<std::string>&) {
  auto channel = Channel("model-info", absl::GetFlag(FLAGS_encoder));
  if (!channel) return 2;
  auto stub = v1::Encoder::NewStub(channel);
  grpc::ClientContext ctx;
  SetDeadline(ctx);
  v1::ModelInfoResponse resp;
  grpc::Status s = stub->ModelInfo(&ctx, v1::ModelInfoRequest(), &resp);
  if (!s.ok()) return Fail("model-info", s);
  std::printf("%s", resp.DebugString().c_str());
  return 0;
}

// grpc.health.v1.Health/Check without generated code (apectl links only the
// ape.v1 API): HealthCheckRequest is field 1 `service` (string), and
// HealthCheckResponse field 1 `status` (enum: 0 UNKNOWN, 1 SERVING,
// 2 NOT_SERVING, 3 SERVICE_UNKNOWN).
int HealthCommand(const std::vector<std::string>& args) {
  if (args.empty() || args.size() > 2) {
    std::fprintf(stderr, "apectl health: usage: apectl health [--tls...] ADDRESS [SERVICE]\n");
    return 2;
  }
  auto channel = Channel("health", args[0]);
  if (!channel) return 2;
  std::string request;
  if (args.size() == 2) {
    google::protobuf::io::StringOutputStream out(&request);
    google::protobuf::io::CodedOutputStream coded(&out);
    google::protobuf::internal::WireFormatLite::WriteString(1, args[1], &coded);
  }
  grpc::Slice request_slice(request);
  grpc::ByteBuffer request_buffer(&request_slice, 1), response_buffer;
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(absl::GetFlag(FLAGS_timeout_s)));
  std::mutex mu;
  std::condition_variable cv;
  std::optional<grpc::Status> status;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request_buffer, &response_buffer,
                 [&](grpc::Status s) {
                   std::lock_guard<std::mutex> lock(mu);
                   status = std::move(s);
                   cv.notify_one();
                 });
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return status.has_value(); });
  }
  if (!status->ok()) return Fail("health", *status);
  std::vector<grpc::Slice> slices;
  std::string response;
  if (!response_buffer.Dump(&slices).ok()) return Fail("health", grpc::Status(grpc::StatusCode::INTERNAL, "bad reply"));
  for (const auto& sl : slices) response.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(response.data()),
                                            static_cast<int>(response.size()));
  uint32_t serving_status = 0;  // UNKNOWN when absent
  while (uint32_t tag = in.ReadTag()) {
    if (tag == 8) {  // field 1, varint
      if (!in.ReadVarint32(&serving_status)) break;
    } else if (!google::protobuf::internal::WireFormatLite::SkipField(&in, tag)) {
      break;
    }
  }
  static constexpr const char* kNames[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
  std::printf("%s\n", serving_status < 4 ? kNames[serving_status] : absl::StrCat(serving_status).c_str());
  return serving_status == 1 ? 0 : 1;
}

}  // namespace ape::apectl
