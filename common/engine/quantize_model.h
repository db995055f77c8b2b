// Converts the weight matrices of a GGUF model to another type, as
// llama.cpp's `llama-quantize --pure` does: every 2-D `*.weight` tensor
// (token embedding and classifier included) gets the target type, vectors
// (norms, biases, rope_freqs) stay as they are, metadata is copied with
// general.file_type (and general.quantization_version) updated. A matrix
// whose rows are not a whole number of the type's blocks takes llama.cpp's
// fallback for the K types (which need 256: Q4_K -> Q5_0, Q5_K -> Q5_1,
// Q6_K -> Q8_0) or keeps its type.
#ifndef APESERVE_COMMON_ENGINE_QUANTIZE_MODEL_H_
#define APESERVE_COMMON_ENGINE_QUANTIZE_MODEL_H_

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/engine/gguf.h"

namespace ape {

struct QuantizeResult {
  std::map<std::string, int> tensors_by_type;  // output type name -> count
  std::vector<std::string> fallbacks;          // "name: type (reason)"
  uint64_t out_bytes = 0;                      // size of the written file
};

// The target types: F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; by
// name ("Q4_K").
absl::StatusOr<GgmlType> ParseQuantizeType(const std::string& name);

// The type a matrix with rows of `cols` elements gets for `target`: the
// target if its rows are whole blocks of it; else, for the K types,
// llama.cpp's fallback (llama_tensor_get_type: Q4_K -> Q5_0, Q5_K -> Q5_1,
// Q6_K -> Q8_0, F16 where even that block does not fit); else nullopt (the
// matrix keeps its type).
std::optional<GgmlType> MatrixTypeFor(GgmlType target, uint64_t cols);

// Writes `in` with its matrices converted to `type` to `out_path`.
// `progress(done, total, tensor_name)` is called after every tensor.
absl::StatusOr<QuantizeResult> QuantizeGguf(const GgufFile& in, GgmlType type, const std::string& out_path,
                                            const std::function<void(int, int, const std::string&)>& progress = {});

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_QUANTIZE_MODEL_H_
