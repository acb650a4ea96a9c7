#include "kvdn/common/status.h"

#include "gtest/gtest.h"
#include "kvdn/common/logging.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn {
namespace {

using ::kvdn::testing::StatusIs;

absl::Status FailIf(bool fail) { return fail ? absl::NotFoundError("gone") : absl::OkStatus(); }
absl::StatusOr<int> ValueOr(bool fail) {
  if (fail) return absl::DataLossError("bad");
  return 42;
}
absl::Status UsesReturnIfError(bool fail, int* reached) {
  KVDN_RETURN_IF_ERROR(FailIf(fail));
  *reached = 1;
  return absl::OkStatus();
}
absl::StatusOr<int> UsesAssignOrReturn(bool fail) {
  KVDN_ASSIGN_OR_RETURN(int v, ValueOr(fail));
  return v + 1;
}

TEST(StatusMacrosTest, ReturnIfErrorPropagatesAndContinues) {
  int reached = 0;
  EXPECT_THAT(UsesReturnIfError(true, &reached), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(reached, 0);
  EXPECT_OK(UsesReturnIfError(false, &reached));
  EXPECT_EQ(reached, 1);
}

TEST(StatusMacrosTest, AssignOrReturnPropagatesAndAssigns) {
  EXPECT_THAT(UsesAssignOrReturn(true), StatusIs(absl::StatusCode::kDataLoss));
  ASSERT_OK_AND_ASSIGN(int v, UsesAssignOrReturn(false));
  EXPECT_EQ(v, 43);
}

TEST(LoggingTest, AcceptsKnownLevelsAndRejectsOthers) {
  EXPECT_OK(InitLogging("debug"));
  EXPECT_OK(InitLogging("off"));
  EXPECT_THAT(InitLogging("loud"),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("'loud'")));
  EXPECT_OK(InitLogging("info"));
}

}  // namespace
}  // namespace kvdn
