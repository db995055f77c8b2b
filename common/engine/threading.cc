#include "common/engine/threading.h"

#include <immintrin.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

extern "C" void openblas_set_num_threads(int);

namespace ape {
namespace {

using Clock = std::chrono::steady_clock;

// How long an idle worker spins for the next loop before it sleeps, and how
// long a caller spins for its last pieces before it yields its core.
constexpr auto kWorkerSpin = std::chrono::microseconds(200);
constexpr auto kCallerSpin = std::chrono::microseconds(50);

int Cores() {
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

std::atomic<int> g_threads{0};  // 0 = not set yet: one per core

// Set on pool workers, and on a caller while its loop runs: a ParallelFor
// from such a thread runs inline.
thread_local bool t_in_loop = false;

// The loop being run. A loop is cut into `pieces` runs of `grain` indices;
// `ticket` is (generation << 32 | next piece): a thread claims a piece with
// a compare-and-swap that also checks the generation, so a worker that
// wakes late, after its loop ended, can never take a piece of the next
// one. Between a successful claim and that piece's `done` increment the
// loop cannot end, so the fields a claimant read after seeing its
// generation in `ticket` are that loop's.
class Pool {
 public:
  ~Pool() { Resize(0); }

  // Stops the workers and starts `workers` new ones; waits for a running loop.
  void Resize(int workers) {
    std::lock_guard run(run_mu_);
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
    threads_.clear();
    stop_ = false;
    // The workers start from the generation of now: a loop published before
    // one of them gets to run is still new to it.
    const uint64_t gen = generation_.load(std::memory_order_acquire);
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, gen] { WorkerLoop(gen); });
    workers_.store(workers, std::memory_order_release);
  }

  int workers() const { return workers_.load(std::memory_order_acquire); }

  // False (nothing run) if another thread's loop holds the pool.
  bool TryRun(int64_t n, int64_t grain, internal::LoopBody run, const void* body) {
    std::unique_lock lock(run_mu_, std::try_to_lock);
    if (!lock.owns_lock()) return false;
    if (threads_.empty()) return false;
    t_in_loop = true;
    const int64_t pieces = (n + grain - 1) / grain;
    run_.store(run, std::memory_order_relaxed);
    body_.store(body, std::memory_order_relaxed);
    n_.store(n, std::memory_order_relaxed);
    grain_.store(grain, std::memory_order_relaxed);
    pieces_.store(pieces, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (generation_.load(std::memory_order_relaxed) + 1) & 0xffffffffu;
    ticket_.store(gen << 32, std::memory_order_release);
    generation_.store(gen, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard l(mu_); }
      cv_.notify_all();
    }
    Work(gen);
    // Wait for pieces other threads claimed: spin briefly, then give the
    // core away while waiting (the piece's owner may need it).
    const auto start = Clock::now();
    for (int spins = 0; done_.load(std::memory_order_acquire) < pieces; ++spins) {
      if (spins < 64 || Clock::now() - start < kCallerSpin) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
    t_in_loop = false;
    return true;
  }

 private:
  // Claims and runs pieces of loop `gen` until none is left.
  void Work(uint64_t gen) {
    for (;;) {
      uint64_t t = ticket_.load(std::memory_order_acquire);
      if (t >> 32 != gen) return;
      const int64_t piece = static_cast<int64_t>(t & 0xffffffffu);
      const int64_t pieces = pieces_.load(std::memory_order_relaxed);
      if (piece >= pieces) return;
      const internal::LoopBody run = run_.load(std::memory_order_relaxed);
      const void* body = body_.load(std::memory_order_relaxed);
      const int64_t n = n_.load(std::memory_order_relaxed), grain = grain_.load(std::memory_order_relaxed);
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
      const int64_t begin = piece * grain;
      run(body, begin, std::min(n, begin + grain));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void WorkerLoop(uint64_t seen) {
    t_in_loop = true;
    for (;;) {
      uint64_t gen = generation_.load(std::memory_order_acquire);
      const auto start = Clock::now();
      for (int spins = 0; gen == seen; ++spins) {
        if (spins % 64 == 63 && Clock::now() - start > kWorkerSpin) {
          std::unique_lock lock(mu_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lock, [&] { return stop_ || generation_.load(std::memory_order_seq_cst) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_relaxed);
          if (stop_) return;
        } else {
          _mm_pause();
        }
        gen = generation_.load(std::memory_order_acquire);
      }
      seen = gen;
      Work(gen);
    }
  }

  std::mutex run_mu_;  // one loop at a time; Resize
  std::vector<std::thread> threads_;
  std::atomic<internal::LoopBody> run_{nullptr};
  std::atomic<const void*> body_{nullptr};
  std::atomic<int64_t> n_{0}, grain_{1}, pieces_{0}, done_{0};
  std::atomic<uint64_t> ticket_{0}, generation_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<int> workers_{0};
  std::mutex mu_;  // sleeping workers
  std::condition_variable cv_;
  bool stop_ = false;  // guarded by mu_
};

std::mutex g_pool_mu;

Pool& ThePool() {
  static Pool* pool = new Pool;  // never destroyed: workers may outlive main's statics
  return *pool;
}

}  // namespace

void SetComputeThreads(int n) {
  if (n <= 0) n = Cores();
  std::lock_guard lock(g_pool_mu);
  g_threads.store(n, std::memory_order_relaxed);
  openblas_set_num_threads(1);
  ThePool().Resize(n - 1);
}

int ComputeThreads() {
  // OpenBLAS is one-threaded from the first loop on, whether or not
  // SetComputeThreads ran: a MatMul whose rows make a single band calls
  // sgemm without entering the pool, and a sgemm on OpenBLAS's own threads
  // sums in another order (the same prompt would give other bits the first
  // time than afterwards).
  static const bool blas_single = (openblas_set_num_threads(1), true);
  (void)blas_single;
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : Cores();
}

namespace internal {

void RunParallel(int64_t n, int64_t grain, LoopBody run, const void* body) {
  if (!t_in_loop) {
    Pool& pool = ThePool();
    if (pool.workers() + 1 != ComputeThreads()) {
      // First use without SetComputeThreads: start the workers.
      std::lock_guard lock(g_pool_mu);
      if (pool.workers() + 1 != ComputeThreads()) {
        openblas_set_num_threads(1);
        pool.Resize(ComputeThreads() - 1);
      }
    }
    if (pool.TryRun(n, grain, run, body)) return;
  }
  run(body, 0, n);
}

}  // namespace internal
}  // namespace ape
