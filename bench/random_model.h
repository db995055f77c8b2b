// Random-weight models of realistic shapes, built in memory, for timing only.
#ifndef APESERVE_BENCH_RANDOM_MODEL_H_
#define APESERVE_BENCH_RANDOM_MODEL_H_

#include <memory>
#include <string>

#include "common/engine/model.h"

namespace ape::bench {

// Known shapes: "qwen2.5-0.5b", "llama-3.2-1b", "tinyllama-1.1b", "small".
absl::StatusOr<ModelConfig> ShapeByName(const std::string& name);
// Weights ~ N(0, 0.02), matrices stored as `type` (quantized in memory);
// a 512-piece byte-level tokenizer.
std::unique_ptr<Model> RandomModel(const ModelConfig& config, uint64_t seed, GgmlType type = GgmlType::kF32);

}  // namespace ape::bench

#endif  // APESERVE_BENCH_RANDOM_MODEL_H_
