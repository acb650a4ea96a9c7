// EtcdClient against a real etcd (label: cluster): keys and prefixes, leases that expire without
// keep-alives and live with them, prefix watches that see puts, deletes and lease expiry, etcd's
// own errors passed through precisely, an unreachable etcd answered within the deadline, and a
// keep-alive that survives an etcd restart; TLS to etcd with client certificates.
#include "kvdn/daemon/etcd_client.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "etcd_process.h"
#include "kvdn/common/mutex.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"
#include "test_certs.h"

namespace kvdn::daemon {
namespace {

using ::kvdn::testing::EtcdProcess;
using ::kvdn::testing::EtcdTls;
using ::kvdn::testing::Eventually;
using ::kvdn::testing::StatusIs;
using ::testing::HasSubstr;

// Polls `pred` every 100 ms for up to `limit`.
class EtcdClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string err;
    ASSERT_TRUE(etcd_.Start(&err)) << err;
    client_ = EtcdClient::Connect({.endpoints = {etcd_.endpoint()}}).value();
  }
  bool Present(const std::string& key) {
    auto v = client_->Get(key);
    return v.ok() && v->has_value();
  }
  testing::TempDir dir_;
  EtcdProcess etcd_{dir_.path()};
  std::unique_ptr<EtcdClient> client_;
};

TEST(PrefixRangeEndTest, IncrementsTheLastByteBelow0xff) {
  EXPECT_EQ(PrefixRangeEnd("/kvdn/a/"), "/kvdn/a0");
  EXPECT_EQ(PrefixRangeEnd(std::string("a\xff", 2)), "b");
  EXPECT_EQ(PrefixRangeEnd(std::string("\xff\xff", 2)), std::string(1, '\0'));
}

TEST_F(EtcdClientTest, KeysPrefixesAndDeletes) {
  ASSERT_OK_AND_ASSIGN(int64_t rev1, client_->Put("/kvdn/c1/members/b", "addr-b"));
  ASSERT_OK_AND_ASSIGN(int64_t rev2, client_->Put("/kvdn/c1/members/a", "addr-a"));
  EXPECT_GT(rev2, rev1);
  ASSERT_OK(client_->Put("/kvdn/c1/other", "x").status());
  ASSERT_OK(client_->Put("/kvdn/c10/members/z", "not in c1's prefix").status());
  ASSERT_OK_AND_ASSIGN(auto a, client_->Get("/kvdn/c1/members/a"));
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->value, "addr-a");
  EXPECT_EQ(a->mod_revision, rev2);
  ASSERT_OK_AND_ASSIGN(auto missing, client_->Get("/kvdn/c1/members/nope"));
  EXPECT_FALSE(missing.has_value());
  int64_t rev = 0;
  ASSERT_OK_AND_ASSIGN(auto members, client_->GetPrefix("/kvdn/c1/members/", &rev));
  ASSERT_EQ(members.size(), 2u);
  EXPECT_EQ(members[0].key, "/kvdn/c1/members/a");  // key order
  EXPECT_EQ(members[1].value, "addr-b");
  EXPECT_GE(rev, rev2);
  // Binary-safe values.
  const std::string bin("\0\x01\xff", 3);
  ASSERT_OK(client_->Put("/kvdn/c1/bin", bin).status());
  EXPECT_EQ(client_->Get("/kvdn/c1/bin").value()->value, bin);
  EXPECT_EQ(client_->Delete("/kvdn/c1/members/a").value(), 1);
  EXPECT_EQ(client_->Delete("/kvdn/c1/members/a").value(), 0);
  EXPECT_EQ(client_->GetPrefix("/kvdn/c1/members/").value().size(), 1u);
}

TEST_F(EtcdClientTest, BadInputGetsPreciseErrors) {
  // etcd's own refusal passes through, naming the call.
  EXPECT_THAT(client_->Put("", "v").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("Put \"\"")));
  EXPECT_THAT(client_->GrantLease(absl::Milliseconds(500)).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("below 1 s")));
  // A key on a lease that does not exist.
  EXPECT_THAT(client_->Put("/kvdn/k", "v", 123456789).status(),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("lease")));
  EXPECT_THAT(client_->RevokeLease(123456789), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(client_->LeaseTimeToLive(123456789).status(), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(EtcdClient::Connect({}).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(EtcdClient::Connect({.endpoints = {"no-port"}}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no-port")));
  EXPECT_FALSE(Present("/kvdn/k"));
}

TEST_F(EtcdClientTest, UnreachableEtcdAnswersWithinTheDeadline) {
  const std::string nowhere = absl::StrCat("127.0.0.1:", testing::FreeLoopbackPort());
  auto c = EtcdClient::Connect({.endpoints = {nowhere}, .deadline = absl::Seconds(1)}).value();
  const absl::Time start = absl::Now();
  auto st = c->Put("/kvdn/k", "v").status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  EXPECT_TRUE(absl::IsUnavailable(st) || absl::IsDeadlineExceeded(st)) << st;
  EXPECT_THAT(st.message(), HasSubstr(nowhere));
  // With a live endpoint after the dead one, the call goes on to it.
  auto both =
      EtcdClient::Connect({.endpoints = {nowhere, etcd_.endpoint()}, .deadline = absl::Seconds(3)})
          .value();
  EXPECT_OK(both->Put("/kvdn/failover", "ok").status());
  EXPECT_TRUE(Present("/kvdn/failover"));
}

TEST_F(EtcdClientTest, LeasesExpireWithoutKeepAliveAndLiveWithIt) {
  ASSERT_OK_AND_ASSIGN(int64_t dies, client_->GrantLease(absl::Seconds(2)));
  ASSERT_OK_AND_ASSIGN(int64_t lives, client_->GrantLease(absl::Seconds(2)));
  ASSERT_OK(client_->Put("/kvdn/c1/members/dies", "x", dies).status());
  ASSERT_OK(client_->Put("/kvdn/c1/members/lives", "y", lives).status());
  std::atomic<int> lost{0};
  auto keep = client_->KeepAlive(lives, [&](absl::Status) { ++lost; });
  EXPECT_TRUE(Eventually([&] { return !Present("/kvdn/c1/members/dies"); }, absl::Seconds(6)));
  std::this_thread::sleep_for(std::chrono::seconds(2));  // > the TTL again
  EXPECT_TRUE(Present("/kvdn/c1/members/lives"));
  ASSERT_OK_AND_ASSIGN(int64_t left, client_->LeaseTimeToLive(lives));
  EXPECT_GE(left, 1);
  EXPECT_EQ(lost.load(), 0);
  EXPECT_THAT(client_->LeaseTimeToLive(dies).status(), StatusIs(absl::StatusCode::kNotFound));
  // Revoked under the keep-alive: it reports the lease lost, and the key is gone.
  ASSERT_OK(client_->RevokeLease(lives));
  EXPECT_FALSE(Present("/kvdn/c1/members/lives"));
  EXPECT_TRUE(Eventually([&] { return lost.load() == 1; }, absl::Seconds(5)));
  // Stopping a keep-alive lets the lease expire.
  ASSERT_OK_AND_ASSIGN(int64_t third, client_->GrantLease(absl::Seconds(2)));
  ASSERT_OK(client_->Put("/kvdn/c1/members/third", "z", third).status());
  auto k3 = client_->KeepAlive(third, [](absl::Status) {});
  std::this_thread::sleep_for(std::chrono::seconds(3));
  EXPECT_TRUE(Present("/kvdn/c1/members/third"));
  k3.reset();
  EXPECT_TRUE(Eventually([&] { return !Present("/kvdn/c1/members/third"); }, absl::Seconds(6)));
}

TEST_F(EtcdClientTest, WatchSeesPutsDeletesAndLeaseExpiryInOrder) {
  int64_t rev = 0;
  ASSERT_OK(client_->GetPrefix("/kvdn/c1/members/", &rev).status());
  Mutex mu;
  std::vector<std::string> seen;
  auto watch = client_->WatchPrefix(
      "/kvdn/c1/members/", rev + 1,
      [&](const EtcdEvent& e) {
        MutexLock lock(&mu);
        seen.push_back(absl::StrCat(e.type == EtcdEvent::Type::kPut ? "put " : "delete ", e.kv.key,
                                    e.type == EtcdEvent::Type::kPut ? "=" + e.kv.value : ""));
      },
      [](absl::Status st) { ADD_FAILURE() << "watch ended: " << st; });
  ASSERT_OK(client_->Put("/kvdn/c1/members/a", "1").status());
  ASSERT_OK(client_->Put("/kvdn/c1/other", "not watched").status());
  ASSERT_OK(client_->Put("/kvdn/c1/members/a", "2").status());
  ASSERT_OK(client_->Delete("/kvdn/c1/members/a").status());
  ASSERT_OK_AND_ASSIGN(int64_t lease, client_->GrantLease(absl::Seconds(1)));
  ASSERT_OK(client_->Put("/kvdn/c1/members/b", "3", lease).status());
  const std::vector<std::string> want = {"put /kvdn/c1/members/a=1", "put /kvdn/c1/members/a=2",
                                         "delete /kvdn/c1/members/a", "put /kvdn/c1/members/b=3",
                                         "delete /kvdn/c1/members/b"};
  EXPECT_TRUE(Eventually(
      [&] {
        MutexLock lock(&mu);
        return seen.size() >= want.size();
      },
      absl::Seconds(8)));
  MutexLock lock(&mu);
  EXPECT_EQ(seen, want);
}

TEST_F(EtcdClientTest, AWatchReportsABrokenStreamAndKeepAliveSurvivesARestart) {
  ASSERT_OK_AND_ASSIGN(int64_t lease, client_->GrantLease(absl::Seconds(5)));
  ASSERT_OK(client_->Put("/kvdn/c1/members/me", "x", lease).status());
  std::atomic<int> lost{0};
  auto keep = client_->KeepAlive(
      lease, [&](absl::Status) { ++lost; }, absl::Milliseconds(500));
  std::atomic<int> ended{0};
  absl::Status end_status;
  Mutex mu;
  auto watch = client_->WatchPrefix(
      "/kvdn/c1/members/", 0, [](const EtcdEvent&) {},
      [&](absl::Status st) {
        MutexLock lock(&mu);
        end_status = st;
        ++ended;
      });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  etcd_.Stop();
  EXPECT_TRUE(Eventually([&] { return ended.load() == 1; }, absl::Seconds(10)));
  {
    MutexLock lock(&mu);
    EXPECT_THAT(end_status, StatusIs(absl::StatusCode::kUnavailable));
  }
  // While etcd is down, calls fail within the deadline.
  EXPECT_FALSE(client_->Put("/kvdn/c1/x", "y").ok());
  // etcd comes back (same data directory) within the lease's TTL: the keep-alive resumes and the
  // key stays.
  std::string err;
  ASSERT_TRUE(etcd_.Start(&err)) << err;
  std::this_thread::sleep_for(std::chrono::seconds(6));
  EXPECT_TRUE(Present("/kvdn/c1/members/me"));
  EXPECT_EQ(lost.load(), 0);
}

// An etcd serving TLS with --client-cert-auth: a client trusting its CA and presenting a
// certificate it signed does everything (keys, a lease kept alive, a watch); one without a
// certificate, one trusting another CA, and a plain one are refused within the deadline, naming
// the endpoint; bad TLS options are refused at Connect naming the field.
TEST(EtcdTlsTest, OnlyAClientWithACertificateTheEtcdTrustsGetsIn) {
  testing::TempDir dir;
  auto certs = testing::MakeTestCerts(dir.path());
  ASSERT_TRUE(certs.ok()) << certs.status();
  const client::TlsOptions good{
      .ca_file = certs->ca, .cert_file = certs->client_cert, .key_file = certs->client_key};
  EtcdProcess etcd(dir.path(), EtcdTls{certs->server_cert, certs->server_key, certs->ca}, good);
  std::string err;
  ASSERT_TRUE(etcd.Start(&err)) << err;
  ASSERT_OK_AND_ASSIGN(auto c, EtcdClient::Connect({.endpoints = {etcd.endpoint()}, .tls = good}));
  ASSERT_OK(c->Put("/kvdn/tls/a", "1").status());
  ASSERT_OK_AND_ASSIGN(auto got, c->Get("/kvdn/tls/a"));
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->value, "1");
  ASSERT_OK_AND_ASSIGN(int64_t lease, c->GrantLease(absl::Seconds(2)));
  ASSERT_OK(c->Put("/kvdn/tls/leased", "x", lease).status());
  auto alive = c->KeepAlive(lease, [](absl::Status) {});
  Mutex mu;
  std::vector<std::string> seen;
  auto watch = c->WatchPrefix(
      "/kvdn/tls/w/", 0,
      [&](const EtcdEvent& e) {
        MutexLock lock(&mu);
        seen.push_back(e.kv.key);
      },
      [](absl::Status) {});
  EXPECT_TRUE(Eventually(
      [&] {
        (void)c->Put("/kvdn/tls/w/k", "v");
        MutexLock lock(&mu);
        return !seen.empty();
      },
      absl::Seconds(5)));
  absl::SleepFor(absl::Seconds(3));  // past the lease's TTL: kept alive over TLS
  ASSERT_OK_AND_ASSIGN(auto leased, c->Get("/kvdn/tls/leased"));
  EXPECT_TRUE(leased.has_value());
  alive.reset();
  watch.reset();

  const struct {
    const char* what;
    client::TlsOptions tls;
  } refused[] = {
      {"no client certificate", {.ca_file = certs->ca}},
      {"other-ca.pem",
       {.ca_file = certs->other_ca,
        .cert_file = certs->client_cert,
        .key_file = certs->client_key}},
      {"plain connection: an etcd serving https needs etcd_tls", {}},
  };
  for (const auto& r : refused) {
    SCOPED_TRACE(r.what);
    ASSERT_OK_AND_ASSIGN(auto bad, EtcdClient::Connect({.endpoints = {etcd.endpoint()},
                                                        .tls = r.tls,
                                                        .deadline = absl::Seconds(1)}));
    const absl::Time start = absl::Now();
    const absl::Status st = bad->Put("/kvdn/tls/b", "no").status();
    EXPECT_LT(absl::Now() - start, absl::Seconds(3));
    EXPECT_TRUE(absl::IsUnavailable(st) || absl::IsDeadlineExceeded(st)) << st;
    EXPECT_THAT(st.message(), HasSubstr(etcd.endpoint()));
    EXPECT_THAT(st.message(), HasSubstr(r.what));
  }
  ASSERT_OK_AND_ASSIGN(auto none, c->Get("/kvdn/tls/b"));
  EXPECT_FALSE(none.has_value());

  EXPECT_THAT(EtcdClient::Connect({.endpoints = {etcd.endpoint()},
                                   .tls = {.ca_file = certs->ca, .cert_file = certs->client_cert}})
                  .status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("etcd tls.key_file is empty while cert_file is set")));
  EXPECT_THAT(
      EtcdClient::Connect({.endpoints = {etcd.endpoint()}, .tls = {.ca_file = dir.Sub("none")}})
          .status(),
      StatusIs(absl::StatusCode::kNotFound, HasSubstr("etcd tls.ca_file")));
}

}  // namespace
}  // namespace kvdn::daemon
