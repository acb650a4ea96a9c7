// Three kvdnd, each in its own network namespace (veth links to a bridge, distinct addresses),
// one etcd, brought up by scripts/cluster.sh (label: cluster; needs root, skipped without it).
// Clients run outside the namespaces and reach each node over the bridge (gRPC + UCX tcp); the
// nodes fetch and replicate among themselves over UCX tcp across the veth links.
//
//   - a chunk saved on node1 loads on node3 bit-identical; node3 keeps what it fetched (edge
//     cache) and its metrics count the fetches, one per chunk; a Lookup reads ahead;
//   - kill -9 a node: with 2 replicas every chunk still loads (from the replica), with 1 the
//     chunks it owned miss cleanly, within one peer deadline, before and after membership drops it;
//   - a node whose link goes down costs reads one peer deadline, drops out of membership within
//     the lease TTL, and reads route around it; with the link back it rejoins;
//   - with etcd stopped the nodes report degraded and keep serving their known members.
#include "kvdn/testing/netns_cluster.h"

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <random>

#include "daemon_process.h"
#include "kvdn/client/client.h"
#include "kvdn/daemon/placement.h"
#include "kvdn/testing/waiting.h"
#include "kvdn/v1/admin_service.grpc.pb.h"
#include "kvdn/v1/kv_service.grpc.pb.h"

namespace kvdn {
namespace {

using ::kvdn::testing::Eventually;
using ::kvdn::testing::NetnsCluster;
using ::kvdn::testing::NetnsClusterOptions;

constexpr int kChunks = 24;
constexpr uint32_t kTokensPerChunk = 16;

ModelSpec Model() { return {"netns-test", 2, 4, 64, Dtype::kBFloat16, kTokensPerChunk}; }

class NetnsClusterTest : public ::testing::Test {
 protected:
  // Leaves cluster_ null when the test is skipped or the bring-up failed: the caller returns.
  void Up(int replicas) {
    if (std::string why = NetnsCluster::Unavailable(); !why.empty()) GTEST_SKIP() << why;
    NetnsClusterOptions o;
    o.replicas = replicas;
    std::string err;
    cluster_ = NetnsCluster::Up(KVDN_CLUSTER_SCRIPT, KVDN_BIN_DIR, o, &err);
    ASSERT_NE(cluster_, nullptr) << err;
    // This process reaches the nodes through the bridge: UCX must not offer them its other
    // interfaces (loopback means something else inside a namespace).
    setenv("UCX_NET_DEVICES", cluster_->Get("KVDN_BRIDGE").c_str(), 1);
  }
  void TearDown() override {
    // No node crashed or, in a sanitizer build, erred along the way (a killed one was SIGKILLed:
    // it logs nothing).
    for (int i = 1; cluster_ != nullptr && i <= 3; ++i) {
      const std::string log = cluster_->Log(i);
      for (const char* bad : {"Caught signal", "ERROR: AddressSanitizer",
                              "runtime error:", "WARNING: ThreadSanitizer"}) {
        EXPECT_EQ(log.find(bad), std::string::npos) << "node" << i << ": " << bad;
      }
    }
    if (HasFailure() && cluster_ != nullptr) {
      for (int i = 1; i <= 3; ++i) {
        const std::string log = cluster_->Log(i);
        std::fprintf(stderr, "---- node%d log (tail) ----\n%s\n", i,
                     log.substr(log.size() > 4000 ? log.size() - 4000 : 0).c_str());
        auto [code, body] = testing::HttpGet(9470, "/metrics", cluster_->Ip(i));
        for (size_t at = 0; (at = body.find("\nkvdn_", at)) != std::string::npos; ++at) {
          const std::string line = body.substr(at + 1, body.find('\n', at + 1) - at - 1);
          if (line.find("Peer") != std::string::npos || line.find("peer") != std::string::npos ||
              line.find("replication") != std::string::npos) {
            std::fprintf(stderr, "  %s\n", line.c_str());
          }
        }
      }
    }
  }

  std::unique_ptr<client::Client> ClientFor(int node) {
    client::ClientOptions o;
    o.target = cluster_->Grpc(node);
    o.ns = "netns";
    o.model = Model();
    o.deadline = absl::Seconds(10);
    auto c = client::Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }

  // Tokens and payloads of kChunks chunks, different for each seed.
  void MakeData(uint64_t seed) {
    std::mt19937_64 rng(seed);
    tokens_.resize(kChunks * kTokensPerChunk);
    for (int32_t& t : tokens_) t = static_cast<int32_t>(rng() % 128000);
    auto c = ClientFor(1);
    ASSERT_NE(c, nullptr);
    payloads_.clear();
    for (uint64_t size : c->ChunkPayloadSizes(tokens_.size())) {
      std::vector<uint8_t> p(size);
      for (uint8_t& b : p) b = static_cast<uint8_t>(rng());
      payloads_.push_back(std::move(p));
    }
    keys_ = *ChunkKeysForTokens("netns", Model(), tokens_);
  }

  void Save(int node) {
    auto c = ClientFor(node);
    ASSERT_NE(c, nullptr);
    std::vector<ByteSpan> spans(payloads_.begin(), payloads_.end());
    auto r = c->Save(tokens_, spans);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->chunks_stored + r->chunks_present, static_cast<size_t>(kChunks));
  }

  // Loads on `node`; returns the chunks loaded, each checked bit for bit.
  size_t LoadAndCheck(int node, absl::Duration* took = nullptr) {
    auto c = ClientFor(node);
    if (c == nullptr) return 0;
    std::vector<std::vector<uint8_t>> bufs;
    std::vector<MutableByteSpan> spans;
    for (const auto& p : payloads_) bufs.emplace_back(p.size(), 0xEE);
    for (auto& b : bufs) spans.emplace_back(b);
    const absl::Time start = absl::Now();
    auto r = c->Load(tokens_, spans);
    if (took != nullptr) *took = absl::Now() - start;
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return 0;
    for (size_t i = 0; i < r->chunks; ++i) {
      EXPECT_TRUE(bufs[i] == payloads_[i]) << "chunk " << i << " differs";
    }
    EXPECT_EQ(r->tokens, r->chunks * kTokensPerChunk);
    return r->chunks;
  }

  // ListMembers as `node` answers: node name -> chunk count (-1: none given).
  std::map<std::string, int64_t> Members(int node) {
    auto stub = v1::AdminService::NewStub(client::MakeChannel(cluster_->Grpc(node)));
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    v1::ListMembersResponse r;
    std::map<std::string, int64_t> out;
    if (!stub->ListMembers(&ctx, {}, &r).ok()) return out;
    for (const auto& m : r.members()) {
      out[m.node()] = m.has_chunks() ? static_cast<int64_t>(m.chunks()) : -1;
    }
    return out;
  }

  // How many of keys_ each node owns (placement over `members`, `replicas` copies).
  std::map<std::string, int64_t> Owned(const std::vector<std::string>& members, int replicas) {
    daemon::Placement placement(members);
    std::map<std::string, int64_t> out;
    for (const std::string& m : members) out[m] = 0;
    for (const ChunkKey& k : keys_) {
      for (const std::string& n : placement.Owners(k, replicas)) ++out[n];
    }
    return out;
  }

  // Waits until node1's writes reached their other owners.
  void WaitReplicated(int replicas) {
    const auto owned = Owned({"node1", "node2", "node3"}, replicas);
    EXPECT_TRUE(Eventually(
        [&] {
          auto m = Members(1);
          return m["node2"] >= owned.at("node2") && m["node3"] >= owned.at("node3");
        },
        absl::Seconds(20)))
        << "owned: node2 " << owned.at("node2") << ", node3 " << owned.at("node3");
  }

  void Evict(int node, const ChunkKey& key) {
    auto stub = v1::AdminService::NewStub(client::MakeChannel(cluster_->Grpc(node)));
    grpc::ClientContext ctx;
    v1::EvictRequest req;
    req.set_key_text(key.ToString());
    v1::EvictResponse resp;
    ASSERT_TRUE(stub->Evict(&ctx, req, &resp).ok());
  }

  // The value of one sample of node's /metrics (-1 when absent).
  double Metric(int node, const std::string& sample) {
    return testing::MetricSample(9470, sample, cluster_->Ip(node));
  }

  std::unique_ptr<NetnsCluster> cluster_;
  std::vector<int32_t> tokens_;
  std::vector<std::vector<uint8_t>> payloads_;
  std::vector<ChunkKey> keys_;
};

TEST_F(NetnsClusterTest, SavedOnOneNodeLoadsBitIdenticalOnAnother) {
  Up(/*replicas=*/1);
  if (cluster_ == nullptr) return;  // skipped, or the bring-up failed (reported)
  MakeData(1);
  Save(1);
  WaitReplicated(1);
  // node2 and node3 hold the chunks they own; a Lookup on node2 sees the whole prefix.
  auto c2 = ClientFor(2);
  ASSERT_NE(c2, nullptr);
  EXPECT_EQ(c2->Lookup(tokens_).value_or(0), tokens_.size());

  EXPECT_EQ(LoadAndCheck(3), static_cast<size_t>(kChunks));
  // node3 fetched what it did not own and kept it (edge cache): all of them are local now.
  const auto owned = Owned({"node1", "node2", "node3"}, 1);
  EXPECT_EQ(Members(3)["node3"], kChunks);
  EXPECT_EQ(Metric(3, "kvdn_peer_fetch_total{result=\"hit\"}"), kChunks - owned.at("node3"));
  // A second load is served locally: no more fetches.
  EXPECT_EQ(LoadAndCheck(3), static_cast<size_t>(kChunks));
  EXPECT_EQ(Metric(3, "kvdn_peer_fetch_total{result=\"hit\"}"), kChunks - owned.at("node3"));
  EXPECT_EQ(Metric(1, "kvdn_replication_queue_depth"), 0);
  EXPECT_EQ(Metric(1, "kvdn_replication_total{result=\"sent\"}"), kChunks - owned.at("node1"));
}

// A Lookup that finds chunks on peers fetches them at once (read-ahead); the Load that follows
// finds them here and fetches nothing more.
TEST_F(NetnsClusterTest, ALookupReadsAheadWhatThePeersHold) {
  Up(/*replicas=*/1);
  if (cluster_ == nullptr) return;  // skipped, or the bring-up failed (reported)
  MakeData(8);
  Save(1);
  WaitReplicated(1);
  const auto owned = Owned({"node1", "node2", "node3"}, 1);
  {
    // Where the chunks are, as node3's Lookup says: its own in host memory, the rest remote.
    auto stub = v1::KvService::NewStub(client::MakeChannel(cluster_->Grpc(3)));
    grpc::ClientContext ctx;
    v1::LookupRequest req;
    req.set_namespace_("netns");
    req.set_fingerprint(keys_[0].fingerprint);
    for (const ChunkKey& k : keys_) {
      const std::array<uint8_t, 16> h = k.prefix_hash.Canonical();
      req.add_prefix_hashes(h.data(), h.size());
    }
    v1::LookupResponse resp;
    ASSERT_TRUE(stub->Lookup(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.matched_chunks(), static_cast<uint32_t>(kChunks));
    EXPECT_EQ(std::count(resp.tiers().begin(), resp.tiers().end(), v1::TIER_HOST),
              owned.at("node3"));
    EXPECT_EQ(std::count(resp.tiers().begin(), resp.tiers().end(), v1::TIER_REMOTE),
              kChunks - owned.at("node3"));
  }
  EXPECT_TRUE(Eventually([&] { return Members(3)["node3"] == kChunks; }, absl::Seconds(10)));
  EXPECT_EQ(Metric(3, "kvdn_peer_prefetch_total"), kChunks - owned.at("node3"));
  EXPECT_EQ(LoadAndCheck(3), static_cast<size_t>(kChunks));
  EXPECT_EQ(Metric(3, "kvdn_peer_fetch_total{result=\"hit\"}"), kChunks - owned.at("node3"));
}

TEST_F(NetnsClusterTest, KilledOwnerWithTwoReplicasReadsGoToTheReplica) {
  Up(/*replicas=*/2);
  if (cluster_ == nullptr) return;  // skipped, or the bring-up failed (reported)
  MakeData(2);
  Save(1);
  WaitReplicated(2);
  ASSERT_TRUE(cluster_->Kill(2));
  // At once (membership still lists node2): node2's chunks come from their other copy; the dead
  // node costs at most one peer deadline (1 s), not one per chunk.
  absl::Duration took;
  EXPECT_EQ(LoadAndCheck(3, &took), static_cast<size_t>(kChunks));
  EXPECT_LT(took, absl::Seconds(3));
  // And once membership has dropped it.
  ASSERT_TRUE(Eventually([&] { return Members(3).size() == 2; }, absl::Seconds(10)));
  EXPECT_EQ(LoadAndCheck(3), static_cast<size_t>(kChunks));
}

TEST_F(NetnsClusterTest, KilledOwnerWithOneReplicaMissesCleanlyWithinTheDeadline) {
  Up(/*replicas=*/1);
  if (cluster_ == nullptr) return;  // skipped, or the bring-up failed (reported)
  MakeData(3);
  Save(1);
  WaitReplicated(1);
  // Only owners keep copies: node1 drops what it wrote for others.
  daemon::Placement placement({"node1", "node2", "node3"});
  size_t expected = kChunks;  // the prefix that survives node2: up to its first chunk
  for (size_t i = 0; i < keys_.size(); ++i) {
    const std::string owner = placement.Owners(keys_[i], 1)[0];
    if (owner != "node1") Evict(1, keys_[i]);
    if (owner == "node2" && expected == static_cast<size_t>(kChunks)) expected = i;
  }
  ASSERT_TRUE(cluster_->Kill(2));
  absl::Duration took;
  EXPECT_EQ(LoadAndCheck(3, &took), expected);  // a clean miss: Load succeeds, shorter
  EXPECT_LT(took, absl::Seconds(3));
  ASSERT_TRUE(Eventually([&] { return Members(3).size() == 2; }, absl::Seconds(10)));
  EXPECT_EQ(LoadAndCheck(3, &took), expected);
  EXPECT_LT(took, absl::Seconds(3));
}

TEST_F(NetnsClusterTest, ACutLinkDropsTheNodeReadsRouteAroundItAndItRejoins) {
  Up(/*replicas=*/2);
  if (cluster_ == nullptr) return;  // skipped, or the bring-up failed (reported)
  MakeData(4);
  Save(1);
  WaitReplicated(2);
  ASSERT_TRUE(cluster_->SetLink(2, false));
  const absl::Time cut = absl::Now();
  // Partitioned but still a member: its calls time out once (1 s), then it is skipped.
  absl::Duration took;
  EXPECT_EQ(LoadAndCheck(3, &took), static_cast<size_t>(kChunks));
  EXPECT_LT(took, absl::Seconds(3));
  ASSERT_TRUE(Eventually([&] { return Members(1).size() == 2 && Members(3).size() == 2; },
                         absl::Seconds(10)));
  EXPECT_LT(absl::Now() - cut, absl::Seconds(3 + 3));  // the TTL plus etcd's expiry granularity
  // Placement is over node1 and node3 now.
  MakeData(5);
  Save(1);
  EXPECT_EQ(LoadAndCheck(3, &took), static_cast<size_t>(kChunks));
  EXPECT_LT(took, absl::Seconds(3));
  ASSERT_TRUE(cluster_->SetLink(2, true));
  EXPECT_TRUE(Eventually([&] { return Members(1).size() == 3 && Members(2).size() == 3; },
                         absl::Seconds(15)));
  // The rejoined node serves: it fetches what it lacks from the others.
  EXPECT_EQ(LoadAndCheck(2), static_cast<size_t>(kChunks));
}

// An engine in another network namespace than its node's kvdnd (a pod without hostNetwork) talks
// to it over the unix socket and shared memory; UCX cannot wake either side across namespaces,
// so the transport writes the peer's eventfd itself (transfer/README). The session says so, and
// loads are bit-identical.
TEST_F(NetnsClusterTest, AClientInAnotherNetworkNamespaceUsesSharedMemoryWithWakeups) {
  Up(/*replicas=*/1);
  if (cluster_ == nullptr) return;  // skipped, or the bring-up failed (reported)
  MakeData(7);
  client::ClientOptions o;
  o.target = "unix:" + cluster_->Socket(1);
  o.ns = "netns";
  o.model = Model();
  auto c = client::Client::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT((*c)->DataPlaneInUse(), ::testing::HasSubstr("posix"));
  std::vector<ByteSpan> spans(payloads_.begin(), payloads_.end());
  ASSERT_TRUE((*c)->Save(tokens_, spans).ok());
  std::vector<std::vector<uint8_t>> bufs;
  std::vector<MutableByteSpan> out;
  for (const auto& p : payloads_) bufs.emplace_back(p.size(), 0);
  for (auto& b : bufs) out.emplace_back(b);
  auto r = (*c)->Load(tokens_, out);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->chunks, static_cast<size_t>(kChunks));
  EXPECT_TRUE(bufs == payloads_);
  auto stub = v1::AdminService::NewStub(client::MakeChannel(cluster_->Grpc(1)));
  grpc::ClientContext ctx;
  v1::GetStatsResponse stats;
  ASSERT_TRUE(stub->GetStats(&ctx, {}, &stats).ok());
  std::string transports;
  for (const auto& t : stats.transports()) transports += t + "; ";
  EXPECT_THAT(transports, ::testing::HasSubstr("posix/memory+cma/memory(netns-wake)"));
}

TEST_F(NetnsClusterTest, WithEtcdStoppedTheClusterKeepsServingItsKnownMembers) {
  Up(/*replicas=*/1);
  if (cluster_ == nullptr) return;  // skipped, or the bring-up failed (reported)
  ASSERT_TRUE(cluster_->KillEtcd());
  EXPECT_TRUE(Eventually(
      [&] {
        return testing::HttpGet(9470, "/readyz", cluster_->Ip(1)).second.find("degraded") !=
               std::string::npos;
      },
      absl::Seconds(15)));
  EXPECT_EQ(testing::HttpGet(9470, "/readyz", cluster_->Ip(1)).first, 200);
  EXPECT_EQ(Metric(1, "kvdn_cluster_degraded"), 1);
  EXPECT_EQ(Members(1).size(), 3u);
  MakeData(6);
  Save(1);
  WaitReplicated(1);
  EXPECT_EQ(LoadAndCheck(3), static_cast<size_t>(kChunks));
}

}  // namespace
}  // namespace kvdn
