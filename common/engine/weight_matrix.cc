#include "common/engine/weight_matrix.h"

#include <cstring>

#include "common/engine/quant.h"
#include "common/engine/threading.h"

namespace ape {

WeightMatrix WeightMatrix::View(GgmlType type, const uint8_t* data, int rows, int cols,
                                std::shared_ptr<const void> owner) {
  WeightMatrix m;
  m.type = type;
  m.rows = rows;
  m.cols = cols;
  m.row_bytes = GgmlRowBytes(static_cast<uint32_t>(type), cols);
  m.data = data;
  m.owner = std::move(owner);
  return m;
}

WeightMatrix WeightMatrix::FromFloats(std::vector<float> values, int rows, int cols) {
  auto buffer = std::make_shared<std::vector<float>>(std::move(values));
  buffer->resize(static_cast<size_t>(rows) * cols);
  const auto* data = reinterpret_cast<const uint8_t*>(buffer->data());
  return View(GgmlType::kF32, data, rows, cols, std::move(buffer));
}

WeightMatrix WeightMatrix::Quantized(GgmlType type, const std::vector<float>& values, int rows, int cols) {
  const size_t row_bytes = GgmlRowBytes(static_cast<uint32_t>(type), cols);
  auto buffer = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(rows) * row_bytes);
  uint8_t* out = buffer->data();
  ParallelFor(rows, /*dynamic=*/false,
              [&](int64_t r) { QuantizeRow(type, &values[static_cast<size_t>(r) * cols], out + r * row_bytes, cols); });
  const uint8_t* data = buffer->data();
  return View(type, data, rows, cols, std::move(buffer));
}

void WeightMatrix::RowToFloat(int r, float* out) const { DequantizeRow(type, row(r), out, cols); }

std::vector<float> WeightMatrix::ToFloats() const {
  std::vector<float> out(static_cast<size_t>(rows) * cols);
  for (int r = 0; r < rows; ++r) RowToFloat(r, &out[static_cast<size_t>(r) * cols]);
  return out;
}

}  // namespace ape
