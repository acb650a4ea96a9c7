// The UCX data plane against the real kvdnd (label: transfer): UCX results equal gRPC's bit for
// bit over shared memory and tcp, 32 MiB chunks, many concurrent transfers, a client killed
// mid-transfer (the lease is released, the daemon stays healthy), lease expiry, and wrong or
// foreign descriptors.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <thread>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "daemon_process.h"
#include "kvdn/client/client.h"
#include "kvdn/client/data_plane_client.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/common/hash.h"
#include "kvdn/common/mutex.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"
#include "kvdn/transfer/ucx_transport.h"
#include "kvdn/v1/admin_service.grpc.pb.h"
#include "kvdn/v1/data_plane.pb.h"
#include "kvdn/v1/kv_service.grpc.pb.h"

namespace kvdn {
namespace {

using ::kvdn::testing::DaemonProcess;
using ::kvdn::testing::RandomBytes;
using ::kvdn::testing::StatusIs;
using ::kvdn::testing::TempDir;
using ::testing::HasSubstr;

ModelSpec Model() { return {"dp-model", 4, 8, 128, Dtype::kBFloat16, 256}; }    // 4 MiB chunks
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

// The value of the unlabelled metric `name` on kvdnd's /metrics ("" when absent).
std::string Metric(int http_port, absl::string_view name) {
  auto [code, body] = testing::HttpGet(http_port, "/metrics");
  for (absl::string_view line : absl::StrSplit(body, '\n')) {
    if (absl::StartsWith(line, absl::StrCat(name, " ")))
      return std::string(line.substr(name.size() + 1));
  }
  return "";
}

// kvdnd's AdminService.GetStats (a failed call is a test failure and reads as empty stats).
v1::GetStatsResponse Stats(const std::string& target) {
  auto stub = v1::AdminService::NewStub(client::MakeChannel(target));
  grpc::ClientContext ctx;
  v1::GetStatsResponse r;
  EXPECT_TRUE(stub->GetStats(&ctx, {}, &r).ok());
  return r;
}

uint64_t LeasesActive(const std::string& target) { return Stats(target).leases_active(); }

// Nothing is left leased or reserved: a Get's lease ends when kvdnd's send completes, which can
// be just after the client has the bytes (the receiver's acknowledgement is still on its way), so
// "left" means still held after `wait`.
void ExpectNothingHeld(const std::string& target, absl::Duration wait = absl::Seconds(5)) {
  v1::GetStatsResponse st = Stats(target);
  for (const absl::Time until = absl::Now() + wait;
       st.leases_active() + st.reservations_active() != 0 && absl::Now() < until;
       st = Stats(target)) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(st.reservations_active(), 0u);
  EXPECT_EQ(st.leases_active(), 0u);
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
  const v1::GetStatsResponse st = Stats(daemon_.unix_target());
  std::string all;
  for (const auto& t : st.transports()) all += t + "\n";
  EXPECT_THAT(all, HasSubstr("ucx-local"));
  EXPECT_THAT(all, HasSubstr("ucx-remote"));
  ExpectNothingHeld(daemon_.unix_target());
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
  ExpectNothingHeld(daemon_.unix_target());
}

// kvdnd with two lanes of each transport kind.
class DataPlaneLanesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string err;
    ASSERT_TRUE(daemon_.Start({"--data-plane-threads", "2"}, &err)) << err;
  }
  // A UCX-only client of this kvdnd over its unix socket, with `lanes` lanes.
  client::ClientOptions LaneOptions(ModelSpec model, int lanes) {
    client::ClientOptions o;
    o.target = daemon_.unix_target();
    o.model = std::move(model);
    o.data_plane = client::ClientOptions::DataPlane::kUcx;
    o.data_plane_lanes = lanes;
    return o;
  }
  // kvdnd's count of calls of `method` that ended OK (/metrics).
  int Calls(absl::string_view method) {
    auto [code, body] = testing::HttpGet(daemon_.http_port(), "/metrics");
    const std::string label = absl::StrCat("method=\"", method, "\"");
    for (absl::string_view line : absl::StrSplit(body, '\n')) {
      if (absl::StartsWith(line, "kvdn_grpc_requests_total{") && absl::StrContains(line, label) &&
          absl::StrContains(line, "\"OK\"")) {
        return std::stoi(std::string(line.substr(line.rfind(' ') + 1)));
      }
    }
    return 0;
  }
  // kvdnd's transports as GetStats lists them ("ucx-local[i]: ... peers=[...]").
  std::vector<std::string> Transports() {
    const v1::GetStatsResponse st = Stats(daemon_.unix_target());
    return {st.transports().begin(), st.transports().end()};
  }
  TempDir dir_;
  DaemonProcess daemon_{dir_.path()};
};

// With two lanes per transport kind, sessions go to the least loaded: two clients on this host
// land on different shared-memory lanes, and both move bytes correctly.
TEST_F(DataPlaneLanesTest, SessionsSpreadOverLanes) {
  using DP = client::ClientOptions::DataPlane;
  auto a = Connect(daemon_.unix_target(), DP::kUcx);
  auto b = Connect(daemon_.unix_target(), DP::kUcx);
  const auto t = Tokens(256 * 2, 9);
  std::vector<std::vector<uint8_t>> p;
  for (uint64_t s : a->ChunkPayloadSizes(t.size())) p.push_back(RandomBytes(s, 90 + p.size()));
  std::vector<ByteSpan> spans(p.begin(), p.end());
  ASSERT_OK(a->Save(t, spans).status());
  std::vector<std::vector<uint8_t>> g;
  std::vector<MutableByteSpan> bufs;
  for (auto& x : p) g.emplace_back(x.size());
  for (auto& x : g) bufs.emplace_back(x);
  ASSERT_OK(b->Load(t, bufs).status());
  EXPECT_TRUE(g == p);
  int local_lanes_with_a_peer = 0, remote_lanes = 0;
  for (const auto& tr : Transports()) {
    if (absl::StartsWith(tr, "ucx-local[") && absl::StrContains(tr, "peers=[posix")) {
      ++local_lanes_with_a_peer;
    }
    if (absl::StartsWith(tr, "ucx-remote[")) ++remote_lanes;
  }
  EXPECT_EQ(local_lanes_with_a_peer, 2);
  EXPECT_EQ(remote_lanes, 2);
}

// One client with two lanes (data_plane_lanes): its chunks travel over two sessions, which the
// daemon puts on its two shared-memory lanes, bytes identical, no lease left; a lane count out of
// range is refused naming the option.
TEST_F(DataPlaneLanesTest, OneClientsLanesLandOnTheDaemonsLanes) {
  client::ClientOptions o = LaneOptions({"lanes-test", 4, 2, 64, Dtype::kBFloat16, 256}, 2);
  o.parallel_streams = 4;
  ASSERT_OK_AND_ASSIGN(auto c, client::Client::Connect(o));
  EXPECT_THAT(c->DataPlaneInUse(), HasSubstr("(2 lanes)"));
  const auto t = Tokens(256 * 8 + 3, 21);
  std::vector<std::vector<uint8_t>> p;
  for (uint64_t s : c->ChunkPayloadSizes(t.size())) p.push_back(RandomBytes(s, 300 + p.size()));
  std::vector<ByteSpan> spans(p.begin(), p.end());
  ASSERT_OK_AND_ASSIGN(client::SaveResult saved, c->Save(t, spans));
  EXPECT_EQ(saved.chunks_stored, 9u);
  std::vector<std::vector<uint8_t>> g;
  std::vector<MutableByteSpan> bufs;
  for (auto& x : p) g.emplace_back(x.size());
  for (auto& x : g) bufs.emplace_back(x);
  ASSERT_OK_AND_ASSIGN(client::LoadResult loaded, c->Load(t, bufs));
  EXPECT_EQ(loaded.chunks, 9u);
  EXPECT_TRUE(g == p);
  int local_lanes_with_a_peer = 0;
  for (const auto& tr : Transports()) {
    if (absl::StartsWith(tr, "ucx-local[") && absl::StrContains(tr, "peers=[posix")) {
      ++local_lanes_with_a_peer;
    }
  }
  EXPECT_EQ(local_lanes_with_a_peer, 2);
  ExpectNothingHeld(daemon_.unix_target());
}

// A client's first transfer opens all its lanes at once (not one per transfer as they come up):
// after a single Get, kvdnd has a session from each of the client's 4 lanes.
TEST_F(DataPlaneLanesTest, TheFirstTransferOpensEveryLane) {
  const client::ClientOptions o = LaneOptions({"lanes-open", 2, 2, 64, Dtype::kBFloat16, 16}, 4);
  ASSERT_OK_AND_ASSIGN(auto c, client::Client::Connect(o));
  const auto chunk = testing::RandomChunk(testing::InfoForBytes(64 << 10), 9);
  const ChunkKey key = testing::KeyFor(4242, "lanes-open");
  {
    client::ClientOptions g = o;  // stored over gRPC: this client's lanes stay closed
    g.data_plane = client::ClientOptions::DataPlane::kGrpc;
    ASSERT_OK_AND_ASSIGN(auto w, client::Client::Connect(g));
    ASSERT_OK(w->PutEncoded(key, chunk).status());
  }
  std::vector<uint8_t> back(chunk.size());
  ASSERT_OK_AND_ASSIGN(uint64_t n, c->GetEncoded(key, MutableByteSpan(back)));
  EXPECT_EQ(n, chunk.size());
  EXPECT_TRUE(back == chunk);
  int sessions = 0;
  for (const auto& tr : Transports()) {
    const size_t at = tr.find("peers=[");
    if (!absl::StartsWith(tr, "ucx-local[") || at == std::string::npos) continue;
    const std::string peers = tr.substr(at + 7, tr.find(']', at) - at - 7);
    const std::vector<std::string> each = absl::StrSplit(peers, ' ', absl::SkipEmpty());
    sessions += static_cast<int>(each.size());
  }
  EXPECT_EQ(sessions, 4) << absl::StrJoin(Transports(), "\n");
}

// A Put of one chunk to a daemon on another host (here kvdnd's tcp address) keeps 4 parts in
// flight even with one lane; over shared memory (the unix socket) it goes whole; a Save of four
// chunks at once moves each whole either way. The bytes come back identical.
TEST_F(DataPlaneLanesTest, ARemotePutOfOneChunkMovesInPartsOnOneLane) {
  uint64_t seed = 70;
  for (const auto& [target, tls, parts] :
       {std::tuple{daemon_.tcp_target(), "tcp", 4}, std::tuple{daemon_.unix_target(), "", 1}}) {
    SCOPED_TRACE(target);
    client::ClientOptions o = LaneOptions({"remote-put", 3, 2, 40, Dtype::kBFloat16, 250}, 1);
    o.target = target;
    o.ucx_transports = tls;
    o.part_bytes = 4096;  // 240000-byte payloads: 58 parts by size
    ASSERT_OK_AND_ASSIGN(auto c, client::Client::Connect(o));
    for (const size_t chunks : {size_t{1}, size_t{4}}) {
      const auto t = Tokens(250 * chunks, ++seed);
      std::vector<std::vector<uint8_t>> p;
      for (uint64_t n : c->ChunkPayloadSizes(t.size())) p.push_back(RandomBytes(n, ++seed));
      const std::vector<ByteSpan> spans(p.begin(), p.end());
      const int before = Calls("UcxPut");
      ASSERT_OK_AND_ASSIGN(client::SaveResult saved, c->Save(t, spans));
      EXPECT_EQ(saved.chunks_stored, chunks);
      EXPECT_EQ(Calls("UcxPut") - before, static_cast<int>(chunks == 1 ? parts : chunks))
          << chunks << " chunk(s)";
      std::vector<std::vector<uint8_t>> g;
      for (auto& x : p) g.emplace_back(x.size());
      std::vector<MutableByteSpan> bufs(g.begin(), g.end());
      ASSERT_OK_AND_ASSIGN(client::LoadResult r, c->Load(t, bufs));
      EXPECT_EQ(r.tokens, t.size());
      EXPECT_TRUE(g == p);
    }
  }
  ExpectNothingHeld(daemon_.unix_target());
}

// Chunks moved in parts (ClientOptions.part_bytes) over a client's 4 lanes, over shared memory
// and tcp: a PutEncoded and a one-chunk Save are stored in 4 parts (4 UcxPut each, kvdnd
// reserving at the first and committing after the last; a chunk under two parts' worth goes
// whole) and read back identical by a gRPC-only client; GetEncoded (also into a buffer
// larger than the chunk: the last parts are then empty), ReadDescriptor and a one-chunk Load get
// the stored bytes in 4 parts; a Load of four chunks moves each whole (the other chunks keep the
// lanes busy). A chunk stored already is not sent again; a payload that does not match its
// header's checksum is refused at Commit (DATA_LOSS), and its reservation is not left behind.
TEST_F(DataPlaneLanesTest, ChunksMoveInPartsOverSeveralLanesBitIdentical) {
  // 240000-byte payloads.
  client::ClientOptions o = LaneOptions({"parts-test", 3, 2, 40, Dtype::kBFloat16, 250}, 4);
  o.part_bytes = 4096;
  client::ClientOptions plain = o;
  plain.target = daemon_.unix_target();
  plain.data_plane = client::ClientOptions::DataPlane::kGrpc;
  ASSERT_OK_AND_ASSIGN(auto grpc_only, client::Client::Connect(plain));
  // kvdnd counts a UcxGet when its send has ended, which may be just after the client has the
  // bytes: the count `before + n` is awaited (2 s at most), then read.
  auto gets_after = [&](int before, int n) {
    const absl::Time until = absl::Now() + absl::Seconds(2);
    while (Calls("UcxGet") < before + n && absl::Now() < until) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    absl::SleepFor(absl::Milliseconds(50));  // and no more come
    return Calls("UcxGet") - before;
  };
  // The UcxGet count once the Gets before it are all counted: unchanged over 100 ms (2 s at most).
  auto settled_gets = [&]() {
    int n = Calls("UcxGet");
    for (const absl::Time until = absl::Now() + absl::Seconds(2); absl::Now() < until;) {
      absl::SleepFor(absl::Milliseconds(100));
      const int m = Calls("UcxGet");
      if (m == n) break;
      n = m;
    }
    return n;
  };
  uint64_t seed = 31;
  for (const auto& [target, tls] : {std::pair{daemon_.unix_target(), std::string()},
                                    std::pair{daemon_.tcp_target(), std::string("tcp")}}) {
    SCOPED_TRACE(target);
    o.target = target;
    o.ucx_transports = tls;
    ASSERT_OK_AND_ASSIGN(auto c, client::Client::Connect(o));
    const auto t = Tokens(250 * 3 + 7, ++seed);
    ASSERT_OK_AND_ASSIGN(std::vector<ChunkKey> keys,
                         ChunkKeysForTokens(o.ns, o.model, t, /*include_tail=*/true));
    std::vector<std::vector<uint8_t>> p;
    for (uint64_t s : c->ChunkPayloadSizes(t.size())) p.push_back(RandomBytes(s, seed + p.size()));
    // Stored in parts: the first chunk by a one-chunk Save, the others by PutEncoded.
    int puts = Calls("UcxPut");
    const ByteSpan first_payload[1] = {ByteSpan(p[0])};
    ASSERT_OK_AND_ASSIGN(client::SaveResult saved, c->Save(t, first_payload));
    EXPECT_EQ(saved.chunks_stored, 1u);
    for (size_t i = 1; i < p.size(); ++i) {
      const ChunkInfo info{o.model.dtype, o.model.num_layers, o.model.num_kv_heads,
                           o.model.head_dim, static_cast<uint32_t>(i < 3 ? 250 : 7)};
      ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> encoded, EncodeChunk(info, p[i]));
      ASSERT_OK_AND_ASSIGN(bool stored, c->PutEncoded(keys[i], encoded));
      EXPECT_TRUE(stored) << "chunk " << i;
    }
    // The 7-token tail (6720 bytes, less than two parts) goes whole, the others in 4 parts.
    EXPECT_EQ(Calls("UcxPut") - puts, 4 * 3 + 1);
    {
      std::vector<std::vector<uint8_t>> g;
      std::vector<MutableByteSpan> bufs;
      for (auto& x : p) g.emplace_back(x.size());
      for (auto& x : g) bufs.emplace_back(x);
      ASSERT_OK(grpc_only->Load(t, bufs).status());
      EXPECT_TRUE(g == p) << "stored in parts, read whole over gRPC";
    }
    // Stored already: the parts are answered at once, their bytes not taken.
    const std::string bytes_in = Metric(daemon_.http_port(), "kvdn_payload_bytes_received_total");
    ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> encoded,
                         EncodeChunk({o.model.dtype, 3, 2, 40, 250}, p[1]));
    ASSERT_OK_AND_ASSIGN(bool again, c->PutEncoded(keys[1], encoded));
    EXPECT_FALSE(again);
    EXPECT_EQ(Metric(daemon_.http_port(), "kvdn_payload_bytes_received_total"), bytes_in);
    // GetEncoded into an exact buffer and into one 3 pages too large.
    for (size_t extra : {size_t{0}, size_t{3 * 4096}}) {
      std::vector<uint8_t> back(kChunkHeaderBytes + p[1].size() + extra, 0xEE);
      const int before = settled_gets();
      ASSERT_OK_AND_ASSIGN(uint64_t n, c->GetEncoded(keys[1], MutableByteSpan(back)));
      ASSERT_EQ(n, kChunkHeaderBytes + p[1].size());
      EXPECT_TRUE(std::equal(p[1].begin(), p[1].end(), back.begin() + kChunkHeaderBytes));
      EXPECT_TRUE(std::all_of(back.begin() + n, back.end(), [](uint8_t b) { return b == 0xEE; }));
      EXPECT_EQ(gets_after(before, 4), 4) << "one UcxGet per part";
    }
    // Under a lease.
    ASSERT_OK_AND_ASSIGN(client::TransferDescriptor d,
                         c->AcquireDescriptor(keys[2], absl::Seconds(10)));
    std::vector<uint8_t> leased(d.size);
    ASSERT_OK_AND_ASSIGN(uint64_t n, c->ReadDescriptor(d, MutableByteSpan(leased)));
    ASSERT_EQ(n, d.size);
    EXPECT_TRUE(std::equal(p[2].begin(), p[2].end(), leased.begin() + kChunkHeaderBytes));
    ASSERT_OK(c->ReleaseDescriptor(d));
    // Load of the first chunk alone (in parts), then of all four (each whole; the tail is short).
    std::vector<uint8_t> first(p[0].size(), 0);
    const MutableByteSpan one[1] = {MutableByteSpan(first)};
    ASSERT_OK_AND_ASSIGN(client::LoadResult r1, c->Load(t, one));
    EXPECT_EQ(r1.chunks, 1u);
    EXPECT_TRUE(first == p[0]);
    std::vector<std::vector<uint8_t>> g;
    std::vector<MutableByteSpan> bufs;
    for (auto& x : p) g.emplace_back(x.size());
    for (auto& x : g) bufs.emplace_back(x);
    const int before = settled_gets();
    ASSERT_OK_AND_ASSIGN(client::LoadResult all, c->Load(t, bufs));
    EXPECT_EQ(all.tokens, t.size());
    EXPECT_TRUE(g == p);
    EXPECT_EQ(gets_after(before, 4), 4) << "four chunks on four lanes: no parts";
    // A payload that does not hash to its header's checksum.
    ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> bad,
                         EncodeChunk({o.model.dtype, 3, 2, 40, 250}, p[0]));
    bad[kChunkHeaderBytes + 100000] ^= 0x10;
    EXPECT_THAT(c->PutEncoded(testing::KeyFor(++seed, o.ns), bad).status(),
                StatusIs(absl::StatusCode::kDataLoss));
  }
  ExpectNothingHeld(daemon_.unix_target());
}

// Flips one bit of every copy of `pattern` in process `pid`'s writable mappings of kvdnd's host
// arena size, `arena_bytes` (madvise(MADV_HUGEPAGE) splits the arena off the 2 MiB it over-maps
// for alignment; without huge-page support it stays one mapping of arena_bytes + 2 MiB), through
// /proc/PID/mem, as a bit of rot in the daemon's memory would. Returns the copies changed, or an
// error saying why the memory could not be written.
absl::StatusOr<int> FlipInProcessMemory(pid_t pid, uint64_t arena_bytes, ByteSpan pattern) {
  std::ifstream maps(absl::StrCat("/proc/", pid, "/maps"));
  const int fd = open(absl::StrCat("/proc/", pid, "/mem").c_str(), O_RDWR);
  if (fd < 0) return absl::PermissionDeniedError(std::strerror(errno));
  int flipped = 0;
  std::string line;
  std::vector<uint8_t> buf(8 << 20);
  while (std::getline(maps, line)) {
    uint64_t lo = 0, hi = 0;
    char perms[5] = {};
    if (std::sscanf(line.c_str(), "%lx-%lx %4s", &lo, &hi, perms) != 3) continue;
    const bool arena = hi - lo == arena_bytes || hi - lo == arena_bytes + (2 << 20);
    if (!arena || perms[0] != 'r' || perms[1] != 'w') continue;
    // Blocks overlap by the pattern's length, so a copy across a block edge is found too.
    for (uint64_t at = lo; at < hi; at += buf.size() - pattern.size()) {
      const ssize_t n =
          pread(fd, buf.data(), std::min<uint64_t>(buf.size(), hi - at), static_cast<off_t>(at));
      if (n <= 0) break;
      for (uint8_t* h = buf.data(); h + pattern.size() <= buf.data() + n; ++h) {
        h = static_cast<uint8_t*>(memmem(h, buf.data() + n - h, pattern.data(), pattern.size()));
        if (h == nullptr) break;
        const uint8_t b = *h ^ 0x20;
        if (pwrite(fd, &b, 1, static_cast<off_t>(at + (h - buf.data()))) != 1) {
          close(fd);
          return absl::PermissionDeniedError(std::strerror(errno));
        }
        ++flipped;
      }
      if (at + buf.size() >= hi) break;
    }
  }
  close(fd);
  return flipped;
}

// End-to-end integrity: a stored chunk whose bytes rot in kvdnd's memory after the Put (the Put
// verified them) is served as it is, and the client's Load catches it, over UCX in parts (each
// part summed on the lane that received it, folded after) and whole, and over gRPC: DATA_LOSS
// naming the chunk, never the bad bytes as a success. kvdnd's own inspect agrees, and the daemon
// serves on with no lease left.
TEST_F(DataPlaneLanesTest, BytesThatRotInTheDaemonAreCaughtByTheClientsLoad) {
  // One 240000-byte payload (4 parts of 60000 over 4 lanes).
  client::ClientOptions o = LaneOptions({"rot-test", 3, 2, 40, Dtype::kBFloat16, 250}, 4);
  o.part_bytes = 4096;
  ASSERT_OK_AND_ASSIGN(auto c, client::Client::Connect(o));
  client::ClientOptions whole = o;
  whole.part_bytes = 0;
  ASSERT_OK_AND_ASSIGN(auto w, client::Client::Connect(whole));
  client::ClientOptions plain = o;
  plain.data_plane = client::ClientOptions::DataPlane::kGrpc;
  ASSERT_OK_AND_ASSIGN(auto g, client::Client::Connect(plain));
  const auto t = Tokens(250, 77);
  ASSERT_OK_AND_ASSIGN(std::vector<ChunkKey> keys, ChunkKeysForTokens(o.ns, o.model, t, true));
  const std::vector<uint8_t> p = RandomBytes(c->ChunkPayloadSizes(t.size())[0], 78);
  const ByteSpan payloads[1] = {ByteSpan(p)};
  ASSERT_OK_AND_ASSIGN(client::SaveResult saved, c->Save(t, payloads));
  ASSERT_EQ(saved.chunks_stored, 1u);
  std::vector<uint8_t> back(p.size());
  const MutableByteSpan out[1] = {MutableByteSpan(back)};
  ASSERT_OK(c->Load(t, out).status());
  ASSERT_TRUE(back == p);

  // 64 bytes inside the third part (150000 of 240000).
  absl::StatusOr<int> flipped =
      FlipInProcessMemory(daemon_.pid(), 256ull << 20, ByteSpan(p).subspan(150000, 64));
  if (!flipped.ok()) GTEST_SKIP() << "cannot write kvdnd's memory here: " << flipped.status();
  ASSERT_EQ(*flipped, 1) << "the payload's bytes, once in the host arena";

  for (client::Client* each : {c.get(), w.get(), g.get()}) {
    SCOPED_TRACE(each->DataPlaneInUse());
    std::fill(back.begin(), back.end(), 0);
    EXPECT_THAT(each->Load(t, out).status(),
                StatusIs(absl::StatusCode::kDataLoss, HasSubstr(keys[0].ToString())));
  }
  auto admin = v1::AdminService::NewStub(client::MakeChannel(daemon_.unix_target()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::InspectChunkRequest req;
  req.set_key_text(keys[0].ToString());
  v1::InspectChunkResponse resp;
  ASSERT_TRUE(admin->InspectChunk(&ctx, req, &resp).ok());
  EXPECT_FALSE(resp.checksum_ok());
  // Serving on: another chunk round-trips, and nothing is left leased or reserved.
  const auto t2 = Tokens(250, 79);
  const std::vector<uint8_t> p2 = RandomBytes(p.size(), 80);
  const ByteSpan payloads2[1] = {ByteSpan(p2)};
  ASSERT_OK(c->Save(t2, payloads2).status());
  ASSERT_OK(c->Load(t2, out).status());
  EXPECT_TRUE(back == p2);
  ExpectNothingHeld(daemon_.unix_target());
}

// The protocol's parts (DataPlaneGetRequest.payload_offset / payload_length) follow pread's rule:
// a part inside the payload lands at its offset, one reaching past the end is cut there, one
// starting at or past the end is empty, length 0 reads to the end; every reply gives the whole
// payload's size, and nothing outside the part is written.
TEST_F(DataPlaneTest, PartsOfAPayloadFollowPreadsRule) {
  const ChunkInfo info{Dtype::kFloat16, 3, 1, 40, 777};  // 372960-byte payload
  const auto chunk = testing::RandomChunk(info, 77);
  const ChunkKey key = testing::KeyFor(77, "tenant-a");
  auto c = Connect(daemon_.unix_target(), client::ClientOptions::DataPlane::kGrpc);
  ASSERT_OK(c->PutEncoded(key, chunk).status());
  auto stub = v1::KvService::NewStub(client::MakeChannel(daemon_.unix_target()));
  ASSERT_OK_AND_ASSIGN(auto dp, client::DataPlaneClient::Open(stub.get(), /*same_host=*/true, "",
                                                              absl::Seconds(10)));
  const uint64_t size = chunk.size() - kChunkHeaderBytes;
  struct Case {
    uint64_t offset, length, expect;
  };
  for (const Case& k : {Case{3 * 4096 + 5, 1000, 1000}, Case{size - 10, 100, 10}, Case{size, 0, 0},
                        Case{size + 4096, 10, 0}, Case{0, 0, size}, Case{12345, 0, size - 12345}}) {
    SCOPED_TRACE(absl::StrCat("offset ", k.offset, " length ", k.length));
    std::vector<uint8_t> buf(size, 0xEE);
    auto place = [&](ByteSpan header, uint64_t n) -> absl::StatusOr<MutableByteSpan> {
      EXPECT_TRUE(std::equal(header.begin(), header.end(), chunk.begin()));
      EXPECT_EQ(n, size);
      return MutableByteSpan(buf);
    };
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    auto ticket = dp->StartGet(key, 0, {k.offset, k.length}, place, deadline);
    uint64_t got = 99;
    ASSERT_OK_AND_ASSIGN(uint64_t whole, dp->FinishGet(ticket, deadline, &got));
    EXPECT_EQ(whole, size);
    ASSERT_EQ(got, k.expect);
    const auto payload = chunk.begin() + kChunkHeaderBytes;
    for (uint64_t i = 0; i < size; ++i) {
      const bool in_part = i >= k.offset && i < k.offset + got;
      ASSERT_EQ(buf[i], in_part ? payload[i] : 0xEE) << "byte " << i;
    }
  }
  ExpectNothingHeld(daemon_.unix_target());
}

// GetDescriptors leases a run of chunks in one call: from the first key to the first that is not
// stored; each descriptor reads back the chunk; releasing them (one by one, or all in one call)
// leaves no lease. Without a GPU tier gpu_only leases nothing.
TEST_F(DataPlaneTest, GetDescriptorsLeasesTheRunOfStoredChunks) {
  using DP = client::ClientOptions::DataPlane;
  auto c = Connect(daemon_.unix_target(), DP::kUcx);
  const auto t = Tokens(256 * 3, 55);
  std::vector<std::vector<uint8_t>> p;
  for (uint64_t s : c->ChunkPayloadSizes(t.size())) p.push_back(RandomBytes(s, 500 + p.size()));
  std::vector<ByteSpan> spans(p.begin(), p.end());
  ASSERT_OK(c->Save(t, spans).status());
  ASSERT_OK_AND_ASSIGN(std::vector<ChunkKey> keys,
                       ChunkKeysForTokens(c->options().ns, c->options().model, t, true));
  std::vector<ChunkKey> asked = {keys[0], keys[1], testing::KeyFor(999), keys[2]};
  ASSERT_OK_AND_ASSIGN(std::vector<client::TransferDescriptor> ds,
                       c->AcquireDescriptors(asked, absl::Seconds(10)));
  ASSERT_EQ(ds.size(), 2u);
  EXPECT_EQ(LeasesActive(daemon_.unix_target()), 2u);
  for (size_t i = 0; i < ds.size(); ++i) {
    EXPECT_FALSE(ds[i].gpu.has_value());
    std::vector<uint8_t> got(ds[i].size);
    ASSERT_OK_AND_ASSIGN(uint64_t n, c->ReadDescriptor(ds[i], MutableByteSpan(got)));
    ASSERT_EQ(n, kChunkHeaderBytes + p[i].size());
    EXPECT_TRUE(std::equal(p[i].begin(), p[i].end(), got.begin() + kChunkHeaderBytes));
    ASSERT_OK(c->ReleaseDescriptor(ds[i]));
  }
  // Many at once: one call releases the run; releasing it again names the first unknown lease.
  ASSERT_OK_AND_ASSIGN(ds, c->AcquireDescriptors(keys, absl::Seconds(10)));
  ASSERT_EQ(ds.size(), 3u);
  EXPECT_EQ(LeasesActive(daemon_.unix_target()), 3u);
  ASSERT_OK(c->ReleaseDescriptors(ds));
  EXPECT_EQ(LeasesActive(daemon_.unix_target()), 0u);
  EXPECT_THAT(c->ReleaseDescriptors(ds),
              StatusIs(absl::StatusCode::kNotFound,
                       HasSubstr(absl::StrCat("lease_ids[0]: no lease ", ds[0].lease_id))));
  ASSERT_OK_AND_ASSIGN(auto gpu_only, c->AcquireDescriptors(keys, absl::Seconds(10), true, true));
  EXPECT_TRUE(gpu_only.empty()) << "this kvdnd has no GPU tier";
  ExpectNothingHeld(daemon_.unix_target());
}

// Client::Connect checks every option (no daemon needed: connecting is lazy) and reports the
// automatic values it chose.
TEST(ClientOptionsTest, BadOptionsNameTheFieldAndAutomaticValuesAreReported) {
  auto base = [] {
    client::ClientOptions o;
    o.target = "unix:/nonexistent/kvdnd.sock";
    o.model = {"options-test", 4, 2, 64, Dtype::kBFloat16, 256};
    return o;
  };
  struct Case {
    std::function<void(client::ClientOptions&)> mutate;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](auto& o) { o.ns = ""; }, "ClientOptions.ns"},
      {[](auto& o) { o.model.num_layers = 0; }, "ClientOptions.model"},
      {[](auto& o) { o.deadline = absl::ZeroDuration(); }, "ClientOptions.deadline"},
      {[](auto& o) { o.max_attempts = 0; }, "ClientOptions.max_attempts"},
      {[](auto& o) { o.parallel_streams = -1; }, "ClientOptions.parallel_streams outside [0, 256]"},
      {[](auto& o) { o.parallel_streams = 257; }, "ClientOptions.parallel_streams outside"},
      {[](auto& o) { o.frame_bytes = 100; }, "ClientOptions.frame_bytes"},
      {[](auto& o) { o.async_threads = 0; }, "ClientOptions.async_threads"},
      {[](auto& o) { o.data_plane_lanes = -1; },
       "ClientOptions.data_plane_lanes -1 outside [0, 64]"},
      {[](auto& o) { o.data_plane_lanes = 65; },
       "ClientOptions.data_plane_lanes 65 outside [0, 64]"},
      {[](auto& o) { o.part_bytes = 4095; }, "ClientOptions.part_bytes 4095 below 4096 (0: whole)"},
  };
  for (const Case& k : cases) {
    client::ClientOptions o = base();
    k.mutate(o);
    EXPECT_THAT(client::Client::Connect(o).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(k.message)));
  }
  ASSERT_OK_AND_ASSIGN(auto c, client::Client::Connect(base()));
  const int lanes = std::clamp(static_cast<int>(std::thread::hardware_concurrency()) / 2, 1, 8);
  EXPECT_EQ(c->options().data_plane_lanes, lanes);
  EXPECT_EQ(c->options().parallel_streams, std::max(4, lanes));
  client::ClientOptions explicit_values = base();
  explicit_values.data_plane_lanes = 3;
  explicit_values.parallel_streams = 2;
  ASSERT_OK_AND_ASSIGN(auto e, client::Client::Connect(explicit_values));
  EXPECT_EQ(e->options().data_plane_lanes, 3);
  EXPECT_EQ(e->options().parallel_streams, 2);
}

// Saves into a host tier far smaller than the data: most reservations need a chunk demoted to disk
// first, which kvdnd does off its progress thread (Reserve would block); every chunk loads back
// identical, most of them from disk.
// A kvdnd whose host tier (48 MiB) holds far less than the tests save, and a UCX client of it.
class DataPlaneSpillTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string err;
    ASSERT_TRUE(daemon.Start({"--host-tier-bytes", "48MiB"}, &err)) << err;
    c = Connect(daemon.unix_target(), client::ClientOptions::DataPlane::kUcx);
  }
  // Random payloads for the chunks of `t` (seeds from `seed` on) and their spans.
  void Fill(const std::vector<int32_t>& t, uint64_t seed) {
    for (uint64_t s : c->ChunkPayloadSizes(t.size())) p.push_back(RandomBytes(s, seed + p.size()));
    spans.assign(p.begin(), p.end());
  }
  TempDir dir;
  DaemonProcess daemon{dir.path()};
  std::unique_ptr<client::Client> c;
  std::vector<std::vector<uint8_t>> p;
  std::vector<ByteSpan> spans;
};

TEST_F(DataPlaneSpillTest, PutsIntoAFullHostTierWaitForDemotionAndLoadBackIdentical) {
  const auto t = Tokens(256 * 40, 77);  // 40 chunks, 160 MiB
  Fill(t, 500);
  ASSERT_OK_AND_ASSIGN(auto saved, c->Save(t, spans));
  EXPECT_EQ(saved.chunks_stored, p.size());
  std::vector<std::vector<uint8_t>> g;
  std::vector<MutableByteSpan> b;
  for (auto& x : p) g.emplace_back(x.size());
  for (auto& x : g) b.emplace_back(x);
  ASSERT_OK_AND_ASSIGN(auto r, c->Load(t, b));
  EXPECT_EQ(r.tokens, t.size());
  for (size_t i = 0; i < p.size(); ++i) EXPECT_TRUE(g[i] == p[i]) << "chunk " << i;
  const v1::GetStatsResponse st = Stats(daemon.unix_target());
  uint64_t demotions = 0;
  for (const auto& tier : st.tiers()) demotions += tier.demotions();
  EXPECT_GT(demotions, 0u);
  ExpectNothingHeld(daemon.unix_target());
}

// A run of descriptors whose last chunk is on disk only: kvdnd leases the chunks in memory on
// gRPC's thread and goes on from the disk chunk on its blocking pool, so each chunk is leased, and
// counted as a hit, once.
TEST_F(DataPlaneSpillTest, AGetDescriptorsRunThatReachesDiskCountsEachHitOnce) {
  const auto t = Tokens(256 * 24, 78);  // 24 chunks of 4 MiB: the first ones end up on disk only
  Fill(t, 900);
  ASSERT_OK(c->Save(t, spans).status());
  ASSERT_OK_AND_ASSIGN(std::vector<ChunkKey> keys,
                       ChunkKeysForTokens(c->options().ns, c->options().model, t, true));
  // Where each chunk is (ListChunks reads no chunk, so it moves none).
  auto tier_of = [&](const ChunkKey& k) {
    auto stub = v1::AdminService::NewStub(client::MakeChannel(daemon.unix_target()));
    grpc::ClientContext ctx;
    v1::ListChunksRequest rq;
    rq.set_page_size(10000);
    v1::ListChunksResponse r;
    EXPECT_TRUE(stub->ListChunks(&ctx, rq, &r).ok());
    for (const auto& chunk : r.chunks()) {
      if (chunk.key_text() == k.ToString()) return chunk.tier();
    }
    return v1::TIER_UNSPECIFIED;
  };
  ASSERT_EQ(tier_of(keys[0]), v1::TIER_DISK);
  ASSERT_EQ(tier_of(keys[keys.size() - 2]), v1::TIER_HOST);
  ASSERT_EQ(tier_of(keys.back()), v1::TIER_HOST);
  auto hits = [&] {
    const v1::GetStatsResponse st = Stats(daemon.unix_target());
    uint64_t n = 0;
    for (const auto& tier : st.tiers()) n += tier.hits();
    return n;
  };
  const uint64_t before = hits();
  const std::vector<ChunkKey> asked = {keys[keys.size() - 1], keys[keys.size() - 2], keys[0]};
  ASSERT_OK_AND_ASSIGN(std::vector<client::TransferDescriptor> ds,
                       c->AcquireDescriptors(asked, absl::Seconds(10)));
  ASSERT_EQ(ds.size(), 3u);
  EXPECT_EQ(hits() - before, 3u) << "a chunk leased on gRPC's thread was leased again on the pool";
  EXPECT_EQ(LeasesActive(daemon.unix_target()), 3u);
  const size_t index[] = {p.size() - 1, p.size() - 2, 0};
  for (size_t i = 0; i < ds.size(); ++i) {
    std::vector<uint8_t> got(ds[i].size);
    ASSERT_OK_AND_ASSIGN(uint64_t n, c->ReadDescriptor(ds[i], MutableByteSpan(got)));
    ASSERT_EQ(n, kChunkHeaderBytes + p[index[i]].size());
    EXPECT_TRUE(std::equal(p[index[i]].begin(), p[index[i]].end(), got.begin() + kChunkHeaderBytes))
        << "chunk " << index[i];
  }
  ASSERT_OK(c->ReleaseDescriptors(ds));
  ExpectNothingHeld(daemon.unix_target());
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
  ExpectNothingHeld(daemon_.unix_target());
}

// The children of the killed-client tests, run until they are killed: LoadForever loads one
// 32 MiB chunk over and over on one lane (one session); MoveForever Saves and Loads 32 MiB chunks,
// each in 4 parts over 4 lanes. Both load the chunk the test saved (Tokens(256, 55)).
[[noreturn]] void LoadAndSaveForever(const std::string& target, const std::string& tls, int lanes,
                                     bool save) {
  client::ClientOptions o;
  o.target = target;
  o.model = BigModel();
  o.ns = "tenant-a";
  o.data_plane = client::ClientOptions::DataPlane::kUcx;
  o.ucx_transports = tls;
  o.data_plane_lanes = lanes;
  o.part_bytes = 4 << 20;
  auto c = client::Client::Connect(o).value();
  const auto t = Tokens(256, 55);
  std::vector<uint8_t> buf(c->ChunkPayloadSizes(t.size())[0]);
  const MutableByteSpan bufs[1] = {MutableByteSpan(buf)};
  const ByteSpan payload[1] = {ByteSpan(buf)};
  for (uint64_t i = 1000;; ++i) {
    if (save) (void)c->Save(Tokens(256, i), payload);
    (void)c->Load(t, bufs);
  }
}
[[noreturn]] void LoadForever(const std::string& target, const std::string& tls) {
  LoadAndSaveForever(target, tls, /*lanes=*/1, /*save=*/false);
}
[[noreturn]] void MoveForever(const std::string& target, const std::string& tls) {
  LoadAndSaveForever(target, tls, /*lanes=*/4, /*save=*/true);
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
      execl("/proc/self/exe", "data_plane_test", "--move-forever", target.c_str(), tls.c_str(),
            nullptr);
      _exit(1);
    }
    absl::SleepFor(absl::Milliseconds(700));  // mid-way through some Save or Load
    ASSERT_EQ(kill(pid, SIGKILL), 0);
    ASSERT_EQ(waitpid(pid, nullptr, 0), pid);
    // The lease or reservation of the transfer it died in (parts of a Get or of a Put that kvdnd
    // was assembling) is released within the deadline.
    SCOPED_TRACE(target);
    ExpectNothingHeld(daemon_.unix_target(), absl::Seconds(25));
  }
  // The daemon serves on, over both paths.
  RoundTrip(*c, *c, 256 * 2, 56);
  auto g = Connect(daemon_.unix_target(), DP::kGrpc, BigModel());
  RoundTrip(*g, *c, 256, 57);
  EXPECT_EQ(daemon_.Stop(), 0);
}

// Engines die without closing their sessions (OOM kills, restarts). Shared memory cannot notice
// a dead peer, so kvdnd ends the session of a same-host client whose process is gone: with room
// for two sessions, three clients killed one after the other still leave room for a fourth.
TEST(DataPlaneSessionsTest, SessionsOfClientsKilledWithoutClosingAreReaped) {
  using DP = client::ClientOptions::DataPlane;
  TempDir dir;
  const std::string config = dir.path() + "/kvdn.json";
  {
    std::ofstream f(config);
    f << R"({"max_data_plane_sessions": 2})";
  }
  DaemonProcess daemon(dir.path());
  std::string err;
  ASSERT_TRUE(daemon.Start({"--config", config}, &err)) << err;
  auto saver = Connect(daemon.unix_target(), DP::kGrpc, BigModel());  // holds no session
  const auto t = Tokens(256, 55);                                     // what --load-forever loads
  auto payload = RandomBytes(saver->ChunkPayloadSizes(t.size())[0], 55);
  const ByteSpan spans[1] = {ByteSpan(payload)};
  ASSERT_OK(saver->Save(t, spans).status());
  for (int i = 0; i < 3; ++i) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      execl("/proc/self/exe", "data_plane_test", "--load-forever", daemon.unix_target().c_str(), "",
            nullptr);
      _exit(1);
    }
    absl::SleepFor(absl::Milliseconds(700));
    ASSERT_EQ(kill(pid, SIGKILL), 0);
    ASSERT_EQ(waitpid(pid, nullptr, 0), pid);
  }
  // A fourth client gets a shared-memory session (kUcx: no fallback to gRPC) and loads.
  auto c = Connect(daemon.unix_target(), DP::kUcx, BigModel());
  std::vector<uint8_t> got(payload.size());
  const MutableByteSpan bufs[1] = {MutableByteSpan(got)};
  ASSERT_OK_AND_ASSIGN(auto r, c->Load(t, bufs));
  EXPECT_EQ(r.tokens, t.size());
  EXPECT_TRUE(got == payload);
  EXPECT_TRUE(absl::StartsWith(c->DataPlaneInUse(), "ucx")) << c->DataPlaneInUse();
  ExpectNothingHeld(daemon.unix_target(), absl::Seconds(25));
  EXPECT_EQ(daemon.Stop(), 0);
}

// Raw data-plane messages, as a buggy or hostile client would send them: each gets its exact
// status in the reply (or, with no session to answer, is dropped and counted), and the daemon
// stays healthy and stores nothing.
class RawDataPlaneTest : public DataPlaneTest {
 protected:
  void SetUp() override {
    DataPlaneTest::SetUp();
    transfer::UcxTransportOptions o;
    o.transports = "posix,cma";
    ASSERT_OK_AND_ASSIGN(t_, transfer::UcxTransport::Create(o));
    t_->SetHandler(v1::DATA_PLANE_GET_REPLY, [this](std::unique_ptr<transfer::Incoming> in) {
      v1::DataPlaneGetReply r;
      r.ParseFromString(in->header());
      Deliver(r.code(), r.message());
    });
    t_->SetHandler(v1::DATA_PLANE_PUT_REPLY, [this](std::unique_ptr<transfer::Incoming> in) {
      v1::DataPlanePutReply r;
      r.ParseFromString(in->header());
      Deliver(r.code(), r.message());
    });
    auto stub = v1::KvService::NewStub(client::MakeChannel(daemon_.unix_target()));
    v1::OpenDataPlaneRequest req;
    req.set_worker_address(t_->address());
    req.set_pid(getpid());
    v1::OpenDataPlaneResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->OpenDataPlane(&ctx, req, &resp).ok());
    session_ = resp.session_id();
    ASSERT_OK_AND_ASSIGN(peer_, t_->Connect(resp.worker_address(), {resp.pid()}));
    // A malformed worker address is refused naming the field.
    v1::OpenDataPlaneRequest bad;
    bad.set_worker_address("not an address");
    grpc::ClientContext ctx2;
    const grpc::Status st = stub->OpenDataPlane(&ctx2, bad, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(st.error_message(), HasSubstr("worker_address"));
  }
  void TearDown() override { t_.reset(); }
  void Deliver(int code, std::string message) {
    MutexLock lock(&mu_);
    replies_.emplace_back(code, std::move(message));
    cv_.SignalAll();
  }
  // Sends one message and returns the reply's status (UNKNOWN "no reply" after 3 s).
  absl::Status Exchange(uint16_t type, const google::protobuf::Message& header, ByteSpan payload) {
    Send(type, header, payload);
    return NextReply();
  }
  void Send(uint16_t type, const google::protobuf::Message& header, ByteSpan payload) {
    t_->Send(peer_, type, header.SerializeAsString(), payload, nullptr,
             absl::Now() + absl::Seconds(5), [](absl::Status) {});
  }
  // The next reply's status (UNKNOWN "no reply" after 3 s).
  absl::Status NextReply() {
    MutexLock lock(&mu_);
    const absl::Time end = absl::Now() + absl::Seconds(3);
    while (replies_.empty() && absl::Now() < end) cv_.WaitWithTimeout(&mu_, end - absl::Now());
    if (replies_.empty()) return absl::UnknownError("no reply");
    auto [code, msg] = replies_.front();
    replies_.erase(replies_.begin());
    return absl::Status(static_cast<absl::StatusCode>(code), msg);
  }
  void SetKey(v1::ChunkKey* k, std::string ns = "tenant-a") {
    k->set_namespace_(std::move(ns));
    k->set_fingerprint(42);
    k->set_prefix_hash(std::string(16, 'h'));
  }
  // One of the two parts (at payload `offset`) of Put `put_id` by key (SetKey's, in `ns`) of the
  // chunk whose 64-byte header is `header`.
  v1::DataPlanePutRequest PartOfTwo(const uint8_t* header, uint64_t put_id, uint64_t offset,
                                    absl::Time deadline, std::string ns = "tenant-a") {
    v1::DataPlanePutRequest r;
    r.set_session_id(session_);
    r.set_request_id(put_id * 2 + (offset == 0 ? 0 : 1));
    SetKey(r.mutable_key(), std::move(ns));
    r.set_chunk_header(header, kChunkHeaderBytes);
    r.set_part(true);
    r.set_parts(2);
    r.set_put_id(put_id);
    r.set_payload_offset(offset);
    r.set_deadline_unix_micros(absl::ToUnixMicros(deadline));
    return r;
  }

  std::unique_ptr<transfer::UcxTransport> t_;
  transfer::PeerId peer_ = 0;
  uint64_t session_ = 0;
  Mutex mu_;
  CondVar cv_;
  std::vector<std::pair<int, std::string>> replies_ ABSL_GUARDED_BY(mu_);
};

TEST_F(RawDataPlaneTest, EachBadMessageGetsItsExactStatusAndNothingIsStored) {
  const ChunkInfo info{Dtype::kBFloat16, 1, 1, 64, 16};
  auto payload = RandomBytes(info.PayloadBytes(), 1);
  uint8_t header[kChunkHeaderBytes];
  WriteChunkHeader(info, Xxh3_64(ByteSpan(payload)), MutableByteSpan(header, sizeof(header)));
  auto put = [&](auto edit) {
    v1::DataPlanePutRequest r;
    r.set_session_id(session_);
    r.set_request_id(1);
    SetKey(r.mutable_key());
    r.set_chunk_header(header, sizeof(header));
    edit(r);
    return r;
  };
  // Garbage chunk header.
  EXPECT_THAT(Exchange(v1::DATA_PLANE_PUT, put([](auto& r) { r.set_chunk_header("short"); }),
                       ByteSpan(payload)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("chunk_header")));
  // Payload size differing from the header's.
  EXPECT_THAT(Exchange(v1::DATA_PLANE_PUT, put([](auto&) {}),
                       ByteSpan(payload).subspan(0, payload.size() - 8)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("payload bytes")));
  // Payload whose checksum is not the header's: DATA_LOSS at commit.
  auto corrupted = payload;
  corrupted[5] ^= 1;
  EXPECT_THAT(Exchange(v1::DATA_PLANE_PUT, put([](auto&) {}), ByteSpan(corrupted)),
              StatusIs(absl::StatusCode::kDataLoss));
  // Malformed namespace; unknown reservation.
  EXPECT_THAT(
      Exchange(v1::DATA_PLANE_PUT, put([&](auto& r) { SetKey(r.mutable_key(), "bad ns!"); }),
               ByteSpan(payload)),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("namespace")));
  EXPECT_THAT(Exchange(v1::DATA_PLANE_PUT, put([](auto& r) { r.set_reservation_id(777); }),
                       ByteSpan(payload)),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("reservation_id")));
  // A part: by key without a part count or a put_id; past the payload's end; with no bytes.
  EXPECT_THAT(Exchange(v1::DATA_PLANE_PUT, put([](auto& r) { r.set_part(true); }),
                       ByteSpan(payload).subspan(0, 4096)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("parts: a Put in parts")));
  EXPECT_THAT(Exchange(v1::DATA_PLANE_PUT, put([](auto& r) {
                         r.set_part(true);
                         r.set_parts(65);
                         r.set_put_id(1);
                       }),
                       ByteSpan(payload).subspan(0, 4096)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("says 65")));
  EXPECT_THAT(Exchange(v1::DATA_PLANE_PUT, put([](auto& r) {
                         r.set_part(true);
                         r.set_parts(2);
                       }),
                       ByteSpan(payload).subspan(0, 4096)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("put_id")));
  auto part_into = [&](uint64_t offset) {
    return put([offset](auto& r) {
      r.set_reservation_id(777);
      r.set_part(true);
      r.set_payload_offset(offset);
    });
  };
  EXPECT_THAT(Exchange(v1::DATA_PLANE_PUT, part_into(payload.size() - 100),
                       ByteSpan(payload).subspan(0, 4096)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("payload_offset")));
  EXPECT_THAT(Exchange(v1::DATA_PLANE_PUT, part_into(0), ByteSpan()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no bytes")));
  // Get: no target; unknown key; unknown lease.
  v1::DataPlaneGetRequest g;
  g.set_session_id(session_);
  EXPECT_THAT(Exchange(v1::DATA_PLANE_GET, g, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("neither key nor lease")));
  SetKey(g.mutable_key());
  EXPECT_THAT(Exchange(v1::DATA_PLANE_GET, g, {}), StatusIs(absl::StatusCode::kNotFound));
  g.set_lease_id(31337);
  EXPECT_THAT(Exchange(v1::DATA_PLANE_GET, g, {}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("lease_id")));
  // Unknown session: nobody to answer; dropped and counted.
  g.set_session_id(session_ + 1000);
  EXPECT_THAT(Exchange(v1::DATA_PLANE_GET, g, {}), StatusIs(absl::StatusCode::kUnknown));
  auto [code, body] = testing::HttpGet(daemon_.http_port(), "/metrics");
  EXPECT_THAT(body, ::testing::ContainsRegex("kvdn_bad_requests_total [1-9]"));
  // Nothing was stored, and a well-formed Put still works.
  EXPECT_THAT(body, HasSubstr(R"(kvdn_tier_chunks{tier="host"} 0)"));
  EXPECT_OK(Exchange(v1::DATA_PLANE_PUT, put([](auto&) {}), ByteSpan(payload)));
  ExpectNothingHeld(daemon_.unix_target());
}

// A Put in parts by key (DataPlanePutRequest.parts / put_id), message by message: two parts that
// add up are stored (both answered OK, the chunk reads back); parts whose sizes fall short of the
// payload or exceed it, that name another chunk under the same put_id, that overlap, or whose
// bytes do not hash to the header's checksum fail the Put and store nothing; a Put whose
// second part never comes ends at its deadline with DEADLINE_EXCEEDED, leaving no reservation.
TEST_F(RawDataPlaneTest, PutsInPartsByKeyAreAssembledOrRefusedWhole) {
  const ChunkInfo info{Dtype::kBFloat16, 2, 1, 64, 64};  // 32 KiB payload
  auto payload = RandomBytes(info.PayloadBytes(), 2);
  uint8_t header[kChunkHeaderBytes];
  WriteChunkHeader(info, Xxh3_64(ByteSpan(payload)), MutableByteSpan(header, sizeof(header)));
  auto part = [&](uint64_t put_id, uint64_t offset, absl::Time deadline, std::string ns) {
    return PartOfTwo(header, put_id, offset, deadline, std::move(ns));
  };
  const absl::Time later = absl::Now() + absl::Seconds(20);
  const ByteSpan all(payload);
  // Sizes that do not add up: 8 KiB + 8 KiB of 32 KiB.
  Send(v1::DATA_PLANE_PUT, part(5, 0, later, "tenant-a"), all.subspan(0, 8192));
  Send(v1::DATA_PLANE_PUT, part(5, 8192, later, "tenant-a"), all.subspan(8192, 8192));
  for (int i = 0; i < 2; ++i) {
    EXPECT_THAT(NextReply(), StatusIs(absl::StatusCode::kInvalidArgument,
                                      HasSubstr("carry 16384 bytes of a 32768-byte payload")));
  }
  // More bytes than the payload: 16 KiB + 24 KiB of 32 KiB.
  Send(v1::DATA_PLANE_PUT, part(9, 0, later, "tenant-a"), all.subspan(0, 16384));
  Send(v1::DATA_PLANE_PUT, part(9, 8192, later, "tenant-a"), all.subspan(8192));
  for (int i = 0; i < 2; ++i) {
    EXPECT_THAT(NextReply(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("more parts or bytes")));
  }
  // The second part names another chunk (namespace) than the first.
  Send(v1::DATA_PLANE_PUT, part(6, 0, later, "tenant-a"), all.subspan(0, 16384));
  Send(v1::DATA_PLANE_PUT, part(6, 16384, later, "tenant-b"), all.subspan(16384));
  for (int i = 0; i < 2; ++i) {
    EXPECT_THAT(NextReply(), StatusIs(absl::StatusCode::kInvalidArgument));
  }
  // Sizes that add up, but the parts overlap: the first 16 KiB twice, the last 16 KiB never.
  Send(v1::DATA_PLANE_PUT, part(10, 0, later, "tenant-a"), all.subspan(0, 16384));
  Send(v1::DATA_PLANE_PUT, part(10, 0, later, "tenant-a"), all.subspan(0, 16384));
  for (int i = 0; i < 2; ++i) {
    EXPECT_THAT(NextReply(), StatusIs(absl::StatusCode::kInvalidArgument,
                                      HasSubstr("overlap, so some payload bytes were never sent")));
  }
  // A byte of the second part differs from what the header's checksum covers (the parts sent
  // last first): DATA_LOSS, nothing stored.
  std::vector<uint8_t> bad(payload);
  bad[20000] ^= 0x40;
  Send(v1::DATA_PLANE_PUT, part(11, 16384, later, "tenant-a"), ByteSpan(bad).subspan(16384));
  Send(v1::DATA_PLANE_PUT, part(11, 0, later, "tenant-a"), ByteSpan(bad).subspan(0, 16384));
  for (int i = 0; i < 2; ++i) {
    EXPECT_THAT(NextReply(), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("its header says")));
  }
  // Only the first part comes: its answer comes after the deadline (at the next Put).
  Send(v1::DATA_PLANE_PUT, part(7, 0, absl::Now() + absl::Milliseconds(300), "tenant-a"),
       all.subspan(0, 16384));
  absl::SleepFor(absl::Milliseconds(500));
  Send(v1::DATA_PLANE_PUT, part(8, 0, later, "tenant-a"), all.subspan(0, 16384));
  EXPECT_THAT(NextReply(), StatusIs(absl::StatusCode::kDeadlineExceeded,
                                    HasSubstr("only 1 of the Put's 2 parts came")));
  // Put 8's second part: stored, both parts answered OK.
  Send(v1::DATA_PLANE_PUT, part(8, 16384, later, "tenant-a"), all.subspan(16384));
  EXPECT_OK(NextReply());
  EXPECT_OK(NextReply());
  auto [code, body] = testing::HttpGet(daemon_.http_port(), "/metrics");
  EXPECT_THAT(body, HasSubstr(R"(kvdn_tier_chunks{tier="host"} 1)"));
  const v1::GetStatsResponse st = Stats(daemon_.unix_target());
  EXPECT_EQ(st.reservations_active(), 0u);
  // What was stored is the payload.
  auto c = Connect(daemon_.unix_target(), client::ClientOptions::DataPlane::kGrpc);
  std::vector<uint8_t> back(kChunkHeaderBytes + payload.size());
  const std::string h(16, 'h');  // SetKey's
  const ChunkKey key{"tenant-a", 42,
                     Hash128::FromCanonical(reinterpret_cast<const uint8_t*>(h.data()))};
  ASSERT_OK_AND_ASSIGN(uint64_t n, c->GetEncoded(key, MutableByteSpan(back)));
  ASSERT_EQ(n, back.size());
  EXPECT_TRUE(std::equal(payload.begin(), payload.end(), back.begin() + kChunkHeaderBytes));
}

// More Puts in parts at once than kvdnd assembles (4096, kMaxAssemblies): the next one's first
// part is refused RESOURCE_EXHAUSTED at once; those in flight end DEADLINE_EXCEEDED at their
// deadline with their reservations aborted, and a Put in parts is stored again after them.
TEST_F(RawDataPlaneTest, PutsInPartsPastTheAssemblyLimitAreRefusedAndNothingLeaks) {
  const ChunkInfo info{Dtype::kBFloat16, 1, 1, 16, 64};  // 4 KiB payload
  auto payload = RandomBytes(info.PayloadBytes(), 4);
  uint8_t header[kChunkHeaderBytes];
  WriteChunkHeader(info, Xxh3_64(ByteSpan(payload)), MutableByteSpan(header, sizeof(header)));
  const ByteSpan all(payload);
  const uint64_t half = payload.size() / 2;
  auto part = [&](uint64_t put_id, uint64_t offset, absl::Time deadline) {
    v1::DataPlanePutRequest r = PartOfTwo(header, put_id, offset, deadline);
    r.mutable_key()->set_fingerprint(put_id);  // a chunk of its own per Put
    return r;
  };
  constexpr int kLimit = 4096;
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  // Only the first half of each: kvdnd holds every one (a reservation each) until its deadline.
  // One session's messages are handled in order, so all of them are held before the next.
  for (uint64_t id = 1; id <= kLimit; ++id) {
    Send(v1::DATA_PLANE_PUT, part(id, 0, deadline), all.subspan(0, half));
  }
  Send(v1::DATA_PLANE_PUT, part(kLimit + 1, 0, deadline), all.subspan(0, half));
  EXPECT_THAT(NextReply(), StatusIs(absl::StatusCode::kResourceExhausted,
                                    HasSubstr("4096 Puts in parts are in flight")));
  ASSERT_LT(absl::Now(), deadline) << "the test sent too slowly to see the limit";
  // After their deadline the next Put ends them; it is then assembled and stored.
  absl::SleepFor(deadline + absl::Milliseconds(200) - absl::Now());
  const absl::Time later = absl::Now() + absl::Seconds(20);
  Send(v1::DATA_PLANE_PUT, part(kLimit + 2, 0, later), all.subspan(0, half));
  Send(v1::DATA_PLANE_PUT, part(kLimit + 2, half, later), all.subspan(half));
  int expired = 0, ok = 0, other = 0;
  for (int i = 0; i < kLimit + 2; ++i) {
    const absl::Status st = NextReply();
    if (absl::IsDeadlineExceeded(st) &&
        absl::StrContains(st.message(), "only 1 of the Put's 2 parts came")) {
      ++expired;
    } else if (st.ok()) {
      ++ok;
    } else {
      ++other;
      if (other <= 3) ADD_FAILURE() << st;
    }
  }
  EXPECT_EQ(expired, kLimit);
  EXPECT_EQ(ok, 2);
  EXPECT_EQ(other, 0);
  const v1::GetStatsResponse st = Stats(daemon_.unix_target());
  EXPECT_EQ(st.reservations_active(), 0u);
  auto [code, body] = testing::HttpGet(daemon_.http_port(), "/metrics");
  EXPECT_THAT(body, HasSubstr(R"(kvdn_tier_chunks{tier="host"} 1)"));
}

// Parts into a reservation (KvService.Reserve, then DataPlanePutRequest.part with reservation_id,
// then KvService.Commit): each part is answered once its bytes are in, nothing is stored until
// the Commit, which verifies the whole payload; a reservation written only in part fails its
// Commit with DATA_LOSS.
TEST_F(RawDataPlaneTest, PartsIntoAReservationAreCommittedByTheClient) {
  const ChunkInfo info{Dtype::kBFloat16, 2, 1, 64, 64};  // 32 KiB payload
  auto payload = RandomBytes(info.PayloadBytes(), 3);
  uint8_t header[kChunkHeaderBytes];
  WriteChunkHeader(info, Xxh3_64(ByteSpan(payload)), MutableByteSpan(header, sizeof(header)));
  auto stub = v1::KvService::NewStub(client::MakeChannel(daemon_.unix_target()));
  auto reserve = [&](uint64_t seed) {
    v1::ReserveRequest req;
    client::KeyToProto(testing::KeyFor(seed, "tenant-a"), req.mutable_key());
    req.set_size(kChunkHeaderBytes + payload.size());
    v1::ReserveResponse resp;
    grpc::ClientContext ctx;
    EXPECT_TRUE(stub->Reserve(&ctx, req, &resp).ok());
    return resp.transfer().id();
  };
  auto part = [&](uint64_t reservation, uint64_t offset) {
    v1::DataPlanePutRequest r;
    r.set_session_id(session_);
    r.set_request_id(reservation * 100 + offset);
    r.set_reservation_id(reservation);
    r.set_chunk_header(header, sizeof(header));
    r.set_part(true);
    r.set_payload_offset(offset);
    return r;
  };
  auto commit = [&](uint64_t reservation) {
    v1::CommitRequest req;
    req.set_reservation_id(reservation);
    req.set_payload_checksum(Xxh3_64(ByteSpan(payload)));
    v1::CommitResponse resp;
    grpc::ClientContext ctx;
    return stub->Commit(&ctx, req, &resp);
  };
  const ByteSpan all(payload);
  // Both halves, the second first.
  const uint64_t whole = reserve(11);
  EXPECT_OK(Exchange(v1::DATA_PLANE_PUT, part(whole, 16384), all.subspan(16384)));
  EXPECT_OK(Exchange(v1::DATA_PLANE_PUT, part(whole, 0), all.subspan(0, 16384)));
  auto [code, body] = testing::HttpGet(daemon_.http_port(), "/metrics");
  EXPECT_THAT(body, HasSubstr(R"(kvdn_tier_chunks{tier="host"} 0)")) << "not before the Commit";
  ASSERT_TRUE(commit(whole).ok());
  auto c = Connect(daemon_.unix_target(), client::ClientOptions::DataPlane::kGrpc);
  std::vector<uint8_t> back(kChunkHeaderBytes + payload.size());
  ASSERT_OK_AND_ASSIGN(uint64_t n,
                       c->GetEncoded(testing::KeyFor(11, "tenant-a"), MutableByteSpan(back)));
  ASSERT_EQ(n, back.size());
  EXPECT_TRUE(std::equal(payload.begin(), payload.end(), back.begin() + kChunkHeaderBytes));
  // Only the first half: the Commit finds the payload does not hash to the checksum.
  const uint64_t half = reserve(12);
  EXPECT_OK(Exchange(v1::DATA_PLANE_PUT, part(half, 0), all.subspan(0, 16384)));
  EXPECT_EQ(commit(half).error_code(), grpc::StatusCode::DATA_LOSS);
  ExpectNothingHeld(daemon_.unix_target());
}

// A DaemonSet kvdnd and an engine pod without hostPID share the unix socket (hostPath) but not the
// pid namespace, which UCX's shared memory needs: the session is refused with the reason, the
// SDK (kAuto) goes on over gRPC with identical results, and kUcx says why it cannot.
TEST(DataPlanePidNamespaceTest, AClientInAnotherPidNamespaceFallsBackToGrpc) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root (unshare --pid)";
  if (std::system("unshare --pid --fork true >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "unshare --pid does not work here";
  }
  TempDir dir;
  DaemonProcess daemon(dir.path());
  daemon.set_launcher({"unshare", "--pid", "--fork", "--kill-child"});
  std::string err;
  ASSERT_TRUE(daemon.Start({}, &err)) << err;
  using DP = client::ClientOptions::DataPlane;
  auto any = Connect(daemon.unix_target(), DP::kAuto);
  auto grpc_only = Connect(daemon.unix_target(), DP::kGrpc);
  const auto t = Tokens(256 * 2 + 9, 5);
  std::vector<std::vector<uint8_t>> payloads;
  for (uint64_t s : any->ChunkPayloadSizes(t.size())) payloads.push_back(RandomBytes(s, 7));
  std::vector<ByteSpan> spans(payloads.begin(), payloads.end());
  ASSERT_OK(any->Save(t, spans).status());
  EXPECT_EQ(any->DataPlaneInUse(), "grpc");
  std::vector<std::vector<uint8_t>> got;
  std::vector<MutableByteSpan> bufs;
  for (uint64_t s : grpc_only->ChunkPayloadSizes(t.size())) got.emplace_back(s, 0);
  for (auto& g : got) bufs.emplace_back(g);
  ASSERT_OK_AND_ASSIGN(auto r, grpc_only->Load(t, bufs));
  EXPECT_EQ(r.tokens, t.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(got[i] == payloads[i]) << "chunk " << i;
  auto ucx = Connect(daemon.unix_target(), DP::kUcx);
  const auto fresh = Tokens(256, 6);  // not stored yet: Save has to move it
  const ByteSpan one[1] = {spans[0]};
  EXPECT_THAT(ucx->Save(fresh, one).status(),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("another pid namespace")));
  ExpectNothingHeld(daemon.unix_target());
  // Killed, not stopped: unshare does not pass SIGTERM on (its --kill-child ends kvdnd).
  EXPECT_THAT(daemon.log(), ::testing::Not(HasSubstr("Caught signal")));
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
  if (argc == 4 && std::string(argv[1]) == "--move-forever") kvdn::MoveForever(argv[2], argv[3]);
  if (argc == 4 && absl::EndsWith(argv[1], "-forever")) {
    // A child started with a mode this binary lacks must not run the tests (their daemons would
    // outlive it when it is killed).
    std::fprintf(stderr, "data_plane_test: unknown child mode %s\n", argv[1]);
    return 2;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
