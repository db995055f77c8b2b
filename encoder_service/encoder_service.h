// ape.v1.Encoder: validates, calls common/pipeline/encode_pipeline, logs one line.
#ifndef APESERVE_ENCODER_SERVICE_ENCODER_SERVICE_H_
#define APESERVE_ENCODER_SERVICE_ENCODER_SERVICE_H_

#include "ape/v1/encoder.grpc.pb.h"
#include "common/engine/chat_template.h"
#include "common/pipeline/encode_pipeline.h"
#include "common/server/kv_budget.h"
#include "common/server/model_info.h"
#include "common/server/segments.h"
#include "common/server/server_util.h"

namespace ape {

// Set field by field by main() from its flags, which hold the defaults
// (no defaults here to drift from them).
struct EncoderLimits {
  int max_contexts;        // per request
  int max_context_tokens;  // per context
  int max_prefix_tokens;
  int max_positions;          // prefix + context, per context
  int64_t max_request_kv_mb;  // float32 KV of prefix + longest context
  TextLimits text;            // bytes of text, checked before tokenizing
  KvDtype default_dtype;      // for KV_DTYPE_UNSPECIFIED
  int default_ttl_seconds;    // for ttl_seconds 0; 0 = no expiry
  int max_concurrent;         // requests computing at once (each uses every core)
  int max_queue;              // requests waiting beyond that
};

class EncoderService final : public v1::Encoder::Service {
 public:
  EncoderService(const Model& model, RedisStore& store, EncoderLimits limits)
      : model_(model),
        store_(store),
        limits_(limits),
        kv_budget_(MakeKvBudget(model.config(), limits.max_request_kv_mb)),
        chat_format_(DetectChatFormat(model.chat_template())),
        admission_(limits.max_concurrent, limits.max_queue) {
    RegisterGauges();
  }

  grpc::Status Encode(grpc::ServerContext* ctx, const v1::EncodeRequest* req, v1::EncodeResponse* resp) override;
  grpc::Status Tokenize(grpc::ServerContext* ctx, const v1::TokenizeRequest* req, v1::TokenizeResponse* resp) override;
  grpc::Status Detokenize(grpc::ServerContext* ctx, const v1::DetokenizeRequest* req,
                          v1::DetokenizeResponse* resp) override;
  grpc::Status ModelInfo(grpc::ServerContext* ctx, const v1::ModelInfoRequest* req,
                         v1::ModelInfoResponse* resp) override;

 private:
  // Request -> EncodeInput, with no I/O: counts and text before anything is
  // tokenized, then token counts, positions and the KV budget.
  absl::StatusOr<EncodeInput> Validate(const v1::EncodeRequest& req) const;
  absl::Status CheckSpan(const EncodeInput& in) const;
  void RegisterGauges();  // admission queue depth and running requests, read at scrape time
  absl::Status DoEncode(grpc::ServerContext* ctx, const v1::EncodeRequest& req, v1::EncodeResponse* resp,
                        std::string* log);
  const Model& model_;
  RedisStore& store_;
  const EncoderLimits limits_;
  const KvBudget kv_budget_;
  const ChatFormat chat_format_;  // of the model's chat template, for requests with chat
  Admission admission_;
};

}  // namespace ape

#endif  // APESERVE_ENCODER_SERVICE_ENCODER_SERVICE_H_
