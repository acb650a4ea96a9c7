// gMock matchers and assertion macros for absl::Status / absl::StatusOr in kvdn's tests.
#ifndef KVDN_TESTING_STATUS_MATCHERS_H_
#define KVDN_TESTING_STATUS_MATCHERS_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvdn::testing {

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

// EXPECT_THAT(s, StatusIs(absl::StatusCode::kNotFound, HasSubstr("chunk")))
MATCHER_P2(StatusIs, code, message_matcher, "") {
  const absl::Status& s = GetStatus(arg);
  *result_listener << "status is " << s;
  return s.code() == code &&
         ::testing::ExplainMatchResult(message_matcher, std::string(s.message()), result_listener);
}
MATCHER_P(StatusIs, code, "") {
  const absl::Status& s = GetStatus(arg);
  *result_listener << "status is " << s;
  return s.code() == code;
}

}  // namespace kvdn::testing

#define KVDN_TESTING_CONCAT_INNER_(a, b) a##b
#define KVDN_TESTING_CONCAT_(a, b) KVDN_TESTING_CONCAT_INNER_(a, b)

#define EXPECT_OK(expr) \
  EXPECT_TRUE((::kvdn::testing::GetStatus(expr)).ok()) << ::kvdn::testing::GetStatus(expr)
#define ASSERT_OK(expr)                                                                           \
  do {                                                                                            \
    const auto& kvdn_s_ = (expr);                                                                 \
    ASSERT_TRUE(::kvdn::testing::GetStatus(kvdn_s_).ok()) << ::kvdn::testing::GetStatus(kvdn_s_); \
  } while (0)
#define ASSERT_OK_AND_ASSIGN(lhs, expr) \
  ASSERT_OK_AND_ASSIGN_IMPL_(KVDN_TESTING_CONCAT_(kvdn_or_, __LINE__), lhs, expr)
#define ASSERT_OK_AND_ASSIGN_IMPL_(var, lhs, expr) \
  auto var = (expr);                               \
  ASSERT_TRUE(var.ok()) << var.status();           \
  lhs = std::move(var).value()

#endif  // KVDN_TESTING_STATUS_MATCHERS_H_
