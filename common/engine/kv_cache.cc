#include "common/engine/kv_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/engine/half.h"

namespace ape {
namespace {

// Size classes: class 0 is up to 64 KiB, then 4 classes per doubling, each
// size rounded up to whole 4 KiB pages. 160 classes reach past 2^50 bytes.
constexpr size_t kSmallest = size_t{64} << 10;
constexpr size_t kPage = 4096;
constexpr int kClasses = 160;
constexpr size_t kHugePage = size_t{2} << 20;

size_t ClassBytes(int c) {
  const double b = static_cast<double>(kSmallest) * std::exp2(c / 4.0);
  return (static_cast<size_t>(std::ceil(b)) + kPage - 1) / kPage * kPage;
}

int ClassOf(size_t bytes) {
  int c = 0;
  while (ClassBytes(c) < bytes) ++c;
  return c;
}

void* Map(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "KvPool: cannot map %zu bytes\n", bytes);
    std::abort();  // as operator new does when memory runs out
  }
  // Huge pages: 512 times fewer page faults when a chunk is first touched.
  if (bytes >= kHugePage) (void)madvise(p, bytes, MADV_HUGEPAGE);
  return p;
}

}  // namespace

// ---- KvPool -------------------------------------------------------------------

KvPool::Chunk& KvPool::Chunk::operator=(Chunk&& o) noexcept {
  if (this != &o) {
    Reset();
    std::swap(pool_, o.pool_);
    std::swap(data_, o.data_);
    std::swap(bytes_, o.bytes_);
    std::swap(size_class_, o.size_class_);
  }
  return *this;
}

void KvPool::Chunk::Reset() {
  if (pool_ != nullptr) pool_->Release(data_, bytes_, size_class_);
  pool_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

KvPool::KvPool(size_t max_idle_bytes) : max_idle_bytes_(max_idle_bytes), idle_(kClasses) {}

KvPool::~KvPool() { Trim(); }

KvPool& KvPool::Global() {
  static KvPool* pool = new KvPool();  // never destroyed: caches may outlive static destruction
  return *pool;
}

KvPool::Chunk KvPool::Acquire(size_t bytes) {
  const int c = ClassOf(std::max<size_t>(bytes, 1));
  Chunk chunk;
  chunk.pool_ = this;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.acquired;
    for (int take : {c, c + 1}) {
      if (take >= kClasses || idle_[take].empty()) continue;
      const Idle idle = idle_[take].back();
      idle_[take].pop_back();
      chunk.data_ = idle.data;
      chunk.bytes_ = ClassBytes(take);
      chunk.size_class_ = take;
      stats_.idle_bytes -= chunk.bytes_;
      stats_.in_use_bytes += chunk.bytes_;
      ++stats_.reused;
      return chunk;
    }
    // A new mapping: first make room under the idle bound for what it will
    // return (the oldest idle chunks go).
    while (stats_.idle_bytes > 0 && stats_.idle_bytes + ClassBytes(c) > max_idle_bytes_) UnmapOldestLocked();
    ++stats_.mapped;
    stats_.in_use_bytes += ClassBytes(c);
  }
  chunk.bytes_ = ClassBytes(c);
  chunk.size_class_ = c;
  chunk.data_ = Map(chunk.bytes_);
  return chunk;
}

void KvPool::Release(void* data, size_t bytes, int size_class) {
  std::unique_lock<std::mutex> lock(mu_);
  stats_.in_use_bytes -= bytes;
  if (bytes > max_idle_bytes_) {
    ++stats_.unmapped;
    lock.unlock();
    munmap(data, bytes);
    return;
  }
  idle_[size_class].push_back({data, size_class, release_counter_++});
  stats_.idle_bytes += bytes;
  while (stats_.idle_bytes > max_idle_bytes_) UnmapOldestLocked();
}

void KvPool::UnmapOldestLocked() {
  int oldest = -1;
  for (int c = 0; c < kClasses; ++c) {
    // Within a class the oldest is first.
    if (!idle_[c].empty() && (oldest < 0 || idle_[c].front().released < idle_[oldest].front().released)) oldest = c;
  }
  if (oldest < 0) return;
  const Idle idle = idle_[oldest].front();
  idle_[oldest].erase(idle_[oldest].begin());
  const size_t bytes = ClassBytes(oldest);
  stats_.idle_bytes -= bytes;
  ++stats_.unmapped;
  munmap(idle.data, bytes);
}

void KvPool::set_max_idle_bytes(size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  max_idle_bytes_ = bytes;
  while (stats_.idle_bytes > max_idle_bytes_) UnmapOldestLocked();
}

void KvPool::Trim() {
  std::lock_guard<std::mutex> lock(mu_);
  while (stats_.idle_bytes > 0) UnmapOldestLocked();
}

KvPool::Stats KvPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

// ---- Rows ---------------------------------------------------------------------

size_t KvRowBytes(KvElement element, int n_kv_heads, int head_dim) {
  const size_t values = static_cast<size_t>(n_kv_heads) * head_dim;
  switch (element) {
    case KvElement::kFloat32: return values * sizeof(float);
    case KvElement::kFloat16: return values * sizeof(uint16_t);
    case KvElement::kInt8: return values + n_kv_heads * sizeof(float);
  }
  return 0;
}

void QuantizeInt8Row(const float* x, int n_kv_heads, int head_dim, uint8_t* row) {
  const int kv_dim = n_kv_heads * head_dim;
  for (int h = 0; h < n_kv_heads; ++h) {
    const float* xh = x + static_cast<size_t>(h) * head_dim;
    float amax = 0.f;
    for (int d = 0; d < head_dim; ++d) amax = std::max(amax, std::fabs(xh[d]));
    const float scale = amax / 127.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int8_t* q = reinterpret_cast<int8_t*>(row) + static_cast<size_t>(h) * head_dim;
    for (int d = 0; d < head_dim; ++d) {
      q[d] = static_cast<int8_t>(std::clamp(std::nearbyint(xh[d] * inv), -127.f, 127.f));
    }
    std::memcpy(row + kv_dim + sizeof(float) * h, &scale, sizeof(scale));
  }
}

void DequantizeInt8Row(const uint8_t* row, int n_kv_heads, int head_dim, float* x) {
  const int kv_dim = n_kv_heads * head_dim;
  for (int h = 0; h < n_kv_heads; ++h)
    DequantizeInt8Head(row, kv_dim, h, head_dim, x + static_cast<size_t>(h) * head_dim);
}

const float* RowAsFloat(KvElement element, const uint8_t* row, int n_kv_heads, int head_dim, float* buf) {
  switch (element) {
    case KvElement::kFloat32: return reinterpret_cast<const float*>(row);
    case KvElement::kFloat16:
      HalfToFloat(reinterpret_cast<const uint16_t*>(row), buf, size_t{1} * n_kv_heads * head_dim);
      break;
    case KvElement::kInt8: DequantizeInt8Row(row, n_kv_heads, head_dim, buf); break;
  }
  return buf;
}

// ---- KvCache ------------------------------------------------------------------

KvCache::KvCache(const ModelConfig& config, int capacity, int writable_begin)
    : n_layers(config.n_layers),
      n_kv_heads(config.n_kv_heads),
      kv_dim(config.kv_dim()),
      capacity(capacity),
      writable_begin(std::clamp(writable_begin, 0, capacity)),
      pos(capacity) {
  const size_t floats = static_cast<size_t>(n_layers) * (capacity - this->writable_begin) * kv_dim;
  if (floats > 0) {
    memory_ = KvPool::Global().Acquire(2 * floats * sizeof(float));
    k = {static_cast<float*>(memory_.data()), floats};
    v = {k.p + floats, floats};
    KvSegment w;
    w.first_slot = this->writable_begin;
    w.count = capacity - this->writable_begin;
    w.element = KvElement::kFloat32;
    w.k = reinterpret_cast<const uint8_t*>(k.p);
    w.v = reinterpret_cast<const uint8_t*>(v.p);
    w.row_stride = static_cast<size_t>(kv_dim) * sizeof(float);
    w.layer_stride = w.row_stride * w.count;
    segments_.push_back(std::move(w));
  }
}

absl::Status KvCache::AppendReadOnly(KvSegment segment, int first_position) {
  if (segment.count <= 0 || static_cast<int64_t>(size) + segment.count > writable_begin) {
    return absl::FailedPreconditionError(absl::StrCat("a read-only run of ", segment.count,
                                                      " slots does not fit slots ", size, "..", writable_begin,
                                                      " of the KV cache"));
  }
  segment.first_slot = size;
  for (int i = 0; i < segment.count; ++i) pos[size + i] = first_position + i;
  size += segment.count;
  // Before the writable segment, if there is one (always last).
  const bool has_writable = memory_.data() != nullptr;
  segments_.insert(has_writable ? segments_.end() - 1 : segments_.end(), std::move(segment));
  return absl::OkStatus();
}

const KvSegment& KvCache::SegmentOf(int slot) const {
  // The last segment starting at or before `slot`.
  auto it = std::upper_bound(segments_.begin(), segments_.end(), slot,
                             [](int s, const KvSegment& seg) { return s < seg.first_slot; });
  return *(it - 1);
}

const float* KvCache::key(int layer, int slot) const {
  if (slot >= writable_begin) return k.p + Row(layer, slot);
  const KvSegment& seg = SegmentOf(slot);
  if (seg.element != KvElement::kFloat32) return nullptr;
  return reinterpret_cast<const float*>(seg.key_row(layer, slot));
}

const float* KvCache::value(int layer, int slot) const {
  if (slot >= writable_begin) return v.p + Row(layer, slot);
  const KvSegment& seg = SegmentOf(slot);
  if (seg.element != KvElement::kFloat32) return nullptr;
  return reinterpret_cast<const float*>(seg.value_row(layer, slot));
}

void KvCache::ReadRow(int layer, int slot, float* key_out, float* value_out) const {
  const KvSegment& seg = SegmentOf(slot);
  for (auto [row, out] :
       {std::pair{seg.key_row(layer, slot), key_out}, std::pair{seg.value_row(layer, slot), value_out}}) {
    const float* x = RowAsFloat(seg.element, row, n_kv_heads, kv_dim / n_kv_heads, out);
    if (x != out) std::memcpy(out, x, kv_dim * sizeof(float));
  }
}

size_t KvCache::KvBytesRead(int n) const {
  size_t bytes = 0;
  ForEachRun(0, n, [&](const KvSegment& seg, int, int count) {
    bytes += 2 * static_cast<size_t>(count) * KvRowBytes(seg.element, n_kv_heads, kv_dim / n_kv_heads);
  });
  return bytes;
}

}  // namespace ape
