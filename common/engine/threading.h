// The one owner of the compute thread count, ours (OpenMP) and OpenBLAS's.
//
// Thread contract: OpenMP's team size (nthreads-var) is per thread, so
// omp_set_num_threads() in main() does not reach the threads gRPC runs
// handlers on. Every parallel region of the engine therefore goes through
// ParallelFor, which names its width explicitly: ComputeThreads() threads,
// whichever thread calls it. OpenBLAS's count is process-wide.
#ifndef APESERVE_COMMON_ENGINE_THREADING_H_
#define APESERVE_COMMON_ENGINE_THREADING_H_

#include <cstdint>

namespace ape {

// n <= 0: one thread per core. Call once at start-up, before requests run.
void SetComputeThreads(int n);
int ComputeThreads();

// body(i) for i in [0, n) on ComputeThreads() threads. `dynamic`: hand out
// one index at a time (uneven work, e.g. attention rows); otherwise static
// equal chunks (even work, e.g. matrix rows).
template <typename Body>
void ParallelFor(int64_t n, bool dynamic, const Body& body) {
  const int threads = n > 1 ? ComputeThreads() : 1;
  if (dynamic) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

}  // namespace ape

#endif  // APESERVE_COMMON_ENGINE_THREADING_H_
