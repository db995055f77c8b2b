// libFuzzer target: a KV block read from Redis, through everything the
// decoder does with it before use: ParseKvBlock, the checks against the
// model (CheckKvBlockMatches) and the key (CheckKvBlockKey), and LoadKvBlock
// into a small per-request cache. Each input is tried twice: as it is, and
// re-sealed (its trailing checksum recomputed), since anyone who can write
// to Redis can seal what they like; the re-sealed run is what reaches the
// code past the checksum.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <string>

#include "common/kv/cache_key.h"
#include "common/kv/kv_block.h"
#include "xxhash.h"

namespace {

// The decoder's side: a tiny model shape, a cache of 64 slots.
ape::ModelConfig Config() {
  ape::ModelConfig c;
  c.dim = 8;
  c.hidden_dim = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 4;
  c.vocab_size = 16;
  return c;
}

void TryBlock(std::span<const uint8_t> bytes, const ape::Hash128& key, uint8_t dest_slot) {
  auto view = ape::ParseKvBlock(bytes);
  if (!view.ok()) return;
  static const ape::ModelConfig config = Config();
  const ape::KvBlockHeader& h = view->header;
  (void)ape::CheckKvBlockMatches(*view, h.model_fingerprint, config, h.dtype, h.kind, h.prefix_key);
  (void)ape::CheckKvBlockKey(*view, key, view->tokens);
  ape::KvCache cache(config, 64);
  if (ape::LoadKvBlock(*view, cache, dest_slot % 80).ok()) {
    // Loaded: every slot written must lie inside the cache (ASan would have
    // caught a write past it) and the positions follow the header.
    if (cache.pos[dest_slot % 80] != static_cast<int32_t>(h.first_position)) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 17) return 0;
  // Byte 0 picks the destination slot; the key the block was "read from" is
  // the next 16 bytes; the rest is the block.
  const uint8_t dest_slot = data[0];
  ape::Hash128 key;
  std::memcpy(key.data(), data + 1, key.size());
  std::span<const uint8_t> block(data + 17, size - 17);
  TryBlock(block, key, dest_slot);
  if (block.size() >= ape::kKvChecksumBytes) {
    std::string sealed(reinterpret_cast<const char*>(block.data()), block.size());
    const size_t body = sealed.size() - ape::kKvChecksumBytes;
    const XXH128_hash_t h = XXH3_128bits(sealed.data(), body);
    const ape::Hash128 sum = ape::HashFromHalves(h.high64, h.low64);
    std::memcpy(sealed.data() + body, sum.data(), sum.size());
    TryBlock({reinterpret_cast<const uint8_t*>(sealed.data()), sealed.size()}, key, dest_slot);
  }
  return 0;
}
