// apectl: the apeserve command-line tool.
//   apectl run  --model M [--tokenizer T] --prompt P --max-tokens N --temperature 0
//   apectl info --model M [--tokenizer T]
//   apectl quantize --model IN.gguf --out OUT.gguf --type Q4_K
//   apectl encode / generate / model-info / health: clients of ape-encoder and
//   ape-decoder, in plaintext or TLS (--tls, --tls-ca, --tls-cert, --tls-key)
// Flags may be spelled with dashes or underscores (--max-tokens = --max_tokens).
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "clients/apectl/commands.h"

int main(int argc, char** argv) {
  // absl flag names use underscores; accept the dashed spelling users type.
  std::vector<std::string> storage(argv, argv + argc);
  for (auto& a : storage) {
    if (a.rfind("--", 0) != 0) continue;
    size_t end = a.find('=');
    for (size_t i = 2; i < std::min(end, a.size()); ++i)
      if (a[i] == '-') a[i] = '_';
  }
  std::vector<char*> args;
  for (auto& s : storage) args.push_back(s.data());
  absl::SetProgramUsageMessage(
      "apeserve command-line tool.\n"
      "  apectl run  --model M [--tokenizer T] --prompt P|--prompt-ids I,J,.. --max-tokens N [--temperature 0]\n"
      "              [--print-ids]\n"
      "  apectl info --model M [--tokenizer T]\n"
      "  apectl tokenize --model M [--tokenizer T] [--parse-special] TEXT...\n"
      "  apectl encode [--encoder ADDR] [--prefix P] [--chat] [--dtype float16|float32] [--batch N] FILE|DIR...\n"
      "  apectl generate [--decoder ADDR] [--prefix P] [--context-key K1,K2] [--context-file F|DIR]\n"
      "                  --query Q [--chat] [--mode ape|parallel|sequential] [--ape-t T] [--ape-s S] [--max-tokens N]\n"
      "                  [--print-ids] [--print-prompt-ids]\n"
      "  apectl model-info [--encoder ADDR]\n"
      "  apectl health ADDR [SERVICE]        (prints the gRPC health status; exit 0 when SERVING)\n"
      "  apectl cache ls|stat|rm|touch|totals [--cache-server ADDR] [KEY...]   (ape.v1.Cache on either server;\n"
      "              ls: --model-fingerprint FP --prefix-key K --limit N; stat: --verify; touch: --ttl-s N)\n"
      "Remote commands (encode, generate, model-info, health, cache) speak plaintext unless given TLS flags:\n"
      "  --tls                 TLS, verifying the server with the system roots\n"
      "  --tls-ca FILE         TLS, verifying the server with this PEM CA bundle\n"
      "  --tls-cert FILE --tls-key FILE   client certificate for servers with --tls_client_ca (mutual TLS)\n"
      "  --tls-server-name N   name to verify in the server's certificate (default: the address's host)\n"
      "Addresses may be a comma-separated list or dns:///name:port; --round-robin (on for a list) spreads calls.");
  std::vector<char*> rest = absl::ParseCommandLine(static_cast<int>(args.size()), args.data());
  if (rest.size() < 2) {
    std::fprintf(stderr, "%s\n", absl::ProgramUsageMessage().data());
    return 2;
  }
  std::string cmd = rest[1];
  std::vector<std::string> pos(rest.begin() + 2, rest.end());
  if (cmd == "run") return ape::apectl::RunCommand(pos);
  if (cmd == "info") return ape::apectl::InfoCommand(pos);
  if (cmd == "tokenize") return ape::apectl::TokenizeCommand(pos);
  if (cmd == "quantize") return ape::apectl::QuantizeCommand(pos);
  if (cmd == "encode") return ape::apectl::EncodeCommand(pos);
  if (cmd == "generate") return ape::apectl::GenerateCommand(pos);
  if (cmd == "model-info") return ape::apectl::ModelInfoCommand(pos);
  if (cmd == "health") return ape::apectl::HealthCommand(pos);
  if (cmd == "cache") return ape::apectl::CacheCommand(pos);
  std::fprintf(stderr, "apectl: unknown command '%s'\n%s\n", cmd.c_str(), absl::ProgramUsageMessage().data());
  return 2;
}
