// The thread count has one owner: a parallel loop run from any thread (gRPC
// handler threads included) runs on ComputeThreads() threads, every index
// exactly once, nested and concurrent loops included.
#include "common/engine/threading.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

namespace ape {
namespace {

// True if `threads` indices of one ParallelFor ran at the same time: each
// index waits (up to 10 s) until all of them have started.
bool RanConcurrently(int threads) {
  std::atomic<int> started{0};
  std::atomic<bool> all{true};
  ParallelFor(threads, /*dynamic=*/true, [&](int64_t) {
    started++;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (started.load() < threads) {
      if (std::chrono::steady_clock::now() > deadline) {
        all = false;
        return;
      }
      std::this_thread::yield();
    }
  });
  return all.load();
}

TEST(ThreadingTest, RequestThreadsRunWithTheConfiguredCount) {
  for (int threads : {1, 2, 3}) {
    SetComputeThreads(threads);
    EXPECT_EQ(ComputeThreads(), threads);
    // From a fresh thread, as a gRPC handler would call it.
    bool concurrent = false;
    std::thread t([&] { concurrent = RanConcurrently(threads); });
    t.join();
    EXPECT_TRUE(concurrent) << threads << " threads";
  }
}

TEST(ThreadingTest, NoMoreThreadsThanConfigured) {
  SetComputeThreads(2);
  std::mutex mu;
  std::set<std::thread::id> ids;
  for (int rep = 0; rep < 50; ++rep) {
    ParallelFor(64, rep % 2 == 0, [&](int64_t) {
      std::lock_guard lock(mu);
      ids.insert(std::this_thread::get_id());
    });
  }
  EXPECT_LE(ids.size(), 2u);
}

TEST(ThreadingTest, EveryIndexRunsOnce) {
  SetComputeThreads(2);
  for (bool dynamic : {false, true}) {
    for (int64_t n : {0, 1, 2, 7, 1000}) {
      std::vector<std::atomic<int>> hits(n);
      ParallelFor(n, dynamic, [&](int64_t i) { hits[i]++; });
      for (auto& h : hits) EXPECT_EQ(h.load(), 1) << n;
    }
  }
}

// Many short loops back to back (workers that wake late must not take a
// piece of the next loop), nested loops (run inline) and loops started from
// several threads at once (one holds the pool, the others run inline).
TEST(ThreadingTest, ManyNestedAndConcurrentLoops) {
  SetComputeThreads(2);
  std::atomic<int64_t> total{0};
  for (int rep = 0; rep < 20000; ++rep) ParallelFor(3, rep % 2 == 0, [&](int64_t i) { total += i + 1; });
  EXPECT_EQ(total.load(), 20000 * 6);

  total = 0;
  ParallelFor(8, /*dynamic=*/true, [&](int64_t) { ParallelFor(10, false, [&](int64_t i) { total += i; }); });
  EXPECT_EQ(total.load(), 8 * 45);

  total = 0;
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&] {
      for (int rep = 0; rep < 500; ++rep) ParallelFor(16, rep % 2 == 0, [&](int64_t i) { total += i; });
    });
  }
  for (auto& t : callers) t.join();
  EXPECT_EQ(total.load(), 4 * 500 * 120);
}

TEST(ThreadingTest, ZeroMeansOnePerCore) {
  SetComputeThreads(0);
  EXPECT_EQ(ComputeThreads(), static_cast<int>(std::thread::hardware_concurrency()));
}

}  // namespace
}  // namespace ape
