#include "decoder_service/decoder_service.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/server/model_info.h"
#include "common/server/segments.h"
#include "common/engine/status_macros.h"

namespace ape {

DecoderService::DecoderService(const Model& model, RedisStore* store, DecoderLimits limits, ApePreset preset,
                               const std::string& encoder_address)
    : model_(model), store_(store), limits_(limits), preset_(preset),
      admission_(limits.max_concurrent, limits.max_queue) {
  if (!encoder_address.empty()) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    args.SetLoadBalancingPolicyName("round_robin");  // over every address a dns:/// name resolves to
    encoder_ = v1::Encoder::NewStub(
        grpc::CreateCustomChannel(encoder_address, grpc::InsecureChannelCredentials(), args));
  }
}

absl::StatusOr<DecodeInput> DecoderService::Validate(const v1::GenerateRequest& req) const {
  DecodeInput in;
  switch (req.mode()) {
    case v1::MODE_UNSPECIFIED: case v1::MODE_APE: in.mode = DecodeMode::kApe; break;
    case v1::MODE_PARALLEL: in.mode = DecodeMode::kParallel; break;
    case v1::MODE_SEQUENTIAL: in.mode = DecodeMode::kSequential; break;
    default: return absl::InvalidArgumentError(absl::StrCat("unknown mode ", req.mode()));
  }
  in.temperature = req.ape_temperature() != 0.f ? req.ape_temperature() : preset_.temperature;
  in.scale = req.ape_scale() != 0.f ? req.ape_scale() : preset_.scale;
  if (!(in.temperature > 0.f && in.temperature <= 2.f)) return absl::InvalidArgumentError("ape_temperature must be in (0, 2]");
  if (!(in.scale > 0.f && in.scale <= 2.f)) return absl::InvalidArgumentError("ape_scale must be in (0, 2]");
  switch (req.dtype()) {
    case v1::KV_DTYPE_UNSPECIFIED: in.dtype = limits_.default_dtype; break;
    case v1::KV_DTYPE_FLOAT16: in.dtype = KvDtype::kFloat16; break;
    case v1::KV_DTYPE_FLOAT32: in.dtype = KvDtype::kFloat32; break;
    default: return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", req.dtype()));
  }
  in.ttl_seconds = limits_.ttl_seconds;
  if (req.contexts_size() > limits_.max_contexts) {
    return absl::ResourceExhaustedError(absl::StrCat(req.contexts_size(), " contexts, the limit is ", limits_.max_contexts));
  }
  const Tokenizer& tok = model_.tokenizer();
  in.prefix_tokens = tok.Encode(req.prefix(), /*bos=*/true, /*eos=*/false);
  int64_t total = in.prefix_tokens.size();
  for (int i = 0; i < req.contexts_size(); ++i) {
    const v1::ContextRef& ref = req.contexts(i);
    const std::string what = absl::StrCat("context ", i);
    ContextSource src;
    if (ref.has_key()) {
      src.key = ref.key();
      if (src.key.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": empty key"));
    } else if (ref.ref_case() == v1::ContextRef::REF_NOT_SET) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": set key, text or tokens"));
    } else {
      v1::Segment seg;
      if (ref.has_text()) seg.set_text(ref.text()); else *seg.mutable_tokens() = ref.tokens();
      ASSIGN_OR_RETURN(auto ids, ResolveContext(seg, tok, limits_.max_context_tokens, what));
      total += ids.size();
      src.tokens = std::move(ids);
    }
    in.contexts.push_back(std::move(src));
  }
  in.query_tokens = tok.Encode(req.query(), /*bos=*/false, /*eos=*/false);
  if (in.query_tokens.empty()) return absl::InvalidArgumentError("query is empty");
  total += in.query_tokens.size();
  GenerateOptions& g = in.generate;
  g.max_tokens = req.max_tokens() == 0 ? 128 : static_cast<int>(std::min<uint32_t>(req.max_tokens(), 1u << 20));
  if (g.max_tokens > limits_.max_new_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens ", g.max_tokens, " exceeds the limit ", limits_.max_new_tokens));
  }
  total += g.max_tokens;
  if (total > limits_.max_prompt_tokens) {  // key-only contexts are checked again after loading
    return absl::ResourceExhaustedError(absl::StrCat("request needs ", total, " KV slots, the limit is ", limits_.max_prompt_tokens));
  }
  for (const auto& s : req.stop()) {
    if (s.empty() || s.size() > 256) return absl::InvalidArgumentError("stop strings must be 1 to 256 bytes");
  }
  if (req.stop_size() > 16) return absl::InvalidArgumentError("at most 16 stop strings");
  g.stop.assign(req.stop().begin(), req.stop().end());
  if (req.top_logprobs() > 20) return absl::InvalidArgumentError("top_logprobs must be 0 to 20");
  g.top_logprobs = static_cast<int>(req.top_logprobs());
  const v1::Sampling& s = req.sampling();
  g.sampling.temperature = s.temperature();
  g.sampling.top_k = s.top_k();
  g.sampling.top_p = s.top_p() == 0.f ? 1.f : s.top_p();
  g.sampling.min_p = s.min_p();
  g.sampling.repetition_penalty = s.repetition_penalty() == 0.f ? 1.f : s.repetition_penalty();
  g.sampling.seed = s.seed();
  RETURN_IF_ERROR(ValidateSamplingParams(g.sampling));
  return in;
}

absl::Status DecoderService::RemoteEncode(const EncodeInput& in) {
  v1::EncodeRequest req;
  for (int32_t id : in.prefix_tokens) req.mutable_prefix()->mutable_tokens()->add_ids(id);
  for (const auto& c : in.contexts) {
    auto* ids = req.add_contexts()->mutable_tokens();
    for (int32_t id : c) ids->add_ids(id);
  }
  req.set_dtype(in.dtype == KvDtype::kFloat16 ? v1::KV_DTYPE_FLOAT16 : v1::KV_DTYPE_FLOAT32);
  req.set_ttl_seconds(in.ttl_seconds);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(10));
  v1::EncodeResponse resp;
  grpc::Status s = encoder_->Encode(&ctx, req, &resp);
  if (!s.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()), absl::StrCat("encoder: ", s.error_message()));
  }
  if (resp.model_fingerprint() != model_.fingerprint()) {
    return absl::FailedPreconditionError(absl::StrCat("encoder serves model ", resp.model_fingerprint(),
                                                      ", this decoder ", model_.fingerprint()));
  }
  return absl::OkStatus();
}

grpc::Status DecoderService::Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                                      grpc::ServerWriter<v1::GenerateResponse>* writer) {
  const auto t_arrival = std::chrono::steady_clock::now();
  DecodeStats stats;
  double queue_ms = 0, first_token_ms = 0;
  bool client_gone = false;
  GenerateResult result;
  auto run = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(DecodeInput in, Validate(*req));
    auto tq = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(Admission::Ticket ticket, admission_.Enter([ctx] { return ctx->IsCancelled(); }));
    queue_ms = MsSince(tq);
    DecodeHooks hooks;
    hooks.cancelled = [ctx] { return ctx->IsCancelled(); };
    if (encoder_) hooks.remote_encode = [this](const EncodeInput& e) { return RemoteEncode(e); };
    const Tokenizer& tok = model_.tokenizer();
    auto on_token = [&](const TokenEvent& ev) {
      if (first_token_ms == 0) first_token_ms = MsSince(t_arrival);
      v1::GenerateResponse msg;
      v1::TokenDelta* d = msg.mutable_token();
      d->set_id(ev.id);
      d->set_text(ev.text);
      d->set_logprob(ev.logprob);
      for (const auto& [id, lp] : ev.top) {
        auto* t = d->add_top_logprobs();
        t->set_id(id);
        t->set_piece(tok.piece(id));
        t->set_logprob(lp);
      }
      if (!writer->Write(msg)) {  // the client is gone: stop computing
        client_gone = true;
        return false;
      }
      return true;
    };
    ASSIGN_OR_RETURN(result, RunDecode(model_, store_, in, hooks, on_token, &stats));
    if (client_gone || ctx->IsCancelled()) return absl::CancelledError("client cancelled or deadline passed");
    v1::GenerateResponse fin;
    v1::Final* f = fin.mutable_final();
    f->set_finish_reason(FinishReasonName(result.reason));
    f->set_text(result.text);
    f->set_ape_temperature(in.mode == DecodeMode::kApe ? in.temperature : 1.f);
    f->set_ape_scale(in.mode == DecodeMode::kApe ? in.scale : 1.f);
    f->set_mode(req->mode() == v1::MODE_UNSPECIFIED ? v1::MODE_APE : req->mode());
    v1::Usage* u = f->mutable_usage();
    u->set_prompt_tokens(stats.prompt_tokens);
    u->set_cached_tokens(stats.cached_tokens);
    u->set_generated_tokens(result.tokens.size());
    u->set_encoded_tokens(stats.encoded_tokens);
    v1::Timings* t = f->mutable_timings();
    t->set_queue_ms(queue_ms);
    t->set_cache_load_ms(stats.cache_load_ms);
    t->set_encode_ms(stats.encode_ms);
    t->set_prefill_ms(stats.prefill_ms);
    t->set_time_to_first_token_ms(first_token_ms);
    t->set_decode_tokens_per_second(result.tokens.size() > 1 && result.decode_seconds > 0
                                        ? (result.tokens.size() - 1) / result.decode_seconds : 0);
    t->set_total_ms(MsSince(t_arrival));
    if (!writer->Write(fin)) return absl::CancelledError("client went away before the final message");
    return absl::OkStatus();
  };
  absl::Status s = run();
  if (s.code() == absl::StatusCode::kCancelled && ctx->IsCancelled() &&
      ctx->deadline() < std::chrono::system_clock::now()) {
    s = absl::DeadlineExceededError("deadline passed");
  }
  LogRequest("decoder", "Generate", s,
             absl::StrFormat("mode=%s contexts=%d prompt_tokens=%d cached_tokens=%d encoded_tokens=%d "
                             "generated=%d finish=%s queue_ms=%.2f cache_load_ms=%.2f encode_ms=%.2f "
                             "prefill_ms=%.2f ttft_ms=%.2f decode_ms=%.2f total_ms=%.2f",
                             v1::Mode_Name(req->mode()), req->contexts_size(), stats.prompt_tokens,
                             stats.cached_tokens, stats.encoded_tokens, result.tokens.size(),
                             FinishReasonName(result.reason), queue_ms, stats.cache_load_ms, stats.encode_ms,
                             stats.prefill_ms, first_token_ms, result.decode_seconds * 1e3, MsSince(t_arrival)));
  return ToGrpcStatus(s);
}

grpc::Status DecoderService::Score(grpc::ServerContext* ctx, const v1::GenerateRequest* req, v1::ScoreResponse* resp) {
  const auto t0 = std::chrono::steady_clock::now();
  DecodeStats stats;
  auto run = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(DecodeInput in, Validate(*req));
    ASSIGN_OR_RETURN(Admission::Ticket ticket, admission_.Enter([ctx] { return ctx->IsCancelled(); }));
    ASSIGN_OR_RETURN(std::vector<float> logits, PromptLogits(model_, store_, in, &stats));
    const float lse = LogSumExp(logits.data(), static_cast<int>(logits.size()));
    for (float l : logits) resp->add_logprobs(l - lse);
    resp->mutable_usage()->set_prompt_tokens(stats.prompt_tokens);
    resp->mutable_usage()->set_cached_tokens(stats.cached_tokens);
    resp->mutable_usage()->set_encoded_tokens(stats.encoded_tokens);
    return absl::OkStatus();
  };
  absl::Status s = run();
  LogRequest("decoder", "Score", s,
             absl::StrFormat("mode=%s contexts=%d prompt_tokens=%d cached_tokens=%d cache_load_ms=%.2f prefill_ms=%.2f total_ms=%.2f",
                             v1::Mode_Name(req->mode()), req->contexts_size(), stats.prompt_tokens, stats.cached_tokens,
                             stats.cache_load_ms, stats.prefill_ms, MsSince(t0)));
  return ToGrpcStatus(s);
}

grpc::Status DecoderService::ModelInfo(grpc::ServerContext*, const v1::ModelInfoRequest*, v1::ModelInfoResponse* resp) {
  DescribeModel(model_, resp);
  LogRequest("decoder", "ModelInfo", absl::OkStatus(), "");
  return grpc::Status::OK;
}

}  // namespace ape
