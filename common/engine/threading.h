// The one owner of the compute threads: the engine's parallel loops
// (ParallelFor) and OpenBLAS's.
//
// Thread contract: every parallel loop of the engine goes through
// ParallelFor, which runs on ComputeThreads() threads whichever thread calls
// it (gRPC handler threads included). OpenBLAS is kept at one thread: a
// matrix product that wants several cores splits itself into bands through
// ParallelFor (matvec.cc), so there is one pool of compute threads, never two
// competing for the same cores.
//
// Why not OpenMP, and why not OpenBLAS's own threads: on a machine whose
// cores are shared with other processes, a parallel loop in which every
// thread owns a fixed share (an OpenMP team: the region ends only when
// every team thread has arrived) runs at the speed of its most descheduled
// thread. Decode runs about ten loops per layer, a few hundred per token,
// and each waited for a thread to get its core back: 2-thread decode of
// the small models dropped up to tenfold while another process was busy
// (and more while OpenBLAS's threads, after a sgemm, spun on the same two
// cores). ParallelFor's pool hands out work in pieces that whichever thread
// is running takes; the caller works too, and returns as soon as every
// piece is done, without waiting for threads that never got to run: with
// one core taken away, a loop runs at one core's speed, not at the
// scheduler's. Workers spin briefly between loops (decode issues them tens
// of microseconds apart), then sleep.
#ifndef APESERVE_COMMON_ENGINE_THREADING_H_
#define APESERVE_COMMON_ENGINE_THREADING_H_

#include <cstdint>

namespace ape {

// n <= 0: one thread per core. Call at start-up, before requests run (it
// waits for running loops, and restarts the pool's workers).
void SetComputeThreads(int n);
int ComputeThreads();

namespace internal {
using LoopBody = void (*)(const void* body, int64_t begin, int64_t end);
void RunParallel(int64_t n, int64_t grain, LoopBody run, const void* body);
}  // namespace internal

// body(i) for i in [0, n) on up to ComputeThreads() threads (the caller is
// one of them). `dynamic`: hand out one index at a time (uneven work, e.g.
// attention tasks); otherwise runs of indices, about four per thread (even
// work, e.g. matrix rows). Which thread runs which index is not fixed; the
// loop returns when every index has run. A ParallelFor inside a body, or
// while another thread's ParallelFor holds the pool, runs on the calling
// thread alone.
template <typename Body>
void ParallelFor(int64_t n, bool dynamic, const Body& body) {
  if (n <= 0) return;
  const int threads = ComputeThreads();
  if (n == 1 || threads == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  const int64_t grain = dynamic ? 1 : (n + 4 * threads - 1) / (4 * threads);
  internal::RunParallel(
      n, grain,
      [](const void* b, int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) (*static_cast<const Body*>(b))(i);
      },
      &body);
}

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_THREADING_H_
