// Status helpers shared by every kvdn module.
//
// kvdn has one error type: absl::Status / absl::StatusOr<T> (STYLE.md 1). Pick the code by what the
// caller should do next: UNAVAILABLE = retry this call; ABORTED = retry at a higher level;
// FAILED_PRECONDITION = fix state first; RESOURCE_EXHAUSTED = a tier is full; INVALID_ARGUMENT =
// the caller sent something malformed; DATA_LOSS = stored bytes failed their checksum.
#ifndef KVDN_COMMON_STATUS_H_
#define KVDN_COMMON_STATUS_H_

#include "absl/status/status.h"    // IWYU pragma: export
#include "absl/status/statusor.h"  // IWYU pragma: export

#define KVDN_STATUS_CONCAT_INNER_(a, b) a##b
#define KVDN_STATUS_CONCAT_(a, b) KVDN_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status) and returns it from the enclosing function if it is not OK.
#define KVDN_RETURN_IF_ERROR(expr)                                   \
  do {                                                               \
    ::absl::Status kvdn_status_ = (expr);                            \
    if (ABSL_PREDICT_FALSE(!kvdn_status_.ok())) return kvdn_status_; \
  } while (0)

// `KVDN_ASSIGN_OR_RETURN(auto x, Foo());` evaluates Foo() (an absl::StatusOr<T>); on error returns
// its status from the enclosing function, otherwise moves the value into `lhs`.
#define KVDN_ASSIGN_OR_RETURN(lhs, expr) \
  KVDN_ASSIGN_OR_RETURN_IMPL_(KVDN_STATUS_CONCAT_(kvdn_statusor_, __LINE__), lhs, expr)

// lhs is a declaration, so it cannot be parenthesized.
// NOLINTBEGIN(bugprone-macro-parentheses)
#define KVDN_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr)            \
  auto statusor = (expr);                                           \
  if (ABSL_PREDICT_FALSE(!statusor.ok())) return statusor.status(); \
  lhs = std::move(statusor).value()
// NOLINTEND(bugprone-macro-parentheses)

#endif  // KVDN_COMMON_STATUS_H_
