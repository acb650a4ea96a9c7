#include "src/auth.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn::daemon {
namespace {

using ::kvdn::testing::StatusIs;
using ::testing::HasSubstr;

constexpr char kFile[] = R"(# tokens of the test
tenant-a-token-0123456789 tenant-a
tenant-bc-token-012345678   tenant-b,tenant-c   # two tenants
admin-token-0123456789abc kvdn:admin
peer-token-0123456789abcd kvdn:peer
fleet-token-0123456789abc kvdn:all-namespaces,kvdn:admin
)";

TEST(TokenTableTest, GrantsAreWhatTheFileSays) {
  ASSERT_OK_AND_ASSIGN(auto table, TokenTable::Parse(kFile, "tokens"));
  EXPECT_EQ(table->size(), 5u);
  ASSERT_OK_AND_ASSIGN(const Grants* a, table->Find("tenant-a-token-0123456789"));
  EXPECT_TRUE(a->Allows("tenant-a"));
  EXPECT_FALSE(a->Allows("tenant-b"));
  EXPECT_FALSE(a->admin);
  EXPECT_FALSE(a->peer);
  ASSERT_OK_AND_ASSIGN(const Grants* bc, table->Find("tenant-bc-token-012345678"));
  EXPECT_TRUE(bc->Allows("tenant-b"));
  EXPECT_TRUE(bc->Allows("tenant-c"));
  EXPECT_FALSE(bc->Allows("tenant-a"));
  ASSERT_OK_AND_ASSIGN(const Grants* admin, table->Find("admin-token-0123456789abc"));
  EXPECT_TRUE(admin->admin);
  EXPECT_FALSE(admin->Allows("tenant-a"));  // operating the daemon is not reading tenants' KV
  ASSERT_OK_AND_ASSIGN(const Grants* peer, table->Find("peer-token-0123456789abcd"));
  EXPECT_TRUE(peer->peer);
  EXPECT_TRUE(peer->Allows("any-tenant"));
  ASSERT_OK_AND_ASSIGN(const Grants* fleet, table->Find("fleet-token-0123456789abc"));
  EXPECT_TRUE(fleet->Allows("whatever"));
  EXPECT_TRUE(fleet->admin);
  EXPECT_FALSE(fleet->peer);
  EXPECT_EQ(table->peer_token(), "peer-token-0123456789abcd");
}

TEST(TokenTableTest, UnknownTokensAreUnauthenticated) {
  ASSERT_OK_AND_ASSIGN(auto table, TokenTable::Parse(kFile, "tokens"));
  EXPECT_THAT(table->Find("tenant-a-token-012345678"),  // one character short
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("not one this kvdnd knows")));
  EXPECT_THAT(table->Find(""), StatusIs(absl::StatusCode::kUnauthenticated));
}

TEST(TokenTableTest, CallerChecksNamespaces) {
  ASSERT_OK_AND_ASSIGN(auto table, TokenTable::Parse(kFile, "tokens"));
  EXPECT_OK(Caller{}.CheckNamespace("anything"));  // no tokens: no check
  Caller a{nullptr, table->Find("tenant-a-token-0123456789").value()};
  EXPECT_OK(a.CheckNamespace("tenant-a"));
  EXPECT_THAT(a.CheckNamespace("tenant-b"),
              StatusIs(absl::StatusCode::kPermissionDenied, HasSubstr("\"tenant-b\"")));
}

TEST(TokenTableTest, MalformedFilesNameTheLine) {
  struct Case {
    std::string text;
    std::string error;
  };
  const Case cases[] = {
      {"abcdefghijklmnopq\n", "tokens:1: need \"<token> <grant>[,<grant>...]\", found 1 fields"},
      {"# c\nabcdefghijklmnopq a b\n", "tokens:2: need"},
      {"short tenant-a\n", "tokens:1: a token of 5 characters; tokens have 16 to 256"},
      {std::string(257, 'x') + " tenant-a\n", "a token of 257 characters"},
      {"abcdefghijklmnopq kvdn:root\n", "tokens:1: unknown grant \"kvdn:root\""},
      {"abcdefghijklmnopq tenant/a\n", "tokens:1: grant \"tenant/a\""},
      {"abcdefghijklmnopq tenant-a,\n", "tokens:1: grant \"\""},
      {"abcdefghijklmnopq tenant-a\n\nabcdefghijklmnopq tenant-b\n",
       "tokens:3: the token of line 1 again"},
      {"# only comments\n\n", "tokens: no tokens"},
      {"", "tokens: no tokens"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.text);
    EXPECT_THAT(TokenTable::Parse(c.text, "tokens"),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.error)));
  }
  EXPECT_THAT(TokenTable::Load("/nonexistent/kvdn-tokens"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("/nonexistent/kvdn-tokens")));
}

TEST(TokenTableTest, TheTableKeepsDigestsNotTokens) {
  // SHA-256 test vector (FIPS 180-2): "abc".
  const std::string d = Sha256("abc");
  ASSERT_EQ(d.size(), 32u);
  EXPECT_EQ(static_cast<uint8_t>(d[0]), 0xba);
  EXPECT_EQ(static_cast<uint8_t>(d[1]), 0x78);
  EXPECT_EQ(static_cast<uint8_t>(d[31]), 0xad);
}

}  // namespace
}  // namespace kvdn::daemon
