// libFuzzer target: the SentencePiece tokenizer on arbitrary text, with the
// stories260K vocabulary (byte fallback) loaded once. Checks what must hold
// for any input: every id is in the vocabulary, and decoding the ids after
// BOS gives the text back (byte fallback loses nothing; the dummy-prefix
// space is dropped after BOS, as llama2.c does).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "absl/strings/string_view.h"
#include "common/engine/mapped_file.h"
#include "common/engine/tokenizer.h"

namespace {
const ape::Tokenizer* LoadOnce() {
  static std::unique_ptr<ape::Tokenizer> tok = [] {
    auto bytes = ape::ReadFileToString(APE_TEST_DATA "/tok512.bin");
    if (!bytes.ok()) std::abort();
    auto t = ape::Tokenizer::FromLlama2c({reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size()}, 512,
                                         "tok512.bin");
    if (!t.ok()) std::abort();
    return std::make_unique<ape::Tokenizer>(*std::move(t));
  }();
  return tok.get();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const ape::Tokenizer& tok = *LoadOnce();
  absl::string_view text(reinterpret_cast<const char*>(data), size);
  std::vector<int32_t> ids = tok.Encode(text, /*bos=*/false, /*eos=*/false);
  for (int32_t id : ids) {
    if (id < 0 || id >= tok.vocab_size()) std::abort();
  }
  if (tok.DecodeAll(ids, tok.bos_id()) != text) std::abort();
  return 0;
}
