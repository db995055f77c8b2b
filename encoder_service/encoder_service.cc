#include "encoder_service/encoder_service.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/engine/status_macros.h"
#include "common/server/kv_dtype.h"
#include "common/server/segments.h"

namespace ape {

namespace {
void FillEntry(const EncodedEntry& e, v1::CacheEntry* out) {
  out->set_key(e.key);
  out->set_num_tokens(e.num_tokens);
  out->set_first_position(e.first_position);
  out->set_stored_bytes(e.stored_bytes);
  out->set_already_cached(e.already_cached);
}
}  // namespace

absl::Status EncoderService::DoEncode(grpc::ServerContext* ctx, const v1::EncodeRequest& req, v1::EncodeResponse* resp,
                                      std::string* log) {
  auto t0 = std::chrono::steady_clock::now();
  // Validate before any work.
  if (req.contexts_size() == 0) return absl::InvalidArgumentError("no contexts: send at least one");
  if (req.contexts_size() > limits_.max_contexts) {
    return absl::ResourceExhaustedError(
        absl::StrCat(req.contexts_size(), " contexts, the limit is ", limits_.max_contexts));
  }
  EncodeInput in;
  ASSIGN_OR_RETURN(in.dtype, KvDtypeFromProto(req.dtype(), limits_.default_dtype));
  in.ttl_seconds = req.ttl_seconds() > 0 ? static_cast<int>(std::min<uint32_t>(req.ttl_seconds(), 1u << 30))
                                         : limits_.default_ttl_seconds;
  const Tokenizer& tok = model_.tokenizer();
  ASSIGN_OR_RETURN(in.prefix_tokens, ResolvePrefix(req.prefix(), tok, limits_.max_prefix_tokens));
  for (int i = 0; i < req.contexts_size(); ++i) {
    ASSIGN_OR_RETURN(auto ids,
                     ResolveContext(req.contexts(i), tok, limits_.max_context_tokens, absl::StrCat("context ", i)));
    in.contexts.push_back(std::move(ids));
  }
  const double tokenize_ms = MsSince(t0);

  ASSIGN_OR_RETURN(Admission::Ticket ticket, admission_.Enter([ctx] { return ctx->IsCancelled(); }));
  ASSIGN_OR_RETURN(EncodeOutput out, EncodeContexts(model_, store_, in));

  FillEntry(out.prefix, resp->mutable_prefix());
  int cached = 0;
  for (const auto& e : out.contexts) {
    FillEntry(e, resp->add_contexts());
    cached += e.already_cached;
  }
  resp->set_model_fingerprint(model_.fingerprint());
  resp->set_dtype(KvDtypeToProto(in.dtype));
  auto* t = resp->mutable_timings();
  t->set_tokenize_ms(tokenize_ms);
  t->set_lookup_ms(out.lookup_ms);
  t->set_prefill_ms(out.prefill_ms);
  t->set_store_ms(out.store_ms);
  t->set_total_ms(MsSince(t0));
  *log = absl::StrFormat(
      "contexts=%d cached=%d computed_tokens=%d written_bytes=%d dtype=%s tokenize_ms=%.2f lookup_ms=%.2f "
      "prefill_ms=%.2f store_ms=%.2f total_ms=%.2f",
      req.contexts_size(), cached, out.tokens_computed, out.bytes_written, KvDtypeName(in.dtype), tokenize_ms,
      out.lookup_ms, out.prefill_ms, out.store_ms, t->total_ms());
  return absl::OkStatus();
}

grpc::Status EncoderService::Encode(grpc::ServerContext* ctx, const v1::EncodeRequest* req, v1::EncodeResponse* resp) {
  auto t0 = std::chrono::steady_clock::now();
  std::string log;
  absl::Status s = DoEncode(ctx, *req, resp, &log);
  if (!s.ok()) log = absl::StrFormat("contexts=%d total_ms=%.2f", req->contexts_size(), MsSince(t0));
  LogRequest("encoder", "Encode", s, log);
  return ToGrpcStatus(s);
}

grpc::Status EncoderService::Tokenize(grpc::ServerContext*, const v1::TokenizeRequest* req,
                                      v1::TokenizeResponse* resp) {
  auto t0 = std::chrono::steady_clock::now();
  const Tokenizer& tok = model_.tokenizer();
  for (int32_t id : tok.Encode(req->text(), req->add_bos(), false)) {
    resp->add_ids(id);
    resp->add_pieces(tok.piece(id));
  }
  LogRequest("encoder", "Tokenize", absl::OkStatus(),
             absl::StrFormat("bytes=%d tokens=%d total_ms=%.2f", req->text().size(), resp->ids_size(), MsSince(t0)));
  return grpc::Status::OK;
}

grpc::Status EncoderService::Detokenize(grpc::ServerContext*, const v1::DetokenizeRequest* req,
                                        v1::DetokenizeResponse* resp) {
  auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> ids(req->ids().begin(), req->ids().end());
  absl::Status s = CheckTokenIds(ids, model_.tokenizer().vocab_size(), "ids");
  if (s.ok()) resp->set_text(model_.tokenizer().DecodeAll(ids));
  LogRequest("encoder", "Detokenize", s, absl::StrFormat("tokens=%d total_ms=%.2f", ids.size(), MsSince(t0)));
  return ToGrpcStatus(s);
}

grpc::Status EncoderService::ModelInfo(grpc::ServerContext*, const v1::ModelInfoRequest*, v1::ModelInfoResponse* resp) {
  DescribeModel(model_, resp);
  LogRequest("encoder", "ModelInfo", absl::OkStatus(), "");
  return grpc::Status::OK;
}

}  // namespace ape
