#include "common/server/admission.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace ape {

absl::StatusOr<Admission::Ticket> Admission::Enter(const std::function<bool()>& cancelled, Deadline deadline) {
  using Clock = std::chrono::system_clock;
  std::unique_lock<std::mutex> lock(mu_);
  if (Clock::now() >= deadline) return absl::DeadlineExceededError("deadline passed before the request was queued");
  if (running_ >= max_running_) {
    if (waiting_ >= max_waiting_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("server busy: ", running_, " running and ", waiting_, " waiting requests; retry later"));
    }
    ++waiting_;
    while (running_ >= max_running_) {
      const Clock::time_point now = Clock::now();
      absl::Status gone;
      if (now >= deadline) {
        gone = absl::DeadlineExceededError("deadline passed while queued for a compute slot");
      } else if (cancelled && cancelled()) {
        gone = absl::CancelledError("request cancelled while queued for a compute slot");
      }
      if (!gone.ok()) {
        --waiting_;
        return gone;
      }
      // Never wait_until(max): the clock arithmetic would overflow.
      cv_.wait_until(lock, deadline - now < kCancelPoll ? deadline : now + kCancelPoll);
    }
    --waiting_;
  }
  ++running_;
  return Ticket(this);
}

void Admission::Leave() {
  std::lock_guard<std::mutex> lock(mu_);
  --running_;
  // All: a waiter woken alone might be one about to give up.
  cv_.notify_all();
}

}  // namespace ape
