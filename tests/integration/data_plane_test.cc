// The UCX data plane against the real kvdnd (label: transfer): UCX results equal gRPC's bit for
// bit over shared memory and tcp, 32 MiB chunks, many concurrent transfers, a client killed
// mid-transfer (the lease is released, the daemon stays healthy), lease expiry, and wrong or
// foreign descriptors.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <random>
#include <thread>

#include "daemon_process.h"
#include "kvdn/client/client.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"
#include "kvdn/v1/admin_service.grpc.pb.h"

namespace kvdn {
namespace {

using ::kvdn::testing::DaemonProcess;
using ::kvdn::testing::RandomBytes;
using ::kvdn::testing::StatusIs;
using ::kvdn::testing::TempDir;
using ::testing::HasSubstr;

ModelSpec Model() { return {"dp-model", 4, 8, 128, Dtype::kBFloat16, 256}; }    // 2 MiB chunks
ModelSpec BigModel() { return {"dp-big", 32, 8, 128, Dtype::kBFloat16, 256}; }  // 32 MiB

std::vector<int32_t> Tokens(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % 128000);
  return t;
}

std::unique_ptr<client::Client> Connect(const std::string& target,
                                        client::ClientOptions::DataPlane dp,
                                        ModelSpec model = Model(), std::string tls = "") {
  client::ClientOptions o;
  o.target = target;
  o.model = std::move(model);
  o.ns = "tenant-a";
  o.deadline = absl::Seconds(20);
  o.data_plane = dp;
  o.ucx_transports = std::move(tls);
  return client::Client::Connect(o).value();
}

uint64_t LeasesActive(const std::string& target) {
  auto stub = v1::AdminService::NewStub(client::MakeChannel(target));
  grpc::ClientContext ctx;
  v1::GetStatsResponse r;
  EXPECT_TRUE(stub->GetStats(&ctx, {}, &r).ok());
  return r.leases_active();
}

class DataPlaneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string err;
    ASSERT_TRUE(daemon_.Start({}, &err)) << err;
  }
  // Saves random KV for `tokens` with `saver`, loads it with `loader`; both must equal the input.
  void RoundTrip(client::Client& saver, client::Client& loader, size_t tokens, uint64_t seed) {
    const auto t = Tokens(tokens, seed);
    std::vector<std::vector<uint8_t>> payloads;
    for (uint64_t s : saver.ChunkPayloadSizes(t.size())) payloads.push_back(RandomBytes(s, seed++));
    std::vector<ByteSpan> spans(payloads.begin(), payloads.end());
    ASSERT_OK(saver.Save(t, spans).status());
    std::vector<std::vector<uint8_t>> got;
    std::vector<MutableByteSpan> bufs;
    for (uint64_t s : loader.ChunkPayloadSizes(t.size())) got.emplace_back(s, 0xAB);
    for (auto& g : got) bufs.emplace_back(g);
    ASSERT_OK_AND_ASSIGN(auto r, loader.Load(t, bufs));
    EXPECT_EQ(r.tokens, t.size());
    for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(got[i] == payloads[i]) << "chunk " << i;
  }
  TempDir dir_;
  DaemonProcess daemon_{dir_.path()};
};

TEST_F(DataPlaneTest, UcxAndGrpcAgreeBitForBitOverSharedMemoryAndTcp) {
  using DP = client::ClientOptions::DataPlane;
  auto shm = Connect(daemon_.unix_target(), DP::kUcx);
  auto tcp = Connect(daemon_.tcp_target(), DP::kUcx, Model(), "tcp");
  auto grpc_only = Connect(daemon_.unix_target(), DP::kGrpc);
  EXPECT_THAT(shm->DataPlaneInUse(), HasSubstr("posix"));
  EXPECT_THAT(tcp->DataPlaneInUse(), HasSubstr("tcp"));
  EXPECT_EQ(grpc_only->DataPlaneInUse(), "grpc");
  // Odd lengths: a short tail chunk.
  RoundTrip(*shm, *grpc_only, 256 * 3 + 17, 1);
  RoundTrip(*grpc_only, *shm, 256 * 2 + 1, 2);
  RoundTrip(*tcp, *shm, 256 * 4 + 100, 3);
  RoundTrip(*shm, *tcp, 256 * 1 + 255, 4);
  // kvdnctl stats shows the data plane's transports.
  auto stub = v1::AdminService::NewStub(client::MakeChannel(daemon_.unix_target()));
  grpc::ClientContext ctx;
  v1::GetStatsResponse st;
  ASSERT_TRUE(stub->GetStats(&ctx, {}, &st).ok());
  std::string all;
  for (const auto& t : st.transports()) all += t + "\n";
  EXPECT_THAT(all, HasSubstr("ucx-local"));
  EXPECT_THAT(all, HasSubstr("ucx-remote"));
  EXPECT_EQ(LeasesActive(daemon_.unix_target()), 0u);
}

TEST_F(DataPlaneTest, ThirtyTwoMiBChunksAndManyConcurrentTransfers) {
  using DP = client::ClientOptions::DataPlane;
  auto big = Connect(daemon_.unix_target(), DP::kUcx, BigModel());
  RoundTrip(*big, *big, 256 * 2, 10);
  auto c = Connect(daemon_.unix_target(), DP::kUcx);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      const auto t = Tokens(256 * 6, 100 + i);
      std::vector<std::vector<uint8_t>> p;
      for (uint64_t s : c->ChunkPayloadSizes(t.size())) p.push_back(RandomBytes(s, 1000 + i));
      std::vector<ByteSpan> spans(p.begin(), p.end());
      if (!c->Save(t, spans).ok()) ++failures;
      for (int round = 0; round < 3; ++round) {
        std::vector<std::vector<uint8_t>> g;
        std::vector<MutableByteSpan> b;
        for (auto& x : p) g.emplace_back(x.size());
        for (auto& x : g) b.emplace_back(x);
        auto r = c->Load(t, b);
        if (!r.ok() || g != p) ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(LeasesActive(daemon_.unix_target()), 0u);
}

TEST_F(DataPlaneTest, DescriptorsExpiredUnknownAndForeignGetPreciseErrors) {
  using DP = client::ClientOptions::DataPlane;
  auto c = Connect(daemon_.unix_target(), DP::kUcx);
  const auto t = Tokens(256, 7);
  auto payload = RandomBytes(c->ChunkPayloadSizes(t.size())[0], 7);
  const ByteSpan spans[1] = {ByteSpan(payload)};
  ASSERT_OK(c->Save(t, spans).status());
  ASSERT_OK_AND_ASSIGN(auto keys, ChunkKeysForTokens("tenant-a", Model(), t, true));
  std::vector<uint8_t> dst(kChunkHeaderBytes + payload.size());

  // A good descriptor reads the chunk, bit for bit.
  ASSERT_OK_AND_ASSIGN(auto d, c->AcquireDescriptor(keys[0], absl::Seconds(10)));
  ASSERT_OK_AND_ASSIGN(uint64_t n, c->ReadDescriptor(d, MutableByteSpan(dst)));
  EXPECT_EQ(n, dst.size());
  EXPECT_EQ(std::memcmp(dst.data() + kChunkHeaderBytes, payload.data(), payload.size()), 0);
  ASSERT_OK(c->ReleaseDescriptor(d));

  // Unknown lease.
  auto unknown = d;
  unknown.lease_id = 987654321;
  EXPECT_THAT(c->ReadDescriptor(unknown, MutableByteSpan(dst)),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("lease")));
  // Foreign: another daemon's worker address.
  auto foreign = d;
  foreign.worker_address = "KVDNUCX1 of some other daemon";
  EXPECT_THAT(c->ReadDescriptor(foreign, MutableByteSpan(dst)),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("another daemon")));
  // Too small a buffer.
  ASSERT_OK_AND_ASSIGN(auto d2, c->AcquireDescriptor(keys[0], absl::Seconds(10)));
  std::vector<uint8_t> small(100);
  EXPECT_THAT(c->ReadDescriptor(d2, MutableByteSpan(small)),
              StatusIs(absl::StatusCode::kOutOfRange));
  ASSERT_OK(c->ReleaseDescriptor(d2));
  // Expired lease: ABORTED, and Release says so too.
  ASSERT_OK_AND_ASSIGN(auto d3, c->AcquireDescriptor(keys[0], absl::Milliseconds(150)));
  absl::SleepFor(absl::Milliseconds(600));
  EXPECT_THAT(c->ReadDescriptor(d3, MutableByteSpan(dst)),
              StatusIs(absl::StatusCode::kAborted, HasSubstr("expired")));
  EXPECT_THAT(c->ReleaseDescriptor(d3), StatusIs(absl::StatusCode::kAborted));
  EXPECT_EQ(LeasesActive(daemon_.unix_target()), 0u);
}

// The child: loads a 32 MiB chunk over and over until it is killed.
[[noreturn]] void LoadForever(const std::string& target, const std::string& tls) {
  auto c = Connect(target, client::ClientOptions::DataPlane::kUcx, BigModel(), tls);
  const auto t = Tokens(256, 55);
  std::vector<uint8_t> buf(c->ChunkPayloadSizes(t.size())[0]);
  const MutableByteSpan bufs[1] = {MutableByteSpan(buf)};
  for (;;) (void)c->Load(t, bufs);
}

TEST_F(DataPlaneTest, AClientKilledMidTransferLeavesNoLeaseAndAHealthyDaemon) {
  using DP = client::ClientOptions::DataPlane;
  auto c = Connect(daemon_.unix_target(), DP::kUcx, BigModel());
  const auto t = Tokens(256, 55);
  auto payload = RandomBytes(c->ChunkPayloadSizes(t.size())[0], 55);
  const ByteSpan spans[1] = {ByteSpan(payload)};
  ASSERT_OK(c->Save(t, spans).status());
  for (const auto& [target, tls] : {std::pair{daemon_.unix_target(), std::string()},
                                    std::pair{daemon_.tcp_target(), std::string("tcp")}}) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      execl("/proc/self/exe", "data_plane_test", "--load-forever", target.c_str(), tls.c_str(),
            nullptr);
      _exit(1);
    }
    absl::SleepFor(absl::Milliseconds(700));  // mid-way through some load
    ASSERT_EQ(kill(pid, SIGKILL), 0);
    ASSERT_EQ(waitpid(pid, nullptr, 0), pid);
    // The lease of the transfer it died in is released within the deadline.
    const absl::Time until = absl::Now() + absl::Seconds(25);
    while (LeasesActive(daemon_.unix_target()) != 0 && absl::Now() < until) {
      absl::SleepFor(absl::Milliseconds(100));
    }
    EXPECT_EQ(LeasesActive(daemon_.unix_target()), 0u) << target;
  }
  // The daemon serves on, over both paths.
  RoundTrip(*c, *c, 256 * 2, 56);
  auto g = Connect(daemon_.unix_target(), DP::kGrpc, BigModel());
  RoundTrip(*g, *c, 256, 57);
  EXPECT_EQ(daemon_.Stop(), 0);
}

TEST(DataPlaneOffTest, ADaemonWithoutUcxServesGrpcAndRefusesUcxPrecisely) {
  TempDir dir;
  DaemonProcess daemon(dir.path());
  std::string err;
  ASSERT_TRUE(daemon.Start({"--data-plane-transports", "off"}, &err)) << err;
  auto any = Connect(daemon.unix_target(), client::ClientOptions::DataPlane::kAuto);
  EXPECT_EQ(any->DataPlaneInUse(), "grpc");
  auto ucx = Connect(daemon.unix_target(), client::ClientOptions::DataPlane::kUcx);
  EXPECT_THAT(ucx->Lookup(Tokens(256, 1)).status(), ::testing::_);
  const auto t = Tokens(256, 2);
  auto payload = RandomBytes(any->ChunkPayloadSizes(t.size())[0], 2);
  const ByteSpan spans[1] = {ByteSpan(payload)};
  EXPECT_THAT(ucx->Save(t, spans).status(),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("no UCX data plane")));
  ASSERT_OK(any->Save(t, spans).status());
  TempDir dir2;
  DaemonProcess bad(dir2.path());
  EXPECT_FALSE(bad.Start({"--data-plane-transports", "tcp,warp"}, &err));
  EXPECT_THAT(err, HasSubstr("data_plane_transports"));
  EXPECT_THAT(err, HasSubstr("'warp'"));
}

}  // namespace
}  // namespace kvdn

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "--load-forever") kvdn::LoadForever(argv[2], argv[3]);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
