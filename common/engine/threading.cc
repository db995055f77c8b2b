#include "common/engine/threading.h"

#include <omp.h>

#include <atomic>

extern "C" void openblas_set_num_threads(int);

namespace ape {
namespace {
std::atomic<int> g_threads{0};  // 0 = not set yet: one per core
}  // namespace

void SetComputeThreads(int n) {
  if (n <= 0) n = omp_get_num_procs();
  g_threads.store(n, std::memory_order_relaxed);
  openblas_set_num_threads(n);
}

int ComputeThreads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_num_procs();
}

}  // namespace ape
