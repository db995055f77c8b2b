// Small helpers for absl::Status plumbing. Our abseil (20220623) has neither
// absl/log nor status macros, so the project keeps these two here.
#ifndef APESERVE_COMMON_ENGINE_STATUS_MACROS_H_
#define APESERVE_COMMON_ENGINE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define APE_CONCAT_INNER_(a, b) a##b
#define APE_CONCAT_(a, b) APE_CONCAT_INNER_(a, b)

// Returns from the current function if `expr` (an absl::Status) is not OK.
#define RETURN_IF_ERROR(expr)                  \
  do {                                         \
    ::absl::Status ape_status_ = (expr);       \
    if (!ape_status_.ok()) return ape_status_; \
  } while (0)

// `lhs` = value of `rexpr` (an absl::StatusOr<T>), or returns its status.
#define ASSIGN_OR_RETURN(lhs, rexpr) ASSIGN_OR_RETURN_IMPL_(APE_CONCAT_(ape_statusor_, __LINE__), lhs, rexpr)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                           \
  if (!tmp.ok()) return tmp.status();           \
  lhs = std::move(tmp).value()

#endif  // APESERVE_COMMON_ENGINE_STATUS_MACROS_H_
