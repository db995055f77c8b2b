// A weight matrix as the model file stores it: [rows][cols] row-major, each
// row `row_bytes` bytes of `type` (float32, float16, bfloat16 or GGML
// quantization blocks, see quant.h). Nothing is expanded to float32: the
// bytes are a view into the memory-mapped model file (or a buffer the
// matrix owns, for models built in memory), and the kernels of matvec.h
// compute on them directly.
#ifndef APESERVE_COMMON_ENGINE_WEIGHT_MATRIX_H_
#define APESERVE_COMMON_ENGINE_WEIGHT_MATRIX_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/engine/gguf.h"

namespace ape {

struct WeightMatrix {
  GgmlType type = GgmlType::kF32;
  int rows = 0;  // output units
  int cols = 0;  // input units (a multiple of the type's block size)
  size_t row_bytes = 0;
  const uint8_t* data = nullptr;  // rows * row_bytes bytes
  // Keeps `data` alive: the file mapping or an owned buffer (shared by copies).
  std::shared_ptr<const void> owner;

  // A view of `rows` x `cols` values of `type` at `data`, kept alive by `owner`.
  static WeightMatrix View(GgmlType type, const uint8_t* data, int rows, int cols, std::shared_ptr<const void> owner);
  // A float32 matrix owning `values` (rows * cols), for models built in memory.
  static WeightMatrix FromFloats(std::vector<float> values, int rows, int cols);
  // `values` converted to `type` (QuantizeRow per row), owned.
  static WeightMatrix Quantized(GgmlType type, const std::vector<float>& values, int rows, int cols);

  bool empty() const { return data == nullptr; }
  size_t bytes() const { return static_cast<size_t>(rows) * row_bytes; }
  const uint8_t* row(int r) const { return data + static_cast<size_t>(r) * row_bytes; }
  // Row r as float32 into out[cols] (embedding lookups).
  void RowToFloat(int r, float* out) const;
  // The whole matrix as float32 (tests and tools).
  std::vector<float> ToFloats() const;
};

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_WEIGHT_MATRIX_H_
