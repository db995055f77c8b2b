// Per-request key/value cache. Slots are filled in order; each slot carries
// its own position, because APE reuses positions across contexts (slot index
// != position). A token computed at slot s attends to slots [0, s].
//
// Storage is a sequence of segments, each a run of consecutive slots:
//
//   [ read-only segment | read-only segment | ... | writable segment        ]
//     slots [0, a)        [a, b)                    [writable_begin, capacity)
//
// A read-only segment views K/V that live elsewhere, in float16, float32 or
// int8 (rows with per-head scales, below), in any layout with a fixed byte
// stride between slots and between layers
// (a cache entry's payload, used in place: kv_block.h AttachKvBlock), kept
// alive by a shared owner (the entry, which the decoder's hot cache may
// share with other requests). The writable segment is float32, laid out
// [layer][slot][kv_head][head_dim], in memory from the process-wide KvPool:
// the transformer writes the K/V of the tokens it computes there through
// key()/value(). `KvCache(config, capacity)` is all writable (an encoder's
// or a SEQUENTIAL request's cache).
//
// Readers that do not care where a slot lives go through ForEachRun (runs of
// slots inside one segment), as the attention's LoadKvTile does.
#ifndef APESERVE_COMMON_ENGINE_KV_CACHE_H_
#define APESERVE_COMMON_ENGINE_KV_CACHE_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "common/engine/model.h"

namespace ape {

// ---- The pool ----------------------------------------------------------------
//
// Process-wide memory for KV caches: chunks mapped with mmap (2 MiB
// transparent huge pages where the kernel allows), handed out by size class
// and kept when released, so that a warm server neither allocates nor
// page-faults per request. Size classes are 4 steps per doubling from 64 KiB
// (a chunk wastes at most 19% of its size); a request for class c also takes
// an idle chunk of class c + 1.
//
// Bound: the pool keeps at most max_idle_bytes of idle chunks (default
// 1 GiB). A chunk released beyond that, and the oldest idle chunks when a new
// one must be mapped while over it, are unmapped: memory in use is bounded by
// the requests themselves (the decoder's --max_kv_slots times its concurrent
// requests), idle memory by the pool.
class KvPool {
 public:
  // A chunk of at least the bytes asked for, 64-byte aligned, contents
  // undefined. Released to its pool when destroyed (the pool must outlive it:
  // the global one does).
  class Chunk {
   public:
    Chunk() = default;
    Chunk(Chunk&& o) noexcept { *this = std::move(o); }
    Chunk& operator=(Chunk&& o) noexcept;
    Chunk(const Chunk&) = delete;
    Chunk& operator=(const Chunk&) = delete;
    ~Chunk() { Reset(); }
    void* data() const { return data_; }
    size_t bytes() const { return bytes_; }
    void Reset();

   private:
    friend class KvPool;
    KvPool* pool_ = nullptr;
    void* data_ = nullptr;
    size_t bytes_ = 0;  // the class size: what was mapped
    int size_class_ = 0;
  };

  explicit KvPool(size_t max_idle_bytes = size_t{1} << 30);
  ~KvPool();  // unmaps the idle chunks (chunks still in use must not outlive it)
  KvPool(const KvPool&) = delete;
  KvPool& operator=(const KvPool&) = delete;

  // The pool every KvCache uses.
  static KvPool& Global();

  // A chunk of at least `bytes` (> 0) bytes. Aborts if the system is out of
  // memory, as operator new would.
  Chunk Acquire(size_t bytes);

  void set_max_idle_bytes(size_t bytes);
  // Unmaps every idle chunk.
  void Trim();

  struct Stats {
    size_t in_use_bytes = 0;  // chunks handed out
    size_t idle_bytes = 0;    // chunks kept for reuse
    int64_t acquired = 0;     // Acquire calls
    int64_t reused = 0;       // ... served by an idle chunk
    int64_t mapped = 0;       // chunks mapped
    int64_t unmapped = 0;     // chunks unmapped
  };
  Stats stats() const;

 private:
  struct Idle {
    void* data;
    int size_class;
    uint64_t released;  // release order, to unmap the oldest first
  };
  void Release(void* data, size_t bytes, int size_class);
  void UnmapOldestLocked();

  mutable std::mutex mu_;
  size_t max_idle_bytes_;
  std::vector<std::vector<Idle>> idle_;  // [size class], most recent last
  uint64_t release_counter_ = 0;
  Stats stats_;
};

// ---- Segments ----------------------------------------------------------------

enum class KvElement : uint8_t { kFloat32, kFloat16, kInt8 };

// An int8 row (one slot's keys, or its values) is kv_dim signed bytes, then
// one float32 scale per KV head:
//
//   offset            size            field
//   0                 kv_dim          int8 q[n_kv_heads][head_dim]
//   kv_dim            4 * n_kv_heads  float32 scale[n_kv_heads]
//
// value[h][d] = scale[h] * q[h][d]. A head's scale is its largest |value| /
// 127, so q lies in [-127, 127] and the error is at most scale / 2 (a head of
// zeros has scale 0). A little over half float16's bytes at head_dim 64 (136
// against 256 bytes a row for 2 KV heads). The scales are at any 1-byte offset when
// kv_dim is odd: read them with memcpy (Int8Scale).
size_t KvRowBytes(KvElement element, int n_kv_heads, int head_dim);
inline float Int8Scale(const uint8_t* row, int kv_dim, int head) {
  float s;
  std::memcpy(&s, row + kv_dim + sizeof(float) * head, sizeof(s));
  return s;
}
// Head `head` of an int8 row as head_dim floats, scale times each value:
// the one conversion every reader of int8 rows goes through (inline, so the
// attention's tile copy vectorizes it).
inline void DequantizeInt8Head(const uint8_t* row, int kv_dim, int head, int head_dim, float* out) {
  const float scale = Int8Scale(row, kv_dim, head);
  const int8_t* q = reinterpret_cast<const int8_t*>(row) + static_cast<size_t>(head) * head_dim;
  for (int d = 0; d < head_dim; ++d) out[d] = scale * static_cast<float>(q[d]);
}
// One row of kv_dim floats to int8 (the layout above) and back.
void QuantizeInt8Row(const float* x, int n_kv_heads, int head_dim, uint8_t* row);
void DequantizeInt8Row(const uint8_t* row, int n_kv_heads, int head_dim, float* x);
// A K or V row stored as `element` as kv_dim floats: the row itself when it
// is float32, else converted into `buf` (kv_dim floats).
const float* RowAsFloat(KvElement element, const uint8_t* row, int n_kv_heads, int head_dim, float* buf);

// Slots [first_slot, first_slot + count) of a cache. The key row (kv_dim
// elements, KvRowBytes bytes) of slot first_slot + j in layer l is at
//   k + l * layer_stride + j * row_stride   (bytes), and likewise for v.
struct KvSegment {
  int first_slot = 0;
  int count = 0;
  KvElement element = KvElement::kFloat32;
  const uint8_t* k = nullptr;
  const uint8_t* v = nullptr;
  size_t layer_stride = 0;
  size_t row_stride = 0;
  std::shared_ptr<const void> owner;  // keeps a read-only segment's bytes alive

  const uint8_t* key_row(int layer, int slot) const {
    return k + layer * layer_stride + static_cast<size_t>(slot - first_slot) * row_stride;
  }
  const uint8_t* value_row(int layer, int slot) const {
    return v + layer * layer_stride + static_cast<size_t>(slot - first_slot) * row_stride;
  }
};

// The writable float32 storage seen as one flat array (the K or the V half):
// what tests and benchmarks fill directly. [layer][writable slot][kv_dim].
struct KvFloatArray {
  float* p = nullptr;
  size_t n = 0;
  float* data() const { return p; }
  size_t size() const { return n; }
  float* begin() const { return p; }
  float* end() const { return p + n; }
  float& operator[](size_t i) const { return p[i]; }
};

struct KvCache {
  // All `capacity` slots writable float32.
  KvCache(const ModelConfig& config, int capacity) : KvCache(config, capacity, 0) {}
  // Slots [0, writable_begin) filled by AppendReadOnly, [writable_begin,
  // capacity) writable float32.
  KvCache(const ModelConfig& config, int capacity, int writable_begin);
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  const int n_layers;
  const int n_kv_heads;
  const int kv_dim;          // n_kv_heads * head_dim
  const int capacity;        // slots allocated
  const int writable_begin;  // first slot of the writable segment
  int size = 0;              // slots in use: [0, size)
  // Slots >= size hold garbage until written; nothing reads them.
  std::vector<int32_t> pos;  // [slot] RoPE position of the slot
  // The writable segment's K and V: [layer][slot - writable_begin][kv_dim].
  KvFloatArray k, v;

  // Writable rows (slot >= writable_begin): kv_dim floats, consecutive slots
  // of a layer consecutive in memory.
  float* key(int layer, int slot) { return k.p + Row(layer, slot); }
  float* value(int layer, int slot) { return v.p + Row(layer, slot); }
  // Float32 rows, writable or of a float32 read-only segment (nullptr for a
  // float16 slot: use ForEachRun or ReadRow).
  const float* key(int layer, int slot) const;
  const float* value(int layer, int slot) const;

  // Appends a read-only segment of `count` slots at slot `size` (its
  // first_slot is set here), with positions first_position.., and advances
  // `size`. FAILED_PRECONDITION, changing nothing, unless the slots fit
  // before writable_begin and count > 0.
  absl::Status AppendReadOnly(KvSegment segment, int first_position);

  // The segments in slot order (the writable one last, when it has slots).
  const std::vector<KvSegment>& segments() const { return segments_; }
  // The segment holding `slot` (< capacity).
  const KvSegment& SegmentOf(int slot) const;
  // Calls f(segment, first slot, count) for the runs of [begin, begin + n)
  // that lie in one segment each, in order.
  template <typename F>
  void ForEachRun(int begin, int n, const F& f) const {
    for (int s = begin, end = begin + n; s < end;) {
      const KvSegment& seg = SegmentOf(s);
      const int run = std::min(end, seg.first_slot + seg.count) - s;
      f(seg, s, run);
      s += run;
    }
  }
  // Key and value rows of `slot` as float32 (kv_dim each), from any segment.
  void ReadRow(int layer, int slot, float* key_out, float* value_out) const;

  // Bytes the cache reads per layer over slots [0, n): its K/V at their
  // stored widths.
  size_t KvBytesRead(int n) const;

 private:
  size_t Row(int layer, int slot) const {
    return (static_cast<size_t>(layer) * (capacity - writable_begin) + (slot - writable_begin)) * kv_dim;
  }
  KvPool::Chunk memory_;  // the writable segment
  std::vector<KvSegment> segments_;
};

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_KV_CACHE_H_
