// libFuzzer target: GgufFile::Parse and the GGUF model loader on arbitrary
// bytes. Anything but a clean status (a crash, a sanitizer report, an
// allocation past libFuzzer's -rss_limit_mb) is a finding.
#include <cstddef>
#include <cstdint>
#include <span>

#include "common/engine/gguf.h"
#include "common/engine/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const uint8_t> bytes(data, size);
  auto file = ape::GgufFile::Parse(bytes, "fuzz.gguf");
  if (file.ok()) {
    for (const char* key : {"general.architecture", "tokenizer.ggml.tokens", "llama.context_length"}) {
      (void)file->GetString(key);
      (void)file->GetInt(key);
      (void)file->GetStringArray(key);
    }
  }
  (void)ape::Model::Parse(bytes, "fuzz.gguf");
  return 0;
}
