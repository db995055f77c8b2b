// The thread count has one owner: a parallel region run from any thread
// (gRPC handler threads included) uses ComputeThreads() threads, not the
// OpenMP default of the calling thread.
#include "common/engine/threading.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <atomic>
#include <thread>
#include <vector>

namespace ape {
namespace {

// Team size seen inside a ParallelFor run on a fresh std::thread (whose
// OpenMP nthreads-var was never set by anyone).
int TeamSizeOnNewThread(int64_t n, bool dynamic) {
  std::atomic<int> team{0};
  std::thread t([&] {
    ParallelFor(n, dynamic, [&](int64_t) {
      int expected = 0;
      team.compare_exchange_strong(expected, omp_get_num_threads());
    });
  });
  t.join();
  return team.load();
}

TEST(ThreadingTest, RequestThreadsRunWithTheConfiguredCount) {
  // The calling thread's OpenMP default says something else entirely.
  omp_set_num_threads(7);
  for (int threads : {1, 2, 3}) {
    SetComputeThreads(threads);
    EXPECT_EQ(ComputeThreads(), threads);
    EXPECT_EQ(TeamSizeOnNewThread(64, /*dynamic=*/true), threads);
    EXPECT_EQ(TeamSizeOnNewThread(64, /*dynamic=*/false), threads);
  }
}

TEST(ThreadingTest, EveryIndexRunsOnce) {
  SetComputeThreads(2);
  for (bool dynamic : {false, true}) {
    std::vector<std::atomic<int>> hits(1000);
    ParallelFor(1000, dynamic, [&](int64_t i) { hits[i]++; });
    for (auto& h : hits) EXPECT_EQ(h.load(), 1);
  }
}

TEST(ThreadingTest, ZeroMeansOnePerCore) {
  SetComputeThreads(0);
  EXPECT_EQ(ComputeThreads(), omp_get_num_procs());
}

}  // namespace
}  // namespace ape
