// ape.v1.Decoder: validates (before any I/O), loads the request's cache
// entries on its handler thread (PrepareDecode: Redis, encode-on-miss), then
// hands the prepared session to the batch decoder (one engine thread that
// prefills in chunks and decodes every running stream in one shared step,
// common/pipeline/batch_decoder.h). The handler takes the stream's tokens
// from its queue and writes them, one Write in flight; the engine never
// waits for a client. It logs one line per request. Generate and Score
// share everything up to the engine (validation, admission, cancellation,
// encoding through --encoder); Generate then streams tokens, Score returns
// the distribution after the prompt.
//
// Admission: --max_concurrent requests hold a slot from PrepareDecode until
// their stream leaves the engine, so it is also the batch width; more wait
// in the admission queue (--max_queue), the rest get RESOURCE_EXHAUSTED.
#ifndef APESERVE_DECODER_SERVICE_DECODER_SERVICE_H_
#define APESERVE_DECODER_SERVICE_DECODER_SERVICE_H_

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "ape/v1/decoder.grpc.pb.h"
#include "ape/v1/encoder.grpc.pb.h"
#include "common/engine/ape_preset.h"
#include "common/engine/chat_template.h"
#include "common/pipeline/batch_decoder.h"
#include "common/pipeline/decode_pipeline.h"
#include "common/pipeline/hot_cache.h"
#include "common/server/kv_budget.h"
#include "common/server/segments.h"
#include "common/server/server_util.h"

namespace ape {

// Set field by field by main() from its flags, which hold the defaults
// (no defaults here to drift from them).
struct DecoderLimits {
  int max_contexts;        // per request
  int max_context_tokens;  // per context given as content
  int max_prefix_tokens;   // BOS and chat markers included
  int max_query_tokens;
  // Positional extent of prompt + generated tokens (decoder.proto).
  int max_positions;
  // Float32 KV of one request (prompt + generated): --max_request_kv_mb,
  // capped by --max_prompt_tokens slots when set.
  int64_t max_request_kv_mb;
  int max_prompt_tokens;  // 0 = the byte budget alone
  int max_new_tokens;     // generated tokens per request
  TextLimits text;        // bytes of text, checked before tokenizing
  int max_concurrent;     // requests computing at once: the decode batch width
  int prefill_chunk;      // prompt tokens per engine iteration (batch_decoder.h)
  int max_queue;          // requests waiting beyond that
  KvDtype default_dtype;  // for KV_DTYPE_UNSPECIFIED
  int ttl_seconds;        // of entries encoded on the fly; 0 = none
  int64_t hot_cache_mb;   // in-process cache of verified entries (hot_cache.h); 0 = off
};

class DecoderService final : public v1::Decoder::Service {
 public:
  // `encoder` (MakeChannel of --encoder) encodes missing contexts; null:
  // they are encoded locally.
  DecoderService(const Model& model, RedisStore* store, DecoderLimits limits, ApePreset preset,
                 std::shared_ptr<grpc::Channel> encoder);

  grpc::Status Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status Score(grpc::ServerContext* ctx, const v1::GenerateRequest* req, v1::ScoreResponse* resp) override;
  grpc::Status ModelInfo(grpc::ServerContext* ctx, const v1::ModelInfoRequest* req,
                         v1::ModelInfoResponse* resp) override;

  // The in-process cache of hot entries (null when --hot_cache_mb=0): the
  // Cache service drops the keys it deletes from it.
  HotCache* hot_cache() const { return hot_cache_.get(); }

 private:
  using Clock = std::chrono::steady_clock;
  // What one request did, for its reply and its log line.
  struct Outcome {
    Clock::time_point arrival = Clock::now();
    DecodeStats stats;
    double queue_ms = 0, first_token_ms = 0;
    GenerateResult result;
  };
  // A request cleared to compute: its input, its hooks and its compute slot.
  struct Admitted {
    DecodeInput in;
    DecodeHooks hooks;
    Admission::Ticket ticket;
  };

  // Request -> DecodeInput, with no I/O; INVALID_ARGUMENT /
  // RESOURCE_EXHAUSTED on bad input. Sizes and text are checked before
  // anything is tokenized, token counts right after.
  absl::StatusOr<DecodeInput> Validate(const v1::GenerateRequest& req) const;
  absl::Status CheckText(const v1::GenerateRequest& req) const;
  absl::Status ValidateApe(const v1::GenerateRequest& req, DecodeInput* in) const;
  absl::Status TokenizePrompt(const v1::GenerateRequest& req, DecodeInput* in) const;
  absl::Status ValidateContexts(const v1::GenerateRequest& req, DecodeInput* in) const;
  absl::Status ValidateGeneration(const v1::GenerateRequest& req, GenerateOptions* g) const;
  absl::Status CheckPositions(DecodeInput* in) const;
  absl::Status CheckKvSlots(DecodeInput* in) const;
  // Validate, then wait for a compute slot; the hooks watch `ctx`.
  absl::StatusOr<Admitted> Admit(grpc::ServerContext* ctx, const v1::GenerateRequest& req, Outcome* outcome);
  absl::Status DoGenerate(grpc::ServerContext* ctx, const v1::GenerateRequest& req,
                          grpc::ServerWriter<v1::GenerateResponse>* writer, Outcome* outcome);
  void FillFinal(const v1::GenerateRequest& req, const DecodeInput& in, const Outcome& outcome, v1::Final* f) const;
  absl::Status DoScore(grpc::ServerContext* ctx, const v1::GenerateRequest& req, v1::ScoreResponse* resp,
                       Outcome* outcome);
  // Loads the request's entries (handler thread) and submits its session to
  // the engine; the admission slot (call.ticket) goes with it, released
  // when the stream leaves the batch.
  absl::StatusOr<std::shared_ptr<BatchStream>> Start(grpc::ServerContext* ctx, Admitted& call, bool score_only,
                                                     Outcome* outcome);
  // Waits for the stream's events, handing each to `on_event` (false: the
  // client is gone), cancelling the stream when the client cancels, its
  // deadline passes or on_event fails; returns once the stream has left the
  // engine: OK, CANCELLED or DEADLINE_EXCEEDED.
  absl::Status Follow(grpc::ServerContext* ctx, BatchStream& stream,
                      const std::function<bool(const TokenEvent&)>& on_event);
  // Encodes through --encoder, as part of the request in `ctx` (cancelled
  // with it, within its deadline).
  absl::Status RemoteEncode(grpc::ServerContext* ctx, const EncodeInput& in);
  // The fields both methods log: mode, contexts, usage, timings.
  std::string LogDetails(const v1::GenerateRequest& req, const Outcome& outcome) const;

  const Model& model_;
  RedisStore* store_;
  const DecoderLimits limits_;
  const KvBudget kv_budget_;
  const ApePreset preset_;
  const ChatFormat chat_format_;  // of the model's chat template, for requests with chat
  Admission admission_;
  std::unique_ptr<v1::Encoder::Stub> encoder_;
  std::unique_ptr<HotCache> hot_cache_;  // null: off
  BatchDecoder engine_;                  // last: its thread stops first
};

}  // namespace ape

#endif  // APESERVE_DECODER_SERVICE_DECODER_SERVICE_H_
