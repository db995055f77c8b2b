// libFuzzer target: the llama2.c checkpoint loader. The input is split at its
// first 4 bytes (a little-endian length) into a model file and a tokenizer
// file, so both parsers and their agreement (vocab size) are exercised.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "common/engine/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  uint32_t model_len;
  std::memcpy(&model_len, data, 4);
  std::span<const uint8_t> rest(data + 4, size - 4);
  model_len = static_cast<uint32_t>(model_len % (rest.size() + 1));
  auto model = rest.first(model_len);
  if (model.size() >= 4 && std::memcmp(model.data(), "GGUF", 4) == 0) return 0;  // gguf_fuzzer's
  auto m = ape::Model::Parse(model, "fuzz.bin", rest.subspan(model_len), "fuzz-tokenizer.bin");
  if (m.ok()) (void)(*m)->tokenizer().Encode("Once upon a time", true, false);
  return 0;
}
