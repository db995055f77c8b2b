// Admission control shared by both services: a bounded number of requests
// compute, a bounded number wait, the rest are refused at once.
#ifndef APESERVE_COMMON_SERVER_ADMISSION_H_
#define APESERVE_COMMON_SERVER_ADMISSION_H_

#include <condition_variable>
#include <functional>
#include <mutex>

#include "absl/status/statusor.h"

namespace ape {

// Bounds concurrent compute: at most `max_running` requests run, at most
// `max_waiting` wait; beyond that Enter() fails with RESOURCE_EXHAUSTED
// instead of queueing without bound. Waiting stops when `cancelled` says so.
class Admission {
 public:
  Admission(int max_running, int max_waiting) : max_running_(max_running), max_waiting_(max_waiting) {}
  class Ticket {
   public:
    explicit Ticket(Admission* a) : a_(a) {}
    Ticket(Ticket&& o) noexcept : a_(o.a_) { o.a_ = nullptr; }
    ~Ticket() {
      if (a_) a_->Leave();
    }

   private:
    Admission* a_;
  };
  absl::StatusOr<Ticket> Enter(const std::function<bool()>& cancelled);

 private:
  void Leave();
  const int max_running_, max_waiting_;
  std::mutex mu_;
  std::condition_variable cv_;
  int running_ = 0, waiting_ = 0;  // guarded by mu_
};

}  // namespace ape

#endif  // APESERVE_COMMON_SERVER_ADMISSION_H_
