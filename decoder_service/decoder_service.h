// ape.v1.Decoder: validates, calls common/decode_pipeline, streams tokens
// with one Write in flight, logs one line per request.
#ifndef APESERVE_DECODER_SERVICE_DECODER_SERVICE_H_
#define APESERVE_DECODER_SERVICE_DECODER_SERVICE_H_

#include <memory>
#include <string>

#include "ape/v1/decoder.grpc.pb.h"
#include "ape/v1/encoder.grpc.pb.h"
#include "common/engine/ape_preset.h"
#include "common/pipeline/decode_pipeline.h"
#include "common/server/server_util.h"

namespace ape {

struct DecoderLimits {
  int max_contexts = 256;
  int max_context_tokens = 4096;
  int max_prompt_tokens = 1 << 20;  // KV slots of one request
  int max_new_tokens = 1024;
  int max_concurrent = 1;
  int max_queue = 16;
  KvDtype default_dtype = KvDtype::kFloat16;
  int ttl_seconds = 0;
};

class DecoderService final : public v1::Decoder::Service {
 public:
  // `encoder_address` empty: missing contexts are encoded locally.
  DecoderService(const Model& model, RedisStore* store, DecoderLimits limits, ApePreset preset,
                 const std::string& encoder_address);

  grpc::Status Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status Score(grpc::ServerContext* ctx, const v1::GenerateRequest* req, v1::ScoreResponse* resp) override;
  grpc::Status ModelInfo(grpc::ServerContext* ctx, const v1::ModelInfoRequest* req,
                         v1::ModelInfoResponse* resp) override;

 private:
  // Request -> DecodeInput; INVALID_ARGUMENT / RESOURCE_EXHAUSTED on bad input.
  absl::StatusOr<DecodeInput> Validate(const v1::GenerateRequest& req) const;
  absl::Status RemoteEncode(const EncodeInput& in);

  const Model& model_;
  RedisStore* store_;
  const DecoderLimits limits_;
  const ApePreset preset_;
  Admission admission_;
  std::unique_ptr<v1::Encoder::Stub> encoder_;
};

}  // namespace ape

#endif  // APESERVE_DECODER_SERVICE_DECODER_SERVICE_H_
