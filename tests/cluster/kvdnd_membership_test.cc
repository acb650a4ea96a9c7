// kvdnd processes joining a cluster through a real etcd (label: cluster): each lists the other
// (AdminService.ListMembers, what kvdnctl members shows, with each answering member's chunk
// count); a node killed with SIGKILL drops out
// within the lease TTL; a node that drains leaves at once; with etcd down a node keeps serving,
// /readyz says degraded (still 200) and kvdn_cluster_degraded is 1; a bad cluster name stops
// kvdnd at start naming the field.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "daemon_process.h"
#include "etcd_process.h"
#include "kvdn/client/client.h"
#include "kvdn/daemon/placement.h"
#include "kvdn/proto/grpc_status.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"
#include "kvdn/v1/admin_service.grpc.pb.h"
#include "kvdn/v1/kv_service.grpc.pb.h"
#include "test_certs.h"

namespace kvdn {
namespace {

using ::kvdn::testing::DaemonProcess;
using ::kvdn::testing::EtcdProcess;
using ::kvdn::testing::Eventually;
using ::kvdn::testing::StatusIs;
using ::kvdn::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// node -> grpc address, as ListMembers reports them (`token`: for a kvdnd with tenant tokens).
std::map<std::string, std::string> Members(const DaemonProcess& d, std::string* cluster = nullptr,
                                           const std::string& token = "") {
  auto stub = v1::AdminService::NewStub(client::MakeChannel(d.unix_target(), token));
  grpc::ClientContext ctx;
  v1::ListMembersResponse r;
  std::map<std::string, std::string> out;
  if (!stub->ListMembers(&ctx, {}, &r).ok()) return out;
  if (cluster != nullptr) *cluster = r.cluster();
  for (const auto& m : r.members()) out[m.node()] = m.grpc_address();
  return out;
}

std::vector<std::string> Nodes(const DaemonProcess& d, const std::string& token = "") {
  std::vector<std::string> out;
  for (const auto& [n, a] : Members(d, nullptr, token)) out.push_back(n);
  return out;
}

class KvdndMembershipTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string err;
    ASSERT_TRUE(etcd_.Start(&err)) << err;
  }
  std::vector<std::string> Flags(const std::string& node) {
    return {"--etcd", etcd_.endpoint(),      "--cluster", "c1", "--node-name",
            node,     "--membership-ttl-ms", "3000"};
  }
  // Starts node-a and node-b (with the JSON config file `config` when given) and waits until each
  // lists both (asking with `admin_token` for a kvdnd with tenant tokens).
  void StartBothAndWaitForEachOther(const std::string& config = "",
                                    const std::string& admin_token = "") {
    auto flags = [&](const std::string& node) {
      auto f = Flags(node);
      if (!config.empty()) f.insert(f.end(), {"--config", config});
      return f;
    };
    std::string err;
    ASSERT_TRUE(a_.Start(flags("node-a"), &err)) << err;
    ASSERT_TRUE(b_.Start(flags("node-b"), &err)) << err;
    ASSERT_TRUE(Eventually(
        [&] { return Nodes(a_, admin_token).size() == 2 && Nodes(b_, admin_token).size() == 2; },
        absl::Seconds(5)))
        << Logs();
  }
  // A Get of `key` on `d` (with `token`) returns exactly `chunk`.
  void ExpectServes(const DaemonProcess& d, const ChunkKey& key, const std::vector<uint8_t>& chunk,
                    const std::string& token = "");
  // Both daemons' logs, for failure messages.
  std::string Logs() {
    return "node-a log:\n" + testing::ReadFile(dir_a_.path() + "/kvdnd.log") + "\nnode-b log:\n" +
           testing::ReadFile(dir_b_.path() + "/kvdnd.log");
  }
  TempDir etcd_dir_, dir_a_, dir_b_;
  EtcdProcess etcd_{etcd_dir_.path()};
  DaemonProcess a_{dir_a_.path()};
  DaemonProcess b_{dir_b_.path()};
};

TEST_F(KvdndMembershipTest, NodesSeeEachOtherAndAKilledNodeDropsOutWithinTheTtl) {
  std::string err;
  ASSERT_TRUE(a_.Start(Flags("node-a"), &err)) << err;
  ASSERT_TRUE(b_.Start(Flags("node-b"), &err)) << err;
  ASSERT_TRUE(Eventually([&] { return Nodes(a_).size() == 2; }, absl::Seconds(5))) << Logs();
  std::string cluster;
  auto m = Members(a_, &cluster);
  EXPECT_EQ(cluster, "c1");
  EXPECT_EQ(m.at("node-b"), b_.tcp_target());  // advertised: the bound gRPC address
  // Chunk counts: every member that answers tells its own (b holds one chunk).
  auto counts = [&] {
    auto stub = v1::AdminService::NewStub(client::MakeChannel(a_.unix_target()));
    grpc::ClientContext ctx;
    v1::ListMembersResponse r;
    EXPECT_TRUE(stub->ListMembers(&ctx, {}, &r).ok());
    std::map<std::string, int64_t> out;  // -1: no count
    for (const auto& mem : r.members()) {
      out[mem.node()] = mem.has_chunks() ? static_cast<int64_t>(mem.chunks()) : -1;
    }
    return out;
  };
  {
    client::ClientOptions o;
    o.target = b_.unix_target();
    o.model = {"m", 4, 8, 128, Dtype::kBFloat16, 16};
    auto cb = client::Client::Connect(o);
    ASSERT_TRUE(cb.ok()) << cb.status();
    const std::vector<uint8_t> chunk = testing::RandomChunk(testing::InfoForBytes(4096), 1);
    ASSERT_TRUE((*cb)->PutEncoded(testing::KeyFor(1, "default"), chunk).ok());
  }
  {
    auto c = counts();
    EXPECT_EQ(c["node-b"], 1);
    EXPECT_GE(c["node-a"],
              0);  // 0 or 1: a has a count (the chunk is replicated there if it owns it)
  }
  EXPECT_THAT(Nodes(b_), ElementsAre("node-a", "node-b"));
  b_.Kill();
  const absl::Time killed = absl::Now();
  // Still listed until its lease lapses, but with no count (not a made-up 0).
  {
    auto c = counts();
    EXPECT_GE(c["node-a"], 0);
    EXPECT_EQ(c["node-b"], -1);
  }
  EXPECT_TRUE(Eventually([&] { return Nodes(a_).size() == 1; }, absl::Seconds(8)));
  EXPECT_LT(absl::Now() - killed, absl::Seconds(3 + 3));  // TTL plus etcd's expiry granularity
  // A node that drains (SIGTERM) leaves at once.
  DaemonProcess c{dir_b_.path()};
  ASSERT_TRUE(c.Start(Flags("node-c"), &err)) << err;
  ASSERT_TRUE(Eventually([&] { return Nodes(a_).size() == 2; }, absl::Seconds(5))) << Logs();
  EXPECT_EQ(c.Stop(), 0);
  EXPECT_TRUE(Eventually([&] { return Nodes(a_).size() == 1; }, absl::Seconds(1)));
}

// The value of one sample in a daemon's /metrics (-1 when absent).
double Metric(const DaemonProcess& d, const std::string& sample) {
  return testing::MetricSample(d.http_port(), sample);
}

// Writes to node-a that node-b owns are replicated through a bounded queue (here 2 deep): each is
// sent, found present, or dropped and counted — none lost from the books, none left queued — and
// node-b holds exactly the ones sent.
TEST_F(KvdndMembershipTest, EveryWriteForAnotherOwnerIsReplicatedOrCountedAsDropped) {
  const std::string cfg = dir_a_.path() + "/repl.json";
  std::ofstream(cfg) << R"({"replication_queue_limit": 2})";
  std::string err;
  auto flags = Flags("node-a");
  flags.insert(flags.end(), {"--config", cfg});
  ASSERT_TRUE(a_.Start(flags, &err)) << err;
  ASSERT_TRUE(b_.Start(Flags("node-b"), &err)) << err;
  ASSERT_TRUE(Eventually([&] { return Nodes(a_).size() == 2; }, absl::Seconds(5))) << Logs();
  constexpr int kChunks = 48;
  const daemon::Placement placement({"node-a", "node-b"});
  int owned_by_b = 0;
  for (int i = 0; i < kChunks; ++i) {
    owned_by_b += placement.Owners(testing::KeyFor(i, "default"), 1)[0] == "node-b" ? 1 : 0;
  }
  ASSERT_GT(owned_by_b, 0);
  const std::vector<uint8_t> chunk = testing::RandomChunk(testing::InfoForBytes(1 << 20), 3);
  std::vector<std::thread> writers;
  for (int w = 0; w < 4; ++w) {
    writers.emplace_back([&, w] {
      client::ClientOptions o;
      o.target = a_.unix_target();
      o.model = {"m", 4, 8, 128, Dtype::kBFloat16, 16};
      auto c = client::Client::Connect(o);
      ASSERT_TRUE(c.ok()) << c.status();
      for (int i = w; i < kChunks; i += 4) {
        ASSERT_TRUE((*c)->PutEncoded(testing::KeyFor(i, "default"), chunk).ok());
      }
    });
  }
  for (auto& t : writers) t.join();
  auto books = [&] {
    double n = 0;
    for (const char* r : {"sent", "present", "failed", "dropped"}) {
      n += Metric(a_, absl::StrCat("kvdn_replication_total{result=\"", r, "\"}"));
    }
    return n;
  };
  EXPECT_TRUE(Eventually([&] { return books() == owned_by_b; }, absl::Seconds(20)))
      << books() << " of " << owned_by_b;
  std::fprintf(stderr, "replication of %d writes: %.0f sent, %.0f present, %.0f dropped\n",
               owned_by_b, Metric(a_, "kvdn_replication_total{result=\"sent\"}"),
               Metric(a_, "kvdn_replication_total{result=\"present\"}"),
               Metric(a_, "kvdn_replication_total{result=\"dropped\"}"));
  EXPECT_EQ(Metric(a_, "kvdn_replication_queue_depth"), 0);
  EXPECT_EQ(Metric(a_, "kvdn_replication_total{result=\"failed\"}"), 0);
  auto stub = v1::AdminService::NewStub(client::MakeChannel(b_.unix_target()));
  grpc::ClientContext ctx;
  v1::ListMembersResponse r;
  ASSERT_TRUE(stub->ListMembers(&ctx, {}, &r).ok());
  for (const auto& m : r.members()) {
    if (m.node() == "node-b") {
      EXPECT_EQ(m.chunks(), Metric(a_, "kvdn_replication_total{result=\"sent\"}"));
    }
  }
}

absl::StatusOr<std::unique_ptr<client::Client>> Connect(const DaemonProcess& d,
                                                        const std::string& token = "") {
  client::ClientOptions o;
  o.target = d.unix_target();
  o.token = token;
  o.model = {"m", 4, 8, 128, Dtype::kBFloat16, 16};
  return client::Client::Connect(o);
}

// A reservation of `key` on `d` (KvService.Reserve): a write of the key in progress there.
absl::StatusOr<uint64_t> ReserveOn(const DaemonProcess& d, const ChunkKey& key, uint64_t size) {
  auto stub = v1::KvService::NewStub(client::MakeChannel(d.unix_target()));
  grpc::ClientContext ctx;
  v1::ReserveRequest rq;
  rq.mutable_key()->set_namespace_(key.ns);
  rq.mutable_key()->set_fingerprint(key.fingerprint);
  const std::array<uint8_t, 16> h = key.prefix_hash.Canonical();
  rq.mutable_key()->set_prefix_hash(h.data(), h.size());
  rq.set_size(size);
  v1::ReserveResponse resp;
  if (grpc::Status st = stub->Reserve(&ctx, rq, &resp); !st.ok()) return FromGrpcStatus(st);
  return resp.transfer().id();
}

absl::Status ReleaseOn(const DaemonProcess& d, uint64_t reservation) {
  auto stub = v1::KvService::NewStub(client::MakeChannel(d.unix_target()));
  grpc::ClientContext ctx;
  v1::ReleaseRequest rq;
  rq.set_reservation_id(reservation);
  v1::ReleaseResponse r;
  return FromGrpcStatus(stub->Release(&ctx, rq, &r));
}

// The first test key (from `from` on, in namespace `ns`) placement gives to `node` among node-a
// and node-b.
ChunkKey KeyOwnedBy(const std::string& node, const std::string& ns = "default", int from = 0) {
  const daemon::Placement placement({"node-a", "node-b"});
  int i = from;
  while (placement.Owners(testing::KeyFor(i, ns), 1)[0] != node) ++i;
  return testing::KeyFor(i, ns);
}

void KvdndMembershipTest::ExpectServes(const DaemonProcess& d, const ChunkKey& key,
                                       const std::vector<uint8_t>& chunk,
                                       const std::string& token) {
  auto c = Connect(d, token);
  ASSERT_OK(c.status());
  std::vector<uint8_t> got(chunk.size());
  ASSERT_OK_AND_ASSIGN(uint64_t n, (*c)->GetEncoded(key, MutableByteSpan(got)));
  EXPECT_EQ(n, chunk.size());
  EXPECT_EQ(got, chunk);
}

// A Get on node-a of a chunk node-b holds, while a write of that key is in progress on node-a
// (a reservation): the fetch must not claim the chunk arrived (it is not readable until that
// write commits, and it may fail), nor count an error or try other owners: NOT_FOUND naming the
// write. Once the reservation goes, the same Get fetches the chunk from node-b, bit for bit.
TEST_F(KvdndMembershipTest, AGetOfAKeyBeingWrittenHereMissesAndFetchesOnceTheWriteEnds) {
  ASSERT_NO_FATAL_FAILURE(StartBothAndWaitForEachOther());
  const ChunkKey key = KeyOwnedBy("node-b");
  const std::vector<uint8_t> chunk = testing::RandomChunk(testing::InfoForBytes(1 << 20), 9);
  auto cb = Connect(b_);
  ASSERT_OK(cb.status());
  ASSERT_OK((*cb)->PutEncoded(key, chunk).status());

  ASSERT_OK_AND_ASSIGN(const uint64_t reservation, ReserveOn(a_, key, chunk.size()));
  auto ca = Connect(a_);
  ASSERT_OK(ca.status());
  std::vector<uint8_t> got(chunk.size());
  EXPECT_THAT(
      (*ca)->GetEncoded(key, MutableByteSpan(got)),
      testing::StatusIs(absl::StatusCode::kNotFound, HasSubstr("is being written on this node")));
  EXPECT_EQ(Metric(a_, "kvdn_peer_fetch_total{result=\"error\"}"), 0) << Logs();
  EXPECT_EQ(Metric(a_, "kvdn_peer_fetch_total{result=\"hit\"}"), 0);
  ASSERT_OK(ReleaseOn(a_, reservation));
  ExpectServes(a_, key, chunk);
  EXPECT_EQ(Metric(a_, "kvdn_peer_fetch_total{result=\"hit\"}"), 1);
}

// A write on node-a that node-b owns, while node-b has a write of that key in progress (a
// reservation): node-b answers the replication ABORTED (that write may still fail), and node-a
// sends it again after a backoff instead of counting it failed (or present): once node-b's write
// is dropped, node-b holds the chunk, bit for bit, and the books say sent.
TEST_F(KvdndMembershipTest, AReplicationTheOwnerIsWritingItselfIsSentAgain) {
  ASSERT_NO_FATAL_FAILURE(StartBothAndWaitForEachOther());
  const ChunkKey key = KeyOwnedBy("node-b");
  const std::vector<uint8_t> chunk = testing::RandomChunk(testing::InfoForBytes(1 << 20), 11);
  ASSERT_OK_AND_ASSIGN(const uint64_t reservation, ReserveOn(b_, key, chunk.size()));
  auto ca = Connect(a_);
  ASSERT_OK(ca.status());
  ASSERT_OK((*ca)->PutEncoded(key, chunk).status());
  EXPECT_TRUE(Eventually([&] { return Metric(a_, "kvdn_replication_retries_total") >= 1; },
                         absl::Seconds(5)))
      << Logs();
  ASSERT_OK(ReleaseOn(b_, reservation));
  EXPECT_TRUE(Eventually([&] { return Metric(a_, "kvdn_replication_total{result=\"sent\"}") == 1; },
                         absl::Seconds(5)))
      << Logs();
  EXPECT_EQ(Metric(a_, "kvdn_replication_total{result=\"failed\"}"), 0);
  EXPECT_EQ(Metric(a_, "kvdn_replication_total{result=\"present\"}"), 0);
  EXPECT_EQ(Metric(a_, "kvdn_replication_queue_depth"), 0);
  ExpectServes(b_, key, chunk);
}

// With tenant tokens (auth_tokens_file, one file on both nodes, as one Kubernetes Secret would
// be): each kvdnd presents the file's kvdn:peer token to the other, so a tenant's write on one
// node is replicated to its owner and a read through the other node fetches it, while the
// tenant's own token still reaches its namespace only and nothing is refused between the peers.
TEST_F(KvdndMembershipTest, WithTokensPeersAuthenticateToEachOtherAndTenantsStayApart) {
  constexpr char kTenant[] = "tenant-a-token-0123456789";
  constexpr char kAdmin[] = "admin-token-0123456789abc";
  const std::string tokens = etcd_dir_.path() + "/tokens";
  std::ofstream(tokens) << kTenant << " tenant-a\n"
                        << kAdmin << " kvdn:admin\n"
                        << "peer-token-0123456789abcd kvdn:peer\n";
  const std::string cfg = etcd_dir_.path() + "/auth.json";
  std::ofstream(cfg) << R"({"auth_tokens_file": ")" << tokens << R"("})";
  ASSERT_NO_FATAL_FAILURE(StartBothAndWaitForEachOther(cfg, kAdmin));
  EXPECT_TRUE(Nodes(a_).empty());  // ListMembers without the admin token: refused
  const std::vector<uint8_t> chunk = testing::RandomChunk(testing::InfoForBytes(1 << 20), 21);
  // Written on a, owned by b: replicated to b (a presents the peer token to b).
  const ChunkKey to_b = KeyOwnedBy("node-b", "tenant-a");
  ASSERT_OK_AND_ASSIGN(auto ca, Connect(a_, kTenant));
  ASSERT_OK(ca->PutEncoded(to_b, chunk).status());
  EXPECT_TRUE(Eventually([&] { return Metric(a_, "kvdn_replication_total{result=\"sent\"}") == 1; },
                         absl::Seconds(10)))
      << Logs();
  ExpectServes(b_, to_b, chunk, kTenant);
  // Written on b, owned by b: a Get on a fetches it from b.
  const ChunkKey on_b = KeyOwnedBy("node-b", "tenant-a", /*from=*/1000);
  ASSERT_OK_AND_ASSIGN(auto cb, Connect(b_, kTenant));
  ASSERT_OK(cb->PutEncoded(on_b, chunk).status());
  ExpectServes(a_, on_b, chunk, kTenant);
  EXPECT_EQ(Metric(a_, "kvdn_peer_fetch_total{result=\"hit\"}"), 1) << Logs();
  // The tenant's token does not reach another namespace through either node.
  client::ClientOptions o;
  o.target = a_.unix_target();
  o.model = {"m", 4, 8, 128, Dtype::kBFloat16, 16};
  o.ns = "tenant-b";
  o.token = kTenant;
  ASSERT_OK_AND_ASSIGN(auto other, client::Client::Connect(o));
  EXPECT_THAT(other->Lookup(std::vector<int32_t>(64, 7)),
              StatusIs(absl::StatusCode::kPermissionDenied));
  // Between the peers nothing was refused: a counts only the test's own call without a token.
  EXPECT_EQ(Metric(a_, "kvdn_auth_failures_total{reason=\"unauthenticated\"}"), 1) << Logs();
  EXPECT_EQ(Metric(b_, "kvdn_auth_failures_total{reason=\"unauthenticated\"}"), 0) << Logs();
  EXPECT_EQ(Metric(b_, "kvdn_auth_failures_total{reason=\"permission_denied\"}"), 0) << Logs();
}

// The peer token rotated in the tokens file (as a Secret update does on every node): each kvdnd
// reads it again and gives its peer channels the new token, no restart; a file without a peer
// token is refused and the old tokens stay.
TEST_F(KvdndMembershipTest, ThePeerTokenRotatesWithoutARestart) {
  constexpr char kTenant[] = "tenant-a-token-0123456789";
  constexpr char kAdmin[] = "admin-token-0123456789abc";
  const std::string tokens = etcd_dir_.path() + "/tokens";
  auto write_tokens = [&](const std::string& peer_line) {
    const std::string tmp = tokens + ".new";
    std::ofstream(tmp) << kTenant << " tenant-a\n" << kAdmin << " kvdn:admin\n" << peer_line;
    std::filesystem::rename(tmp, tokens);  // swapped whole, as the kubelet does
  };
  write_tokens("peer-token-one-0123456789 kvdn:peer\n");
  const std::string cfg = etcd_dir_.path() + "/auth.json";
  std::ofstream(cfg) << R"({"auth_tokens_file": ")" << tokens << R"("})";
  ASSERT_NO_FATAL_FAILURE(StartBothAndWaitForEachOther(cfg, kAdmin));
  ASSERT_OK_AND_ASSIGN(auto ca, Connect(a_, kTenant));
  const std::vector<uint8_t> chunk = testing::RandomChunk(testing::InfoForBytes(1 << 20), 41);
  ASSERT_OK(ca->PutEncoded(KeyOwnedBy("node-b", "tenant-a"), chunk).status());
  ASSERT_TRUE(Eventually([&] { return Metric(a_, "kvdn_replication_total{result=\"sent\"}") == 1; },
                         absl::Seconds(10)))
      << Logs();
  // A file without a peer token: refused on both nodes, the old tokens kept.
  write_tokens("");
  for (DaemonProcess* d : {&a_, &b_}) {
    EXPECT_TRUE(
        Eventually([&] { return Metric(*d, "kvdn_auth_reloads_total{result=\"failed\"}") == 1; },
                   absl::Seconds(5)))
        << Logs();
  }
  // Rotated in the three steps daemon/README.md gives, each read by both nodes before the next
  // (nodes read the file at different moments): the new token added on a later line (accepted,
  // not yet presented), then first (presented; the old still accepted), then the old one gone.
  const std::string one = "peer-token-one-0123456789 kvdn:peer\n";
  const std::string two = "peer-token-two-0123456789 kvdn:peer\n";
  int reloads = 0;
  for (const std::string& peers : {one + two, two + one, two}) {
    write_tokens(peers);
    ++reloads;
    for (DaemonProcess* d : {&a_, &b_}) {
      ASSERT_TRUE(Eventually(
          [&] { return Metric(*d, "kvdn_auth_reloads_total{result=\"ok\"}") == reloads; },
          absl::Seconds(5)))
          << Logs();
    }
  }
  // Replication and fetches go on with the new token; neither node refused the other.
  const ChunkKey to_b = KeyOwnedBy("node-b", "tenant-a", /*from=*/500);
  ASSERT_OK(ca->PutEncoded(to_b, chunk).status());
  EXPECT_TRUE(Eventually([&] { return Metric(a_, "kvdn_replication_total{result=\"sent\"}") == 2; },
                         absl::Seconds(10)))
      << Logs();
  ExpectServes(b_, to_b, chunk, kTenant);
  const ChunkKey on_b = KeyOwnedBy("node-b", "tenant-a", /*from=*/1500);
  ASSERT_OK_AND_ASSIGN(auto cb, Connect(b_, kTenant));
  ASSERT_OK(cb->PutEncoded(on_b, chunk).status());
  ExpectServes(a_, on_b, chunk, kTenant);
  EXPECT_EQ(Metric(a_, "kvdn_peer_fetch_total{result=\"hit\"}"), 1) << Logs();
  EXPECT_EQ(Metric(a_, "kvdn_auth_failures_total{reason=\"unauthenticated\"}"), 0) << Logs();
  EXPECT_EQ(Metric(b_, "kvdn_auth_failures_total{reason=\"unauthenticated\"}"), 0) << Logs();
}

TEST_F(KvdndMembershipTest, WithMutualTlsPeersVerifyEachOtherAndReplicate) {
  TempDir certs_dir;
  auto certs = testing::MakeTestCerts(certs_dir.path());
  ASSERT_TRUE(certs.ok()) << certs.status();
  // One certificate for both nodes (as one Secret for a DaemonSet), named kvdnd.test: peers dial
  // 127.0.0.1:port and verify that name; each must present it (require_client_cert).
  const std::string cfg = etcd_dir_.path() + "/tls.json";
  std::ofstream(cfg) << R"({"tls": {"cert_file": ")" << certs->server_cert << R"(", "key_file": ")"
                     << certs->server_key << R"(", "ca_file": ")" << certs->ca
                     << R"(", "require_client_cert": true, "server_name": "kvdnd.test"}})";
  ASSERT_NO_FATAL_FAILURE(StartBothAndWaitForEachOther(cfg));
  const std::vector<uint8_t> chunk = testing::RandomChunk(testing::InfoForBytes(1 << 20), 31);
  // Written on a, owned by b: replicated to b over the TLS channel (payload over gRPC: with TLS
  // the UCX data plane stays on the host).
  const ChunkKey to_b = KeyOwnedBy("node-b", "default");
  client::ClientOptions o;
  o.target = a_.unix_target();
  o.model = {"m", 4, 8, 128, Dtype::kBFloat16, 16};
  ASSERT_OK_AND_ASSIGN(auto ca, client::Client::Connect(o));
  ASSERT_OK(ca->PutEncoded(to_b, chunk).status());
  EXPECT_TRUE(Eventually([&] { return Metric(a_, "kvdn_replication_total{result=\"sent\"}") == 1; },
                         absl::Seconds(10)))
      << Logs();
  ExpectServes(b_, to_b, chunk);
  // Written on b, owned by b: a Get on a fetches it from b.
  const ChunkKey on_b = KeyOwnedBy("node-b", "default", /*from=*/1000);
  o.target = b_.unix_target();
  ASSERT_OK_AND_ASSIGN(auto cb, client::Client::Connect(o));
  ASSERT_OK(cb->PutEncoded(on_b, chunk).status());
  ExpectServes(a_, on_b, chunk);
  EXPECT_EQ(Metric(a_, "kvdn_peer_fetch_total{result=\"hit\"}"), 1) << Logs();
  // A plain client cannot reach either node's TCP port.
  client::ClientOptions plain = o;
  plain.target = b_.tcp_target();
  plain.max_attempts = 1;
  plain.deadline = absl::Seconds(2);
  ASSERT_OK_AND_ASSIGN(auto pc, client::Client::Connect(plain));
  EXPECT_THAT(pc->Lookup(std::vector<int32_t>(64, 7)), StatusIs(absl::StatusCode::kUnavailable));
}

// etcd serving TLS with client certificates (etcd_tls): nodes presenting a certificate its CA
// signed join and see each other; a node without etcd_tls serves on, degraded, and says why.
TEST_F(KvdndMembershipTest, NodesJoinThroughAnEtcdThatRequiresClientCertificates) {
  TempDir tls_dir;
  auto certs = testing::MakeTestCerts(tls_dir.path());
  ASSERT_TRUE(certs.ok()) << certs.status();
  const client::TlsOptions with_cert{
      .ca_file = certs->ca, .cert_file = certs->client_cert, .key_file = certs->client_key};
  EtcdProcess tls_etcd(tls_dir.path(),
                       testing::EtcdTls{certs->server_cert, certs->server_key, certs->ca},
                       with_cert);
  std::string err;
  ASSERT_TRUE(tls_etcd.Start(&err)) << err;
  const std::string cfg = tls_dir.Sub("etcd-tls.json");
  std::ofstream(cfg) << R"({"etcd_tls": {"ca_file": ")" << certs->ca << R"(", "cert_file": ")"
                     << certs->client_cert << R"(", "key_file": ")" << certs->client_key
                     << R"("}})";
  auto flags = [&](const std::string& node, bool tls) {
    std::vector<std::string> f = {"--etcd", tls_etcd.endpoint(),   "--cluster", "c1", "--node-name",
                                  node,     "--membership-ttl-ms", "3000"};
    if (tls) f.insert(f.end(), {"--config", cfg});
    return f;
  };
  ASSERT_TRUE(a_.Start(flags("node-a", true), &err)) << err;
  ASSERT_TRUE(b_.Start(flags("node-b", true), &err)) << err;
  ASSERT_TRUE(
      Eventually([&] { return Nodes(a_).size() == 2 && Nodes(b_).size() == 2; }, absl::Seconds(5)))
      << Logs();
  EXPECT_EQ(testing::HttpGet(a_.http_port(), "/readyz"), std::make_pair(200, std::string("ok\n")));
  TempDir dir_c;
  DaemonProcess c(dir_c.path());
  ASSERT_TRUE(c.Start(flags("node-c", false), &err)) << err;
  EXPECT_TRUE(Eventually(
      [&] {
        return testing::HttpGet(c.http_port(), "/readyz").second.find("degraded") !=
               std::string::npos;
      },
      absl::Seconds(8)));
  EXPECT_THAT(testing::ReadFile(dir_c.path() + "/kvdnd.log"),
              HasSubstr("an etcd serving https needs etcd_tls"));
  EXPECT_EQ(Nodes(a_).size(), 2u);  // node-c never registered
}

TEST_F(KvdndMembershipTest, EtcdDownMeansDegradedButServing) {
  std::string err;
  ASSERT_TRUE(a_.Start(Flags("node-a"), &err)) << err;
  ASSERT_TRUE(b_.Start(Flags("node-b"), &err)) << err;
  ASSERT_TRUE(Eventually([&] { return Nodes(a_).size() == 2; }, absl::Seconds(5))) << Logs();
  EXPECT_EQ(testing::HttpGet(a_.http_port(), "/readyz"), std::make_pair(200, std::string("ok\n")));
  EXPECT_THAT(testing::HttpGet(a_.http_port(), "/metrics").second,
              HasSubstr("kvdn_cluster_degraded 0"));
  etcd_.Stop();
  EXPECT_TRUE(Eventually(
      [&] {
        return testing::HttpGet(a_.http_port(), "/readyz").second.find("degraded") !=
               std::string::npos;
      },
      absl::Seconds(8)));
  EXPECT_EQ(testing::HttpGet(a_.http_port(), "/readyz").first, 200);
  auto metrics = testing::HttpGet(a_.http_port(), "/metrics").second;
  EXPECT_THAT(metrics, HasSubstr("kvdn_cluster_degraded 1"));
  EXPECT_THAT(metrics, HasSubstr("kvdn_cluster_members 2"));  // the last view, kept
  EXPECT_EQ(Nodes(a_).size(), 2u);
  // Still serving: bytes round-trip through node A.
  client::ClientOptions o;
  o.target = a_.unix_target();
  o.model = {"m", 2, 2, 64, Dtype::kBFloat16, 16};
  auto c = client::Client::Connect(o).value();
  const ChunkInfo info = testing::InfoForBytes(1 << 20, 1);
  const std::vector<uint8_t> chunk = testing::RandomChunk(info, 5);
  ASSERT_OK(c->PutEncoded(testing::KeyFor(5, "default"), chunk).status());
  std::vector<uint8_t> back(chunk.size());
  ASSERT_OK(c->GetEncoded(testing::KeyFor(5, "default"), MutableByteSpan(back)).status());
  EXPECT_EQ(back, chunk);
  // etcd back: no longer degraded.
  ASSERT_TRUE(etcd_.Start(&err)) << err;
  EXPECT_TRUE(
      Eventually([&] { return testing::HttpGet(a_.http_port(), "/readyz").second == "ok\n"; },
                 absl::Seconds(10)));
}

TEST_F(KvdndMembershipTest, AStartWithoutEtcdServesSingleNodeThenJoins) {
  etcd_.Stop();
  std::string err;
  ASSERT_TRUE(a_.Start(Flags("node-a"), &err)) << err;
  EXPECT_THAT(testing::HttpGet(a_.http_port(), "/readyz").second, HasSubstr("degraded"));
  EXPECT_THAT(Nodes(a_), ElementsAre("node-a"));
  ASSERT_TRUE(etcd_.Start(&err)) << err;
  EXPECT_TRUE(
      Eventually([&] { return testing::HttpGet(a_.http_port(), "/readyz").second == "ok\n"; },
                 absl::Seconds(10)));
  ASSERT_TRUE(b_.Start(Flags("node-b"), &err)) << err;
  EXPECT_TRUE(Eventually([&] { return Nodes(a_).size() == 2; }, absl::Seconds(5)));
}

TEST_F(KvdndMembershipTest, BadClusterSettingsStopKvdndNamingTheField) {
  std::string err;
  auto flags = Flags("node-a");
  flags[3] = "bad/name";
  EXPECT_FALSE(a_.Start(flags, &err));
  EXPECT_THAT(err, HasSubstr("cluster_name"));
  EXPECT_FALSE(b_.Start({"--etcd", "no-port"}, &err));
  EXPECT_THAT(err, HasSubstr("etcd_endpoints[0]"));
}

}  // namespace
}  // namespace kvdn
