#include "encoder_service/encoder_service.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/engine/status_macros.h"
#include "common/server/kv_dtype.h"
#include "common/server/metrics.h"
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

void EncoderService::RegisterGauges() {
  metrics::Registry& reg = metrics::Registry::Global();
  reg.SetGaugeFunction("ape_admission_running", "Requests computing now", {{"server", "encoder"}},
                       [this] { return admission_.running(); });
  reg.SetGaugeFunction("ape_admission_waiting", "Requests queued for a compute slot now", {{"server", "encoder"}},
                       [this] { return admission_.waiting(); });
}

absl::StatusOr<EncodeInput> EncoderService::Validate(const v1::EncodeRequest& req) const {
  if (req.contexts_size() == 0) return absl::InvalidArgumentError("no contexts: send at least one");
  if (req.contexts_size() > limits_.max_contexts) {
    return absl::ResourceExhaustedError(
        absl::StrCat(req.contexts_size(), " contexts, the limit is ", limits_.max_contexts, " (--max_contexts)"));
  }
  TextCheck text(limits_.text);
  RETURN_IF_ERROR(text.Add(req.prefix().text(), "prefix"));
  for (int i = 0; i < req.contexts_size(); ++i)
    RETURN_IF_ERROR(text.Add(req.contexts(i).text(), absl::StrCat("context ", i)));
  EncodeInput in;
  ASSIGN_OR_RETURN(in.dtype, KvDtypeFromProto(req.dtype(), limits_.default_dtype));
  in.ttl_seconds = req.ttl_seconds() > 0 ? static_cast<int>(std::min<uint32_t>(req.ttl_seconds(), 1u << 30))
                                         : limits_.default_ttl_seconds;
  in.overwrite = req.overwrite();
  const Tokenizer& tok = model_.tokenizer();
  ASSIGN_OR_RETURN(in.prefix_tokens,
                   ResolvePrefix(req.prefix(), tok, limits_.max_prefix_tokens, req.chat() ? &chat_format_ : nullptr));
  for (int i = 0; i < req.contexts_size(); ++i) {
    ASSIGN_OR_RETURN(auto ids,
                     ResolveContext(req.contexts(i), tok, limits_.max_context_tokens, absl::StrCat("context ", i)));
    in.contexts.push_back(std::move(ids));
  }
  RETURN_IF_ERROR(CheckSpan(in));
  return in;
}

// Each context sits at positions Lp..Lp+len-1: within --max_positions, and
// the prefix and the longest context in one cache within the KV budget.
absl::Status EncoderService::CheckSpan(const EncodeInput& in) const {
  size_t longest = 0, longest_at = 0;
  for (size_t i = 0; i < in.contexts.size(); ++i) {
    if (in.contexts[i].size() > longest) longest = in.contexts[i].size(), longest_at = i;
  }
  const int64_t span = static_cast<int64_t>(in.prefix_tokens.size() + longest);
  if (span > limits_.max_positions) {
    return absl::InvalidArgumentError(absl::StrCat(
        "context ", longest_at, " would end at position ", span, " (prefix ", in.prefix_tokens.size(), " + ", longest,
        " tokens), the limit is ", limits_.max_positions, " (--max_positions, default the model's context length)"));
  }
  return CheckKvBudget(kv_budget_, span, "encoding the prefix and the longest context");
}

absl::Status EncoderService::DoEncode(grpc::ServerContext* ctx, const v1::EncodeRequest& req, v1::EncodeResponse* resp,
                                      std::string* log) {
  auto t0 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(const EncodeInput in, Validate(req));  // before any work
  const double tokenize_ms = MsSince(t0);

  auto cancelled = [ctx] { return ctx->IsCancelled(); };
  ASSIGN_OR_RETURN(Admission::Ticket ticket, admission_.Enter(cancelled, ctx->deadline()));
  ASSIGN_OR_RETURN(EncodeOutput out, EncodeContexts(model_, store_, in, cancelled));

  FillEntry(out.prefix, resp->mutable_prefix());
  int cached = 0;
  for (const auto& e : out.contexts) {
    FillEntry(e, resp->add_contexts());
    cached += e.already_cached;
  }
  resp->set_model_fingerprint(model_.fingerprint());
  resp->set_dtype(KvDtypeToProto(in.dtype));
  {
    metrics::Registry& reg = metrics::Registry::Global();
    static metrics::Counter& hit = reg.GetCounter(
        "ape_encoder_contexts_total", "Contexts asked to encode: already cached, or computed", {{"result", "cached"}});
    static metrics::Counter& computed =
        reg.GetCounter("ape_encoder_contexts_total", "Contexts asked to encode: already cached, or computed",
                       {{"result", "computed"}});
    static metrics::Counter& tokens =
        reg.GetCounter("ape_encoder_tokens_computed_total", "Tokens prefilled by the encoder (prefix and contexts)");
    static metrics::Histogram& prefill =
        reg.GetHistogram("ape_encoder_prefill_seconds", "Model time of one Encode request", metrics::LatencyBuckets());
    hit.Inc(cached);
    computed.Inc(static_cast<double>(out.contexts.size()) - cached);
    tokens.Inc(out.tokens_computed);
    prefill.Observe(out.prefill_ms / 1e3);
  }
  auto* t = resp->mutable_timings();
  t->set_tokenize_ms(tokenize_ms);
  t->set_lookup_ms(out.lookup_ms);
  t->set_prefill_ms(out.prefill_ms);
  t->set_store_ms(out.store_ms);
  t->set_total_ms(MsSince(t0));
  *log = absl::StrFormat(
      "contexts=%d cached=%d computed_tokens=%d written_bytes=%d dtype=%s chat=%d tokenize_ms=%.2f lookup_ms=%.2f "
      "prefill_ms=%.2f store_ms=%.2f total_ms=%.2f",
      req.contexts_size(), cached, out.tokens_computed, out.bytes_written, KvDtypeName(in.dtype), req.chat(),
      tokenize_ms, out.lookup_ms, out.prefill_ms, out.store_ms, t->total_ms());
  return absl::OkStatus();
}

grpc::Status EncoderService::Encode(grpc::ServerContext* ctx, const v1::EncodeRequest* req, v1::EncodeResponse* resp) {
  auto t0 = std::chrono::steady_clock::now();
  std::string log;
  absl::Status s = DoEncode(ctx, *req, resp, &log);
  if (!s.ok())
    log = absl::StrFormat("contexts=%d chat=%d total_ms=%.2f", req->contexts_size(), req->chat(), MsSince(t0));
  LogRequest("encoder", "Encode", s, log);
  return ToGrpcStatus(s);
}

grpc::Status EncoderService::Tokenize(grpc::ServerContext*, const v1::TokenizeRequest* req,
                                      v1::TokenizeResponse* resp) {
  auto t0 = std::chrono::steady_clock::now();
  const Tokenizer& tok = model_.tokenizer();
  absl::Status s = TextCheck(limits_.text).Add(req->text(), "text");  // before tokenizing
  if (s.ok()) {
    for (int32_t id : tok.Encode(req->text(), req->add_bos(), false)) {
      resp->add_ids(id);
      resp->add_pieces(ToValidUtf8(tok.piece(id)));
    }
  }
  LogRequest("encoder", "Tokenize", s,
             absl::StrFormat("bytes=%d tokens=%d total_ms=%.2f", req->text().size(), resp->ids_size(), MsSince(t0)));
  return ToGrpcStatus(s);
}

grpc::Status EncoderService::Detokenize(grpc::ServerContext*, const v1::DetokenizeRequest* req,
                                        v1::DetokenizeResponse* resp) {
  auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> ids(req->ids().begin(), req->ids().end());
  absl::Status s = CheckTokenIds(ids, model_.tokenizer().vocab_size(), "ids");
  if (s.ok()) resp->set_text(ToValidUtf8(model_.tokenizer().DecodeAll(ids)));
  LogRequest("encoder", "Detokenize", s, absl::StrFormat("tokens=%d total_ms=%.2f", ids.size(), MsSince(t0)));
  return ToGrpcStatus(s);
}

grpc::Status EncoderService::ModelInfo(grpc::ServerContext*, const v1::ModelInfoRequest*, v1::ModelInfoResponse* resp) {
  DescribeModel(model_, resp);
  LogRequest("encoder", "ModelInfo", absl::OkStatus(), "");
  return grpc::Status::OK;
}

}  // namespace ape
