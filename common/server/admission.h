// Admission control shared by both services: a bounded number of requests
// compute, a bounded number wait, the rest are refused at once.
#ifndef APESERVE_COMMON_SERVER_ADMISSION_H_
#define APESERVE_COMMON_SERVER_ADMISSION_H_

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>

#include "absl/status/statusor.h"

namespace ape {

// Bounds concurrent compute: at most `max_running` requests run, at most
// `max_waiting` wait; beyond that Enter() fails with RESOURCE_EXHAUSTED
// instead of queueing without bound. A waiting request leaves the queue, and
// frees its place, the moment its deadline passes, or within kCancelPoll of
// `cancelled` turning true.
class Admission {
 public:
  Admission(int max_running, int max_waiting) : max_running_(max_running), max_waiting_(max_waiting) {}
  class Ticket {
   public:
    explicit Ticket(Admission* a) : a_(a) {}
    Ticket(Ticket&& o) noexcept : a_(o.a_) { o.a_ = nullptr; }
    ~Ticket() { Release(); }
    // Gives the slot back now (once; the destructor then does nothing).
    // Not to be called concurrently with itself or the destructor.
    void Release() {
      if (a_) a_->Leave();
      a_ = nullptr;
    }

   private:
    Admission* a_;
  };
  using Deadline = std::chrono::system_clock::time_point;  // as grpc::ServerContext::deadline()
  // How often a waiting request asks `cancelled` (a client cancel has no
  // wake-up of its own; a deadline has, and is exact).
  static constexpr std::chrono::milliseconds kCancelPoll{5};

  // A compute slot, released when the Ticket dies. DEADLINE_EXCEEDED when
  // `deadline` passes first (at once if it already has: nothing is queued
  // then), CANCELLED when `cancelled` says so, RESOURCE_EXHAUSTED when the
  // queue is full.
  absl::StatusOr<Ticket> Enter(const std::function<bool()>& cancelled, Deadline deadline = Deadline::max());

  // Requests computing and waiting now (for metrics).
  int running() const {
    std::lock_guard<std::mutex> lock(mu_);
    return running_;
  }
  int waiting() const {
    std::lock_guard<std::mutex> lock(mu_);
    return waiting_;
  }

 private:
  void Leave();
  const int max_running_, max_waiting_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int running_ = 0, waiting_ = 0;  // guarded by mu_; cv_ signals running_ going down
};

}  // namespace ape

#endif  // APESERVE_COMMON_SERVER_ADMISSION_H_
