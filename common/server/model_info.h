// ModelInfoResponse from a Model (both services answer ModelInfo).
#ifndef APESERVE_COMMON_SERVER_MODEL_INFO_H_
#define APESERVE_COMMON_SERVER_MODEL_INFO_H_

#include "ape/v1/encoder.pb.h"
#include "common/engine/model.h"

namespace ape {

void DescribeModel(const Model& model, v1::ModelInfoResponse* resp);

}  // namespace ape

#endif  // APESERVE_COMMON_SERVER_MODEL_INFO_H_
