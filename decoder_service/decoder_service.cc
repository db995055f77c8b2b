#include "decoder_service/decoder_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/engine/status_macros.h"
#include "common/kv/cache_key.h"
#include "common/server/kv_dtype.h"
#include "common/server/metrics.h"
#include "common/server/model_info.h"
#include "common/server/segments.h"

namespace ape {
namespace {

// API limits and defaults (decoder.proto documents each).
constexpr uint32_t kDefaultMaxTokens = 128;  // max_tokens 0
// Larger max_tokens are read as this (so the int holds them), then checked
// against --max_new_tokens.
constexpr uint32_t kMaxTokensAsked = 1u << 20;
constexpr int kMaxStopStrings = 16;
constexpr size_t kMaxStopBytes = 256;
constexpr uint32_t kMaxTopLogprobs = 20;
// The longest an encode through --encoder may take within a request.
constexpr std::chrono::minutes kRemoteEncodeTimeout(10);

// A call the client cancelled is DEADLINE_EXCEEDED when its deadline passed.
absl::Status AtDeadline(grpc::ServerContext* ctx, absl::Status s) {
  if (s.code() == absl::StatusCode::kCancelled && ctx->IsCancelled() &&
      ctx->deadline() < std::chrono::system_clock::now()) {
    return absl::DeadlineExceededError("deadline passed");
  }
  return s;
}

v1::GenerateResponse TokenMessage(const TokenEvent& ev, const Tokenizer& tok) {
  v1::GenerateResponse msg;
  v1::TokenDelta* d = msg.mutable_token();
  d->set_id(ev.id);
  d->set_text(ToValidUtf8(ev.text));
  d->set_logprob(ev.logprob);
  for (const auto& [id, lp] : ev.top) {
    auto* t = d->add_top_logprobs();
    t->set_id(id);
    t->set_piece(ToValidUtf8(tok.piece(id)));
    t->set_logprob(lp);
  }
  return msg;
}

// T or S of a request: 0 (the preset) or in [kMinApeParam, kMaxApeParam].
absl::Status CheckApeParam(float value, const char* name) {
  if (value == 0.f || (value >= kMinApeParam && value <= kMaxApeParam)) return absl::OkStatus();  // NaN fails
  return absl::InvalidArgumentError(
      absl::StrFormat("%s %g is outside [%g, %g] (0 = the model's preset)", name, value, kMinApeParam, kMaxApeParam));
}

// A context key: well-formed, and echoed only as an excerpt (a key may be
// megabytes of anything).
absl::Status CheckContextKey(const std::string& key, const std::string& what) {
  static const size_t kKeyBytes = RedisKeyFor(Hash128{}).size();
  if (key.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": empty key"));
  if (key.size() == kKeyBytes && ParseRedisKey(key).ok()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": malformed cache key '", Excerpt(key), "' (expected ape:v1:kv: and 32 hex digits)"));
}

// The decoder's metrics, looked up once.
struct DecoderMetrics {
  metrics::Registry& reg = metrics::Registry::Global();
  static constexpr char kTokensHelp[] = "Prompt tokens of contexts and prefix: loaded from the cache, or encoded";
  static constexpr char kLookupHelp[] =
      "Requests with contexts: every entry from the cache (hit), or some encoded on a miss (miss)";
  metrics::Counter& cached_tokens =
      reg.GetCounter("ape_decoder_cache_tokens_total", kTokensHelp, {{"source", "cache"}});
  metrics::Counter& encoded_tokens =
      reg.GetCounter("ape_decoder_cache_tokens_total", kTokensHelp, {{"source", "encoded"}});
  metrics::Counter& hits = reg.GetCounter("ape_decoder_cache_lookups_total", kLookupHelp, {{"result", "hit"}});
  metrics::Counter& misses = reg.GetCounter("ape_decoder_cache_lookups_total", kLookupHelp, {{"result", "miss"}});
  metrics::Counter& remote_encodes = reg.GetCounter("ape_decoder_encode_on_miss_total",
                                                    "Encode calls to --encoder for contexts missing from the cache");
  metrics::Counter& remote_contexts = reg.GetCounter("ape_decoder_encode_on_miss_contexts_total",
                                                     "Contexts sent to --encoder because they were missing");
  metrics::Counter& generated =
      reg.GetCounter("ape_decoder_tokens_generated_total", "Tokens generated and streamed by Generate");
  metrics::Histogram& ttft =
      reg.GetHistogram("ape_decoder_time_to_first_token_seconds", "Generate: request arrival to the first token",
                       metrics::LatencyBuckets());
  metrics::Histogram& prefill = reg.GetHistogram(
      "ape_decoder_prefill_seconds", "Query (SEQUENTIAL: whole prompt) prefill per request", metrics::LatencyBuckets());
  metrics::Histogram& cache_load = reg.GetHistogram(
      "ape_decoder_cache_load_seconds", "Redis reads and checks of a request's entries", metrics::LatencyBuckets());
  metrics::Histogram& inter_token = reg.GetHistogram(
      "ape_decoder_inter_token_seconds", "Time between consecutive streamed tokens", metrics::LatencyBuckets());
  metrics::Gauge& streams = reg.GetGauge("ape_decoder_active_streams", "Generate streams open now (queued or running)");

  static DecoderMetrics& Get() {
    static DecoderMetrics* m = new DecoderMetrics();
    return *m;
  }
  void Record(const DecodeStats& st, int contexts) {
    cached_tokens.Inc(st.cached_tokens);
    encoded_tokens.Inc(st.encoded_tokens);
    // A request that used the cache (a SEQUENTIAL one by text reads none).
    if (contexts > 0 && st.encoded_tokens > 0)
      misses.Inc();
    else if (contexts > 0 && st.cached_tokens > 0)
      hits.Inc();
    prefill.Observe(st.prefill_ms / 1e3);
    cache_load.Observe(st.cache_load_ms / 1e3);
  }
};

void FillUsage(const DecodeStats& stats, v1::Usage* u) {
  u->set_prompt_tokens(stats.prompt_tokens);
  u->set_cached_tokens(stats.cached_tokens);
  u->set_encoded_tokens(stats.encoded_tokens);
}

}  // namespace

DecoderService::DecoderService(const Model& model, RedisStore* store, DecoderLimits limits, ApePreset preset,
                               std::shared_ptr<grpc::Channel> encoder)
    : model_(model),
      store_(store),
      limits_(limits),
      kv_budget_(MakeKvBudget(model.config(), limits.max_request_kv_mb, limits.max_prompt_tokens)),
      preset_(preset),
      chat_format_(DetectChatFormat(model.chat_template())),
      admission_(limits.max_concurrent, limits.max_queue),
      encoder_(encoder ? v1::Encoder::NewStub(encoder) : nullptr),
      hot_cache_(limits.hot_cache_mb > 0 ? std::make_unique<HotCache>(static_cast<size_t>(limits.hot_cache_mb) << 20)
                                         : nullptr),
      engine_(model, {.max_streams = limits.max_concurrent, .prefill_chunk = limits.prefill_chunk}) {
  metrics::Registry& reg = metrics::Registry::Global();
  reg.SetGaugeFunction("ape_admission_running", "Requests computing now", {{"server", "decoder"}},
                       [this] { return admission_.running(); });
  reg.SetGaugeFunction("ape_admission_waiting", "Requests queued for a compute slot now", {{"server", "decoder"}},
                       [this] { return admission_.waiting(); });
  if (HotCache* hot = hot_cache_.get()) {
    reg.SetGaugeFunction("ape_decoder_hot_cache_bytes", "Bytes of KV entries held in the decoder's memory", {},
                         [hot] { return static_cast<double>(hot->stats().bytes); });
    reg.SetCounterFunction("ape_decoder_hot_cache_hits_total", "Entries served from the decoder's memory", {},
                           [hot] { return static_cast<double>(hot->stats().hits); });
    reg.SetCounterFunction("ape_decoder_hot_cache_misses_total", "Entries looked up in memory and read from Redis", {},
                           [hot] { return static_cast<double>(hot->stats().misses); });
    reg.SetCounterFunction("ape_decoder_hot_cache_expirations_total",
                           "Entries dropped from memory because their Redis key's TTL ran out", {},
                           [hot] { return static_cast<double>(hot->stats().expirations); });
  }
  reg.SetGaugeFunction("ape_decoder_batch_streams", "Streams in the decode batch now (prefilling or decoding)", {},
                       [this] { return engine_.running(); });
  reg.SetCounterFunction("ape_decoder_batch_steps_total", "Decode steps run by the batch engine", {},
                         [this] { return static_cast<double>(engine_.steps()); });
  reg.SetCounterFunction("ape_decoder_batch_rows_total",
                         "Stream tokens computed by decode steps (rows / steps = mean batch width)", {},
                         [this] { return static_cast<double>(engine_.step_rows()); });
  reg.SetCounterFunction("ape_decoder_batch_riding_chunks_total",
                         "Prompt chunks computed inside a decode step (the weights read once for both)", {},
                         [this] { return static_cast<double>(engine_.riding_chunks()); });
  DecoderMetrics::Get();  // every series exists from the start (at 0)
}

// ---- Validation: every field, before any I/O ------------------------------

absl::Status DecoderService::ValidateApe(const v1::GenerateRequest& req, DecodeInput* in) const {
  switch (req.mode()) {
    case v1::MODE_UNSPECIFIED:
    case v1::MODE_APE: in->mode = DecodeMode::kApe; break;
    case v1::MODE_PARALLEL: in->mode = DecodeMode::kParallel; break;
    case v1::MODE_SEQUENTIAL: in->mode = DecodeMode::kSequential; break;
    default: return absl::InvalidArgumentError(absl::StrCat("unknown mode ", req.mode()));
  }
  RETURN_IF_ERROR(CheckApeParam(req.ape_temperature(), "ape_temperature"));
  RETURN_IF_ERROR(CheckApeParam(req.ape_scale(), "ape_scale"));
  // 0 = the preset's value for this request (its contexts, their length).
  in->temperature = req.ape_temperature();
  in->scale = req.ape_scale();
  in->ape_preset = [this](int contexts, int64_t context_tokens) { return preset_.For(contexts, context_tokens); };
  ASSIGN_OR_RETURN(in->dtype, KvDtypeFromProto(req.dtype(), limits_.default_dtype));
  return absl::OkStatus();
}

// Every text field (sizes, UTF-8) before anything is tokenized. Keys are
// checked by ValidateContexts (they are ASCII or malformed).
absl::Status DecoderService::CheckText(const v1::GenerateRequest& req) const {
  if (req.stop_size() > kMaxStopStrings) return absl::InvalidArgumentError("at most 16 stop strings");
  TextCheck text(limits_.text);
  RETURN_IF_ERROR(text.Add(req.prefix(), "prefix"));
  RETURN_IF_ERROR(text.Add(req.query(), "query"));
  for (int i = 0; i < req.stop_size(); ++i) RETURN_IF_ERROR(text.Add(req.stop(i), absl::StrCat("stop ", i)));
  for (int i = 0; i < req.contexts_size(); ++i) {
    if (req.contexts(i).has_text()) RETURN_IF_ERROR(text.Add(req.contexts(i).text(), absl::StrCat("context ", i)));
  }
  return absl::OkStatus();
}

absl::Status DecoderService::ValidateContexts(const v1::GenerateRequest& req, DecodeInput* in) const {
  for (int i = 0; i < req.contexts_size(); ++i) {
    const v1::ContextRef& ref = req.contexts(i);
    const std::string what = absl::StrCat("context ", i);
    ContextSource src;
    switch (ref.ref_case()) {
      case v1::ContextRef::kKey: {
        RETURN_IF_ERROR(CheckContextKey(ref.key(), what));
        src.key = ref.key();
        break;
      }
      case v1::ContextRef::kText:
      case v1::ContextRef::kTokens: {
        v1::Segment seg;
        if (ref.has_text())
          seg.set_text(ref.text());
        else
          *seg.mutable_tokens() = ref.tokens();
        ASSIGN_OR_RETURN(src.tokens, ResolveContext(seg, model_.tokenizer(), limits_.max_context_tokens, what));
        break;
      }
      default: return absl::InvalidArgumentError(absl::StrCat(what, ": set key, text or tokens"));
    }
    in->contexts.push_back(std::move(src));
  }
  return absl::OkStatus();
}

absl::Status DecoderService::ValidateGeneration(const v1::GenerateRequest& req, GenerateOptions* g) const {
  g->max_tokens =
      static_cast<int>(req.max_tokens() == 0 ? kDefaultMaxTokens : std::min(req.max_tokens(), kMaxTokensAsked));
  if (g->max_tokens > limits_.max_new_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens ", g->max_tokens, " exceeds the limit ", limits_.max_new_tokens));
  }
  for (const auto& s : req.stop()) {
    if (s.empty() || s.size() > kMaxStopBytes) return absl::InvalidArgumentError("stop strings must be 1 to 256 bytes");
  }
  g->stop.assign(req.stop().begin(), req.stop().end());
  if (req.top_logprobs() > kMaxTopLogprobs) return absl::InvalidArgumentError("top_logprobs must be 0 to 20");
  g->top_logprobs = static_cast<int>(req.top_logprobs());
  const v1::Sampling& s = req.sampling();
  g->sampling.temperature = s.temperature();
  g->sampling.top_k = s.top_k();
  g->sampling.top_p = s.top_p() == 0.f ? 1.f : s.top_p();
  g->sampling.min_p = s.min_p();
  g->sampling.repetition_penalty = s.repetition_penalty() == 0.f ? 1.f : s.repetition_penalty();
  g->sampling.seed = s.seed();
  return ValidateSamplingParams(g->sampling);
}

absl::Status DecoderService::TokenizePrompt(const v1::GenerateRequest& req, DecodeInput* in) const {
  const Tokenizer& tok = model_.tokenizer();
  const ChatFormat* chat = req.chat() ? &chat_format_ : nullptr;
  ASSIGN_OR_RETURN(in->prefix_tokens, PrefixTokens(req.prefix(), tok, chat));
  RETURN_IF_ERROR(CheckTokenCount(in->prefix_tokens.size(), limits_.max_prefix_tokens, "prefix",
                                  "--max_prefix_tokens, default the model's context length"));
  ASSIGN_OR_RETURN(in->query_tokens, QueryTokens(req.query(), tok, chat, req.contexts_size() > 0));
  RETURN_IF_ERROR(CheckTokenCount(in->query_tokens.size(), limits_.max_query_tokens, "query",
                                  "--max_query_tokens, default the model's context length"));
  return ValidateContexts(req, in);
}

// The positions the prompt and its generated tokens span (decoder.proto):
// contexts given by key count once loaded (the pipeline).
absl::Status DecoderService::CheckPositions(DecodeInput* in_out) const {
  DecodeInput& in = *in_out;
  in.max_positions = limits_.max_positions;  // the pipeline checks again once key-only contexts are loaded
  const bool sequential = in.mode == DecodeMode::kSequential;
  int64_t contexts = 0;  // SEQUENTIAL: their sum; APE, PARALLEL: the longest (they share positions)
  for (const ContextSource& c : in.contexts) {
    const int64_t n = c.tokens ? static_cast<int64_t>(c.tokens->size()) : 0;
    contexts = sequential ? contexts + n : std::max(contexts, n);
  }
  const int64_t span = static_cast<int64_t>(in.prefix_tokens.size()) + contexts +
                       static_cast<int64_t>(in.query_tokens.size()) + in.generate.max_tokens;
  if (span <= limits_.max_positions) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrFormat("the request spans %d positions (prefix %d + %s %d + query %d + max_tokens %d), the limit is %d "
                      "(--max_positions, default the model's context length)",
                      span, in.prefix_tokens.size(), sequential ? "contexts" : "longest context", contexts,
                      in.query_tokens.size(), in.generate.max_tokens, limits_.max_positions));
}

// The KV slots known now against the budget, before any I/O; contexts given
// by key count one slot each here and in full once loaded (the pipeline
// checks in->max_kv_slots then, before allocating the cache).
absl::Status DecoderService::CheckKvSlots(DecodeInput* in) const {
  // The prefix and contexts become entries in the request's dtype (used in
  // place: float16 and int8 ones count half a float32 slot), except in SEQUENTIAL,
  // which computes them all in float32.
  int64_t entry_slots = in->prefix_tokens.size();
  for (const ContextSource& c : in->contexts) entry_slots += c.tokens ? c.tokens->size() : 1;
  if (in->mode != DecodeMode::kSequential && in->dtype != KvDtype::kFloat32) entry_slots = (entry_slots + 1) / 2;
  const int64_t slots = int64_t{in->generate.max_tokens} + in->query_tokens.size() + entry_slots;
  RETURN_IF_ERROR(CheckKvBudget(kv_budget_, slots, "the request"));
  in->max_kv_slots = kv_budget_.max_slots;
  return absl::OkStatus();
}

absl::StatusOr<DecodeInput> DecoderService::Validate(const v1::GenerateRequest& req) const {
  // Sizes first: nothing is tokenized before the request is known to be small enough.
  if (req.contexts_size() > limits_.max_contexts) {
    return absl::ResourceExhaustedError(
        absl::StrCat(req.contexts_size(), " contexts, the limit is ", limits_.max_contexts, " (--max_contexts)"));
  }
  RETURN_IF_ERROR(CheckText(req));
  DecodeInput in;
  RETURN_IF_ERROR(ValidateApe(req, &in));
  RETURN_IF_ERROR(ValidateGeneration(req, &in.generate));
  in.ttl_seconds = limits_.ttl_seconds;
  RETURN_IF_ERROR(TokenizePrompt(req, &in));
  RETURN_IF_ERROR(CheckDecodeInput(in));  // e.g. an empty query
  RETURN_IF_ERROR(CheckPositions(&in));
  RETURN_IF_ERROR(CheckKvSlots(&in));
  return in;
}

// ---- What Generate and Score share ------------------------------------------

absl::StatusOr<DecoderService::Admitted> DecoderService::Admit(grpc::ServerContext* ctx, const v1::GenerateRequest& req,
                                                               Outcome* outcome) {
  ASSIGN_OR_RETURN(DecodeInput in, Validate(req));
  auto cancelled = [ctx] { return ctx->IsCancelled(); };
  const auto t_queue = Clock::now();
  absl::StatusOr<Admission::Ticket> ticket = admission_.Enter(cancelled, ctx->deadline());
  outcome->queue_ms = MsSince(t_queue);  // logged also when the request leaves the queue
  if (!ticket.ok()) return ticket.status();
  DecodeHooks hooks;
  hooks.cancelled = cancelled;
  hooks.hot_cache = hot_cache_.get();
  if (encoder_) hooks.remote_encode = [this, ctx](const EncodeInput& e) { return RemoteEncode(ctx, e); };
  return Admitted{std::move(in), std::move(hooks), *std::move(ticket)};
}

absl::Status DecoderService::RemoteEncode(grpc::ServerContext* ctx, const EncodeInput& in) {
  // The prefix goes as the ids this decoder made (BOS and, for a chat
  // request, the turn markers included), so the encoder keys the contexts
  // under exactly this request's prefix; EncodeRequest.chat stays off (it
  // applies to prefix text only).
  v1::EncodeRequest req;
  for (int32_t id : in.prefix_tokens) req.mutable_prefix()->mutable_tokens()->add_ids(id);
  for (const auto& c : in.contexts) {
    auto* ids = req.add_contexts()->mutable_tokens();
    for (int32_t id : c) ids->add_ids(id);
  }
  req.set_dtype(KvDtypeToProto(in.dtype));
  req.set_ttl_seconds(in.ttl_seconds);
  req.set_overwrite(in.overwrite);  // the pipeline read an unusable entry at one of the keys
  // Part of the request: cancelled with it, and within its deadline.
  std::unique_ptr<grpc::ClientContext> call = grpc::ClientContext::FromServerContext(*ctx);
  call->set_deadline(std::chrono::system_clock::now() + kRemoteEncodeTimeout);
  v1::EncodeResponse resp;
  DecoderMetrics::Get().remote_encodes.Inc();
  DecoderMetrics::Get().remote_contexts.Inc(req.contexts_size());
  grpc::Status s = encoder_->Encode(call.get(), req, &resp);
  if (!s.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()), absl::StrCat("encoder: ", s.error_message()));
  }
  if (resp.model_fingerprint() != model_.fingerprint()) {
    return absl::FailedPreconditionError(
        absl::StrCat("encoder serves model ", resp.model_fingerprint(), ", this decoder ", model_.fingerprint()));
  }
  return absl::OkStatus();
}

// ---- Generate: stream the answer ----------------------------------------------

void DecoderService::FillFinal(const v1::GenerateRequest& req, const DecodeInput& in, const Outcome& outcome,
                               v1::Final* f) const {
  const GenerateResult& result = outcome.result;
  f->set_finish_reason(FinishReasonName(result.reason));
  f->set_text(ToValidUtf8(result.text));
  f->set_ape_temperature(outcome.stats.ape_temperature);
  f->set_ape_scale(outcome.stats.ape_scale);
  f->set_mode(req.mode() == v1::MODE_UNSPECIFIED ? v1::MODE_APE : req.mode());
  FillUsage(outcome.stats, f->mutable_usage());
  f->mutable_usage()->set_generated_tokens(result.tokens.size());
  if (req.return_prompt_ids())
    f->mutable_prompt_ids()->Add(outcome.stats.prompt_ids.begin(), outcome.stats.prompt_ids.end());
  v1::Timings* t = f->mutable_timings();
  t->set_queue_ms(outcome.queue_ms);
  t->set_cache_load_ms(outcome.stats.cache_load_ms);
  t->set_encode_ms(outcome.stats.encode_ms);
  t->set_prefill_ms(outcome.stats.prefill_ms);
  t->set_time_to_first_token_ms(outcome.first_token_ms);
  t->set_decode_tokens_per_second(
      result.tokens.size() > 1 && result.decode_seconds > 0 ? (result.tokens.size() - 1) / result.decode_seconds : 0);
  t->set_total_ms(MsSince(outcome.arrival));
}

absl::StatusOr<std::shared_ptr<BatchStream>> DecoderService::Start(grpc::ServerContext* ctx, Admitted& call,
                                                                   bool score_only, Outcome* outcome) {
  // Loading (Redis reads, encode-on-miss) runs here, on the handler thread,
  // never on the engine's. Encoding locally (no --encoder) computes here
  // too, beside the engine.
  const int max_new_tokens = score_only ? 0 : std::max(0, call.in.generate.max_tokens);
  ASSIGN_OR_RETURN(DecodeSession session,
                   PrepareDecode(model_, store_, call.in, max_new_tokens, call.hooks, &outcome->stats));
  if (ctx->IsCancelled()) return absl::CancelledError("request cancelled while its contexts were loaded");
  // The admission slot travels with the stream and is given back by the
  // engine the moment the stream leaves the batch.
  auto ticket = std::make_shared<Admission::Ticket>(std::move(call.ticket));
  return engine_.Submit(
      {.session = std::move(session), .generate = call.in.generate, .score_only = score_only, .on_leave = [ticket] {
         ticket->Release();
       }});
}

absl::Status DecoderService::Follow(grpc::ServerContext* ctx, BatchStream& stream,
                                    const std::function<bool(const TokenEvent&)>& on_event) {
  absl::Status status;
  TokenEvent ev;
  for (;;) {
    // The client's cancel and the deadline have no wake-up of their own
    // here: look at least every kCancelPoll.
    if (status.ok()) {
      if (ctx->deadline() <= std::chrono::system_clock::now()) {
        status = absl::DeadlineExceededError("deadline passed");
      } else if (ctx->IsCancelled()) {
        status = absl::CancelledError("client cancelled");
      }
      if (!status.ok()) stream.Cancel();
    }
    const BatchStream::Next next = stream.Wait(&ev, Clock::now() + Admission::kCancelPoll);
    if (next == BatchStream::Next::kDone) return status;
    if (next == BatchStream::Next::kEvent && status.ok() && !on_event(ev)) {
      status = absl::CancelledError("the client is gone");
      stream.Cancel();  // then wait until it has left
    }
  }
}

absl::Status DecoderService::DoGenerate(grpc::ServerContext* ctx, const v1::GenerateRequest& req,
                                        grpc::ServerWriter<v1::GenerateResponse>* writer, Outcome* outcome) {
  ASSIGN_OR_RETURN(Admitted call, Admit(ctx, req, outcome));
  ASSIGN_OR_RETURN(std::shared_ptr<BatchStream> stream, Start(ctx, call, /*score_only=*/false, outcome));
  DecoderMetrics& m = DecoderMetrics::Get();
  Clock::time_point last_token;
  auto on_event = [&](const TokenEvent& ev) {
    if (outcome->first_token_ms == 0) {
      outcome->first_token_ms = MsSince(outcome->arrival);
      m.ttft.Observe(outcome->first_token_ms / 1e3);
    }
    if (ev.id >= 0) {  // -1: a final flush of held-back text, not a token
      const Clock::time_point now = Clock::now();
      if (last_token != Clock::time_point())
        m.inter_token.Observe(std::chrono::duration<double>(now - last_token).count());
      last_token = now;
      m.generated.Inc();
    }
    return writer->Write(TokenMessage(ev, model_.tokenizer()));
  };
  const absl::Status followed = Follow(ctx, *stream, on_event);
  outcome->result = stream->result();
  outcome->stats.prefill_ms = stream->prefill_ms();
  outcome->queue_ms += stream->engine_queue_ms();
  m.Record(outcome->stats, req.contexts_size());
  RETURN_IF_ERROR(followed);
  if (ctx->IsCancelled()) return absl::CancelledError("client cancelled or deadline passed");
  v1::GenerateResponse fin;
  FillFinal(req, call.in, *outcome, fin.mutable_final());
  if (!writer->Write(fin)) return absl::CancelledError("client went away before the final message");
  return absl::OkStatus();
}

std::string DecoderService::LogDetails(const v1::GenerateRequest& req, const Outcome& outcome) const {
  const DecodeStats& st = outcome.stats;
  return absl::StrFormat(
      "mode=%s contexts=%d chat=%d prompt_tokens=%d cached_tokens=%d hot_cache_tokens=%d encoded_tokens=%d "
      "ape_t=%.3g ape_s=%.3g queue_ms=%.2f cache_load_ms=%.2f encode_ms=%.2f prefill_ms=%.2f",
      v1::Mode_Name(req.mode()), req.contexts_size(), req.chat(), st.prompt_tokens, st.cached_tokens,
      st.hot_cache_tokens, st.encoded_tokens, st.ape_temperature, st.ape_scale, outcome.queue_ms, st.cache_load_ms,
      st.encode_ms, st.prefill_ms);
}

grpc::Status DecoderService::Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                                      grpc::ServerWriter<v1::GenerateResponse>* writer) {
  metrics::Gauge& streams = DecoderMetrics::Get().streams;
  streams.Add(1);
  struct Closed {
    metrics::Gauge& g;
    ~Closed() { g.Add(-1); }
  } closed{streams};
  Outcome outcome;
  const absl::Status s = AtDeadline(ctx, DoGenerate(ctx, *req, writer, &outcome));
  const GenerateResult& r = outcome.result;
  LogRequest("decoder", "Generate", s,
             absl::StrCat(LogDetails(*req, outcome),
                          absl::StrFormat(" generated=%d finish=%s ttft_ms=%.2f decode_ms=%.2f total_ms=%.2f",
                                          r.tokens.size(), FinishReasonName(r.reason), outcome.first_token_ms,
                                          r.decode_seconds * 1e3, MsSince(outcome.arrival))));
  return ToGrpcStatus(s);
}

// ---- Score: the distribution after the prompt ---------------------------------

absl::Status DecoderService::DoScore(grpc::ServerContext* ctx, const v1::GenerateRequest& req, v1::ScoreResponse* resp,
                                     Outcome* outcome) {
  ASSIGN_OR_RETURN(Admitted call, Admit(ctx, req, outcome));
  ASSIGN_OR_RETURN(std::shared_ptr<BatchStream> stream, Start(ctx, call, /*score_only=*/true, outcome));
  const absl::Status followed = Follow(ctx, *stream, [](const TokenEvent&) { return true; });
  outcome->stats.prefill_ms = stream->prefill_ms();
  outcome->queue_ms += stream->engine_queue_ms();
  DecoderMetrics::Get().Record(outcome->stats, req.contexts_size());
  RETURN_IF_ERROR(followed);
  const std::vector<float>& logits = stream->logits();
  if (ctx->IsCancelled() || logits.empty()) return absl::CancelledError("client cancelled or deadline passed");
  const float lse = LogSumExp(logits.data(), static_cast<int>(logits.size()));
  for (float l : logits) resp->add_logprobs(l - lse);
  FillUsage(outcome->stats, resp->mutable_usage());
  return absl::OkStatus();
}

grpc::Status DecoderService::Score(grpc::ServerContext* ctx, const v1::GenerateRequest* req, v1::ScoreResponse* resp) {
  Outcome outcome;
  const absl::Status s = AtDeadline(ctx, DoScore(ctx, *req, resp, &outcome));
  LogRequest("decoder", "Score", s,
             absl::StrCat(LogDetails(*req, outcome), absl::StrFormat(" total_ms=%.2f", MsSince(outcome.arrival))));
  return ToGrpcStatus(s);
}

grpc::Status DecoderService::ModelInfo(grpc::ServerContext*, const v1::ModelInfoRequest*, v1::ModelInfoResponse* resp) {
  DescribeModel(model_, resp);
  LogRequest("decoder", "ModelInfo", absl::OkStatus(), "");
  return grpc::Status::OK;
}

}  // namespace ape
