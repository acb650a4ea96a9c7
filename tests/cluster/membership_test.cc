// Membership against a real etcd (label: cluster): members see each other join and leave; a lost
// lease re-registers; a node name held by another address is refused, our own previous run is
// replaced; with etcd down the last view is kept and degraded() says so, and it recovers.
#include "kvdn/daemon/membership.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>

#include "etcd_process.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn::daemon {
namespace {

using ::kvdn::testing::EtcdProcess;
using ::kvdn::testing::Eventually;
using ::kvdn::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<std::string> Names(const Membership& m) {
  std::vector<std::string> out;
  for (const auto& [node, r] : m.Members()) out.push_back(node);
  return out;
}

class MembershipTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string err;
    ASSERT_TRUE(etcd_.Start(&err)) << err;
  }
  MembershipOptions Options(const std::string& node, const std::string& cluster = "c1") {
    MembershipOptions o;
    o.etcd.endpoints = {etcd_.endpoint()};
    o.etcd.deadline = absl::Seconds(1);
    o.cluster = cluster;
    o.self.node = node;
    o.self.grpc_address = "10.0.0." + std::to_string(node.size()) + ":7070/" + node;
    o.ttl = absl::Seconds(3);
    return o;
  }
  testing::TempDir dir_;
  EtcdProcess etcd_{dir_.path()};
};

TEST(MemberRecordTest, JsonRoundTripAndBadInput) {
  // The data-plane address is binary (a UCX worker address).
  MemberRecord r{"node-a", "10.0.0.1:7070", std::string("KVDNUCX1\x00\xff\x80", 11),
                 absl::FromUnixMillis(1700000000123)};
  ASSERT_OK_AND_ASSIGN(MemberRecord back, MemberRecord::FromJson(r.ToJson()));
  EXPECT_EQ(back.node, r.node);
  EXPECT_EQ(back.grpc_address, r.grpc_address);
  EXPECT_EQ(back.data_plane, r.data_plane);
  EXPECT_EQ(back.joined, r.joined);
  EXPECT_THAT(MemberRecord::FromJson("{not json").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("JSON")));
  EXPECT_THAT(MemberRecord::FromJson("{}").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no node")));
}

TEST_F(MembershipTest, MembersSeeEachOtherJoinAndLeave) {
  std::atomic<int> changes{0};
  auto oa = Options("node-a");
  oa.on_change = [&](const std::map<std::string, MemberRecord>&) { ++changes; };
  ASSERT_OK_AND_ASSIGN(auto a, Membership::Join(oa));
  ASSERT_OK_AND_ASSIGN(auto b, Membership::Join(Options("node-b")));
  ASSERT_OK_AND_ASSIGN(auto other, Membership::Join(Options("node-x", "c2")));
  EXPECT_TRUE(Eventually([&] { return Names(*a).size() == 2; }, absl::Seconds(3)));
  EXPECT_THAT(Names(*a), ElementsAre("node-a", "node-b"));
  EXPECT_THAT(Names(*b), ElementsAre("node-a", "node-b"));
  EXPECT_THAT(Names(*other), ElementsAre("node-x"));  // another cluster
  EXPECT_EQ(a->Members().at("node-b").grpc_address, Options("node-b").self.grpc_address);
  EXPECT_EQ(a->prefix(), "/kvdn/c1/members/");
  EXPECT_GT(changes.load(), 0);
  EXPECT_FALSE(a->degraded());
  // A graceful leave revokes the lease: gone from the others at once (well within the TTL).
  b.reset();
  EXPECT_TRUE(Eventually([&] { return Names(*a).size() == 1; }, absl::Seconds(2)));
}

TEST_F(MembershipTest, ALostLeaseRegistersAgain) {
  ASSERT_OK_AND_ASSIGN(auto a, Membership::Join(Options("node-a")));
  ASSERT_OK_AND_ASSIGN(auto b, Membership::Join(Options("node-b")));
  // etcd drops b's lease (as after a partition longer than the TTL): b's entry goes, then b
  // registers again on a new lease and a sees it back.
  auto etcd = EtcdClient::Connect({.endpoints = {etcd_.endpoint()}}).value();
  ASSERT_OK_AND_ASSIGN(auto entry, etcd->Get("/kvdn/c1/members/node-b"));
  ASSERT_TRUE(entry.has_value());
  ASSERT_OK(etcd->RevokeLease(entry->lease));
  EXPECT_TRUE(Eventually(
      [&] {
        auto e = etcd->Get("/kvdn/c1/members/node-b");
        return e.ok() && e->has_value() && (*e)->lease != entry->lease;
      },
      absl::Seconds(6)));
  EXPECT_TRUE(Eventually([&] { return Names(*a).size() == 2; }, absl::Seconds(3)));
}

TEST_F(MembershipTest, NodeNamesAreOwnedByOneAddress) {
  ASSERT_OK_AND_ASSIGN(auto a, Membership::Join(Options("node-a")));
  auto impostor = Options("node-a");
  impostor.self.grpc_address = "10.9.9.9:7070";
  EXPECT_THAT(Membership::Join(impostor).status(),
              StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("10.0.0.6:7070/node-a")));
  // The same node from the same address (a restart within the TTL) replaces its old entry.
  auto etcd = EtcdClient::Connect({.endpoints = {etcd_.endpoint()}}).value();
  const int64_t old_lease = etcd->Get("/kvdn/c1/members/node-a").value()->lease;
  ASSERT_OK_AND_ASSIGN(auto again, Membership::Join(Options("node-a")));
  EXPECT_NE(etcd->Get("/kvdn/c1/members/node-a").value()->lease, old_lease);
}

TEST_F(MembershipTest, BadOptionsAndUnreachableEtcd) {
  auto o = Options("node-a", "bad/cluster");
  EXPECT_THAT(Membership::Join(o).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("cluster name")));
  o = Options("node a");
  EXPECT_THAT(Membership::Join(o).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("node name")));
  o = Options("node-a");
  o.ttl = absl::Seconds(1);
  EXPECT_THAT(Membership::Join(o).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("below 2 s")));
  o = Options("node-a");
  o.etcd.endpoints = {absl::StrCat("127.0.0.1:", testing::FreeLoopbackPort())};
  auto st = Membership::Join(o).status();
  EXPECT_TRUE(absl::IsUnavailable(st) || absl::IsDeadlineExceeded(st)) << st;
}

TEST_F(MembershipTest, EtcdDownKeepsTheLastViewAndRecovers) {
  ASSERT_OK_AND_ASSIGN(auto a, Membership::Join(Options("node-a")));
  ASSERT_OK_AND_ASSIGN(auto b, Membership::Join(Options("node-b")));
  ASSERT_TRUE(Eventually([&] { return Names(*a).size() == 2; }, absl::Seconds(3)));
  etcd_.Stop();
  EXPECT_TRUE(Eventually([&] { return a->degraded(); }, absl::Seconds(6)));
  EXPECT_THAT(Names(*a), ElementsAre("node-a", "node-b"));  // the last view, kept
  std::string err;
  ASSERT_TRUE(etcd_.Start(&err)) << err;
  EXPECT_TRUE(Eventually([&] { return !a->degraded() && !b->degraded(); }, absl::Seconds(10)));
  EXPECT_TRUE(Eventually([&] { return Names(*a).size() == 2 && Names(*b).size() == 2; },
                         absl::Seconds(10)));
  // And the view is live again: a leave is seen.
  b.reset();
  EXPECT_TRUE(Eventually([&] { return Names(*a).size() == 1; }, absl::Seconds(5)));
}

}  // namespace
}  // namespace kvdn::daemon
