#include "common/server/model_info.h"

#include "common/engine/chat_template.h"
#include "common/kv/kv_block.h"

namespace ape {

void DescribeModel(const Model& m, v1::ModelInfoResponse* r) {
  const ModelConfig& c = m.config();
  r->set_architecture(c.architecture);
  r->set_fingerprint(m.fingerprint());
  r->set_vocab_size(c.vocab_size);
  r->set_dim(c.dim);
  r->set_n_layers(c.n_layers);
  r->set_n_heads(c.n_heads);
  r->set_n_kv_heads(c.n_kv_heads);
  r->set_head_dim(c.head_dim);
  r->set_context_length(c.context_length);
  r->set_bos_id(m.tokenizer().bos_id());
  r->set_eos_id(m.tokenizer().eos_id());
  r->set_kv_bytes_per_token_float16(KvBytesPerToken(c, KvDtype::kFloat16));
  r->set_kv_bytes_per_token_float32(KvBytesPerToken(c, KvDtype::kFloat32));
  r->set_kv_bytes_per_token_int8(KvBytesPerToken(c, KvDtype::kInt8));
  r->set_model_path(m.path());
  r->set_chat_template(ChatFamilyName(DetectChatFormat(m.chat_template()).family));
  r->set_add_bos(m.tokenizer().add_bos());
}

}  // namespace ape
