#include "common/server/admission.h"

#include <chrono>

#include "absl/strings/str_cat.h"

namespace ape {

absl::StatusOr<Admission::Ticket> Admission::Enter(const std::function<bool()>& cancelled) {
  std::unique_lock<std::mutex> lock(mu_);
  if (running_ >= max_running_) {
    if (waiting_ >= max_waiting_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("server busy: ", running_, " running and ", waiting_, " waiting requests; retry later"));
    }
    ++waiting_;
    while (running_ >= max_running_) {
      cv_.wait_for(lock, std::chrono::milliseconds(50));
      if (running_ < max_running_) break;
      if (cancelled && cancelled()) {
        --waiting_;
        return absl::CancelledError("request cancelled or past its deadline while queued");
      }
    }
    --waiting_;
  }
  ++running_;
  return Ticket(this);
}

void Admission::Leave() {
  std::lock_guard<std::mutex> lock(mu_);
  --running_;
  cv_.notify_one();
}

}  // namespace ape
