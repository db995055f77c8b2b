// apectl subcommands. Each takes the positional arguments after its name and
// returns a process exit code; results go to stdout, logs to stderr.
#ifndef APESERVE_CLIENTS_APECTL_COMMANDS_H_
#define APESERVE_CLIENTS_APECTL_COMMANDS_H_

#include <string>
#include <vector>

namespace ape::apectl {

int RunCommand(const std::vector<std::string>& args);        // local generation
int InfoCommand(const std::vector<std::string>& args);       // describe a model
int TokenizeCommand(const std::vector<std::string>& args);   // local: texts -> ids
int QuantizeCommand(const std::vector<std::string>& args);   // local: GGUF -> GGUF of another weight type
int EncodeCommand(const std::vector<std::string>& args);     // ape-encoder: documents -> keys
int GenerateCommand(const std::vector<std::string>& args);   // ape-decoder: stream an answer
int ModelInfoCommand(const std::vector<std::string>& args);  // the served model
int HealthCommand(const std::vector<std::string>& args);     // grpc.health.v1 Check: exit 0 when SERVING
int CacheCommand(const std::vector<std::string>& args);      // ape.v1.Cache: ls, stat, rm, touch, totals

}  // namespace ape::apectl

#endif  // APESERVE_CLIENTS_APECTL_COMMANDS_H_
