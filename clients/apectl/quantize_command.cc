// apectl quantize --model IN.gguf --out OUT.gguf --type Q4_K
// Converts a GGUF model's matrices to another type (quantize_model.h): the
// result is a GGUF file llama.cpp and other readers load. Progress goes to
// stderr, one line per tensor (or a bar that redraws on a terminal).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "clients/apectl/commands.h"
#include "common/engine/gguf.h"
#include "common/engine/mapped_file.h"
#include "common/engine/quantize_model.h"

ABSL_DECLARE_FLAG(std::string, model);
ABSL_FLAG(std::string, out, "", "quantize: the GGUF file to write");
ABSL_FLAG(std::string, type, "Q4_K",
          "quantize: target type of the matrices: F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K");

namespace ape::apectl {

int QuantizeCommand(const std::vector<std::string>&) {
  const std::string in_path = absl::GetFlag(FLAGS_model), out_path = absl::GetFlag(FLAGS_out);
  auto fail = [](const absl::Status& s) {
    std::fprintf(stderr, "apectl quantize: %s\n", s.ToString().c_str());
    return 1;
  };
  if (in_path.empty() || out_path.empty()) return fail(absl::InvalidArgumentError("--model and --out are required"));
  if (in_path == out_path) return fail(absl::InvalidArgumentError("--out must differ from --model"));
  auto type = ParseQuantizeType(absl::GetFlag(FLAGS_type));
  if (!type.ok()) return fail(type.status());
  auto file = MappedFile::Open(in_path);
  if (!file.ok()) return fail(file.status());
  auto gguf = GgufFile::Parse((*file)->bytes(), in_path);
  if (!gguf.ok()) return fail(gguf.status());

  const bool tty = isatty(STDERR_FILENO);
  const auto start = std::chrono::steady_clock::now();
  auto progress = [&](int done, int total, const std::string& name) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (tty) {
      const int width = 30, filled = width * done / total;
      std::fprintf(stderr, "\r[%s%s] %d/%d tensors, %.1f s  %-40.40s", std::string(filled, '#').c_str(),
                   std::string(width - filled, ' ').c_str(), done, total, s, name.c_str());
      if (done == total) std::fprintf(stderr, "\n");
    } else {
      std::fprintf(stderr, "quantize: %d/%d %s (%.1f s)\n", done, total, name.c_str(), s);
    }
  };
  auto result = QuantizeGguf(*gguf, *type, out_path, progress);
  if (!result.ok()) {
    std::remove(out_path.c_str());
    return fail(result.status());
  }
  std::vector<std::string> counts;
  for (const auto& [name, n] : result->tensors_by_type) counts.push_back(absl::StrCat(name, " x", n));
  std::printf("wrote %s: %llu bytes (from %llu), tensors %s\n", out_path.c_str(),
              static_cast<unsigned long long>(result->out_bytes),
              static_cast<unsigned long long>((*file)->bytes().size()), absl::StrJoin(counts, ", ").c_str());
  for (const std::string& f : result->fallbacks) std::printf("fallback: %s\n", f.c_str());
  return 0;
}

}  // namespace ape::apectl
