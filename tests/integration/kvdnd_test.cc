// Integration tests against the real kvdnd binary: SDK round trips, prefix lookup, restart,
// a table of bad requests (each with its exact status, the daemon healthy after), drain,
// /metrics through promtool, every kvdnctl subcommand, and server reflection.
#include <google/protobuf/descriptor.pb.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "daemon_process.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "kvdn/client/client.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/common/malloc_tuning.h"
#include "kvdn/proto/grpc_status.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"
#include "kvdn/transfer/ucx_transport.h"
#include "kvdn/v1/admin_service.grpc.pb.h"
#include "kvdn/v1/kv_service.grpc.pb.h"
#include "kvdn/v1/peer_service.grpc.pb.h"

namespace kvdn {
namespace {

using ::kvdn::testing::DaemonProcess;
using ::kvdn::testing::RandomBytes;
using ::kvdn::testing::RandomTokens;
using ::kvdn::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::Not;

ModelSpec SmallModel() { return {"test-model", 2, 2, 64, Dtype::kBFloat16, 16}; }

std::unique_ptr<client::Client> Connect(const std::string& target, ModelSpec model = SmallModel(),
                                        std::string ns = "tenant-a") {
  client::ClientOptions o;
  o.target = target;
  o.model = std::move(model);
  o.ns = std::move(ns);
  o.deadline = absl::Seconds(20);
  return client::Client::Connect(o).value();
}

// Random payloads for every chunk of `tokens`.
std::vector<std::vector<uint8_t>> Payloads(client::Client& c, size_t tokens, uint64_t seed) {
  std::vector<std::vector<uint8_t>> out;
  for (uint64_t s : c.ChunkPayloadSizes(tokens)) out.push_back(RandomBytes(s, seed++));
  return out;
}
std::vector<ByteSpan> Spans(const std::vector<std::vector<uint8_t>>& v) {
  return {v.begin(), v.end()};
}

// Loads `tokens` into fresh buffers of the sizes of `payloads` (filled with 0xEE first), kept in
// `got`.
absl::StatusOr<client::LoadResult> LoadLike(client::Client& c, const std::vector<int32_t>& tokens,
                                            const std::vector<std::vector<uint8_t>>& payloads,
                                            std::vector<std::vector<uint8_t>>* got) {
  got->assign(payloads.size(), {});
  std::vector<MutableByteSpan> bufs;
  for (size_t i = 0; i < got->size(); ++i) {
    (*got)[i].assign(payloads[i].size(), 0xEE);
    bufs.emplace_back((*got)[i]);
  }
  return c.Load(tokens, bufs);
}

template <typename T>
T ValueOr(const absl::StatusOr<T>& s) {
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : T{};
}

bool Serving(const std::string& target) {
  auto stub = grpc::health::v1::Health::NewStub(client::MakeChannel(target));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckResponse r;
  return stub->Check(&ctx, {}, &r).ok() &&
         r.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

class KvdndTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string err;
    ASSERT_TRUE(daemon_.Start(ExtraFlags(), &err)) << err;
  }
  virtual std::vector<std::string> ExtraFlags() { return {}; }
  TempDir dir_;
  DaemonProcess daemon_{dir_.path()};
};

TEST_F(KvdndTest, SaveLoadRoundTripIsBitIdenticalOverUnixAndTcp) {
  for (const std::string& target : {daemon_.unix_target(), daemon_.tcp_target()}) {
    auto c = Connect(target);
    const auto tokens = RandomTokens(16 * 5 + 7, target.size());  // 5 full chunks and a tail
    auto payloads = Payloads(*c, tokens.size(), 11 + target.size());
    ASSERT_OK_AND_ASSIGN(client::SaveResult saved, c->Save(tokens, Spans(payloads)));
    EXPECT_EQ(saved.chunks_stored, 6u);
    std::vector<std::vector<uint8_t>> got;
    ASSERT_OK_AND_ASSIGN(client::LoadResult loaded, LoadLike(*c, tokens, payloads, &got));
    EXPECT_EQ(loaded.tokens, tokens.size());
    EXPECT_EQ(loaded.chunks, 6u);
    EXPECT_EQ(got, payloads);
    // Saving again sends nothing.
    ASSERT_OK_AND_ASSIGN(saved, c->Save(tokens, Spans(payloads)));
    EXPECT_EQ(saved.chunks_stored, 0u);
    EXPECT_EQ(saved.chunks_present, 6u);
  }
}

TEST_F(KvdndTest, ThirtyTwoMiBChunkPassesInFrames) {
  // 32 layers x 256 tokens x 8 heads x 128 dims x bf16 x (K, V) = 32 MiB per chunk.
  auto c = Connect(daemon_.unix_target(), {"big", 32, 8, 128, Dtype::kBFloat16, 256});
  const auto tokens = RandomTokens(256, 5);
  auto payloads = Payloads(*c, tokens.size(), 99);
  ASSERT_EQ(payloads[0].size(), 32u << 20);
  ASSERT_OK(c->Save(tokens, Spans(payloads)).status());
  std::vector<uint8_t> got(32u << 20);
  MutableByteSpan buf(got);
  ASSERT_OK_AND_ASSIGN(auto loaded, c->Load(tokens, absl::MakeSpan(&buf, 1)));
  EXPECT_EQ(loaded.chunks, 1u);
  EXPECT_TRUE(got == payloads[0]);
}

// get_frame_bytes set to an odd size: every Get stream is cut there (the last frame shorter), and
// what the client reassembles is the chunk, bit for bit, over both transports.
class OddGetFramesTest : public KvdndTest {
 protected:
  std::vector<std::string> ExtraFlags() override {
    const std::string cfg = dir_.Sub("frames.json");
    std::ofstream(cfg) << R"({"get_frame_bytes": 4099})";
    return {"--config", cfg};
  }
};

TEST_F(OddGetFramesTest, ChunksReassembleBitIdentical) {
  for (const std::string& target : {daemon_.unix_target(), daemon_.tcp_target()}) {
    auto c = Connect(target);
    const auto tokens = RandomTokens(16 * 3 + 5, target.size() + 3);
    auto payloads = Payloads(*c, tokens.size(), 21 + target.size());
    ASSERT_OK(c->Save(tokens, Spans(payloads)).status());
    std::vector<std::vector<uint8_t>> got;
    ASSERT_OK_AND_ASSIGN(client::LoadResult loaded, LoadLike(*c, tokens, payloads, &got));
    EXPECT_EQ(loaded.chunks, payloads.size());
    EXPECT_EQ(got, payloads);
  }
}

TEST_F(KvdndTest, LookupFindsTheLongestPrefixWithinTheNamespace) {
  auto c = Connect(daemon_.unix_target());
  const auto tokens = RandomTokens(16 * 5, 21);
  auto payloads = Payloads(*c, tokens.size(), 3);
  // Save the first three chunks only.
  ASSERT_OK(c->Save(tokens, absl::MakeConstSpan(Spans(payloads).data(), 3)).status());
  EXPECT_EQ(ValueOr(c->Lookup(tokens)), 48u);
  // A prompt that diverges inside chunk 1 matches chunk 0 only.
  auto diverged = tokens;
  diverged[20] ^= 1;
  EXPECT_EQ(ValueOr(c->Lookup(diverged)), 16u);
  // A shorter prompt inside the stored prefix.
  EXPECT_EQ(ValueOr(c->Lookup(absl::MakeSpan(tokens).subspan(0, 40))), 32u);
  // Another tenant, another model: nothing.
  EXPECT_EQ(ValueOr(Connect(daemon_.unix_target(), SmallModel(), "tenant-b")->Lookup(tokens)), 0u);
  ModelSpec other = SmallModel();
  other.model_name = "other-model";
  EXPECT_EQ(ValueOr(Connect(daemon_.unix_target(), other)->Lookup(tokens)), 0u);
}

TEST_F(KvdndTest, AsyncCallsMatchSyncOnes) {
  auto c = Connect(daemon_.unix_target());
  const auto tokens = RandomTokens(16 * 3, 8);
  auto payloads = Payloads(*c, tokens.size(), 8);
  auto saved = c->SaveAsync(tokens, Spans(payloads)).get();
  ASSERT_OK(saved.status());
  EXPECT_EQ(ValueOr(c->LookupAsync(tokens).get()), 48u);
  std::vector<std::vector<uint8_t>> got(3, std::vector<uint8_t>(payloads[0].size()));
  std::vector<MutableByteSpan> bufs(got.begin(), got.end());
  ASSERT_OK(c->LoadAsync(tokens, bufs).get().status());
  EXPECT_EQ(got, payloads);
}

TEST_F(KvdndTest, RestartFindsChunksOnDisk) {
  const auto tokens = RandomTokens(16 * 4, 31);
  std::vector<std::vector<uint8_t>> payloads;
  {
    auto c = Connect(daemon_.unix_target());
    payloads = Payloads(*c, tokens.size(), 77);
    ASSERT_OK(c->Save(tokens, Spans(payloads)).status());
  }
  ASSERT_EQ(daemon_.Stop(), 0) << daemon_.log();  // SIGTERM: drain, persist, sync
  std::string err;
  ASSERT_TRUE(daemon_.Start({}, &err)) << err;
  auto c = Connect(daemon_.unix_target());
  EXPECT_EQ(ValueOr(c->Lookup(tokens)), 64u);
  std::vector<std::vector<uint8_t>> got(4, std::vector<uint8_t>(payloads[0].size()));
  std::vector<MutableByteSpan> bufs(got.begin(), got.end());
  ASSERT_OK_AND_ASSIGN(auto loaded, c->Load(tokens, bufs));
  EXPECT_EQ(loaded.chunks, 4u);
  EXPECT_EQ(got, payloads);
}

// ---- bad input ----

class BadRequestTest : public KvdndTest {
 protected:
  std::vector<std::string> ExtraFlags() override {
    const std::string cfg = dir_.Sub("config.json");
    // A short reservation TTL for the "expired reservation" case. (A Put's own reservation is
    // held while its stream writes and gets a fresh TTL when the stream ends, so a slow 8 MiB Put
    // under ASan is not cut by it: before that change, 300 ms failed one CI run.)
    std::ofstream(cfg) << R"({"reservation_ttl_ms": 1500, "namespaces": ["tenant-a", "test"]})";
    return {"--config", cfg};
  }
  void SetUp() override {
    KvdndTest::SetUp();
    stub_ = v1::KvService::NewStub(client::MakeChannel(daemon_.unix_target()));
  }
  static void Deadline(grpc::ClientContext* ctx) {
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  }
  static v1::ChunkKey ProtoKey(const ChunkKey& k) {
    v1::ChunkKey p;
    p.set_namespace_(k.ns);
    p.set_fingerprint(k.fingerprint);
    auto c = k.prefix_hash.Canonical();
    p.set_prefix_hash(c.data(), c.size());
    return p;
  }
  // A Put stream's header message.
  static v1::PutRequest PutHeader(const v1::ChunkKey& key, uint64_t size, uint64_t checksum,
                                  uint64_t reservation_id = 0) {
    v1::PutRequest m;
    *m.mutable_header()->mutable_key() = key;
    m.mutable_header()->set_size(size);
    m.mutable_header()->set_payload_checksum(checksum);
    m.mutable_header()->set_reservation_id(reservation_id);
    return m;
  }
  // Streams a Put: header (size, checksum) then `data` in frames of `frame` bytes (stops early
  // after `limit` bytes when given).
  absl::Status Put(const v1::ChunkKey& key, uint64_t size, uint64_t checksum, ByteSpan data,
                   size_t frame = 1 << 20, uint64_t reservation_id = 0) {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::PutResponse resp;
    auto w = stub_->Put(&ctx, &resp);
    v1::PutRequest m = PutHeader(key, size, checksum, reservation_id);
    bool ok = w->Write(m);
    for (size_t off = 0; ok && off < data.size(); off += frame) {
      m.set_data(data.data() + off, std::min(frame, data.size() - off));
      ok = w->Write(m);
    }
    w->WritesDone();
    return FromGrpcStatus(w->Finish());
  }
  // Whether kvdnd's active reservations reach `n` within 10 s.
  bool WaitForReservations(int64_t n) {
    auto admin = v1::AdminService::NewStub(client::MakeChannel(daemon_.unix_target()));
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (;;) {
      grpc::ClientContext ctx;
      Deadline(&ctx);
      v1::GetStatsResponse r;
      if (admin->GetStats(&ctx, {}, &r).ok() &&
          static_cast<int64_t>(r.reservations_active()) == n) {
        return true;
      }
      if (std::chrono::steady_clock::now() >= until) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  absl::Status Reserve(const v1::ChunkKey& key, uint64_t size, v1::ReserveResponse* resp) {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::ReserveRequest rq;
    *rq.mutable_key() = key;
    rq.set_size(size);
    return FromGrpcStatus(stub_->Reserve(&ctx, rq, resp));
  }
  absl::Status GetStatus(const v1::ChunkKey& key) {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::GetRequest req;
    *req.mutable_key() = key;
    auto r = stub_->Get(&ctx, req);
    v1::GetResponse m;
    while (r->Read(&m)) {
    }
    return FromGrpcStatus(r->Finish());
  }
  void ExpectHealthy() {
    EXPECT_TRUE(Serving(daemon_.unix_target()));
    const auto chunk = testing::RandomChunk(testing::InfoForBytes(100000), healthy_seed_);
    const ChunkKey k = testing::KeyFor(1000 + healthy_seed_++);
    ASSERT_OK(Put(ProtoKey(k), chunk.size(), DecodeChunkHeader(chunk)->payload_checksum, chunk));
    auto c = Connect(daemon_.unix_target());
    std::vector<uint8_t> got(chunk.size());
    EXPECT_EQ(ValueOr(c->GetEncoded(k, MutableByteSpan(got))), chunk.size());
    EXPECT_EQ(got, chunk);
  }
  std::unique_ptr<v1::KvService::Stub> stub_;
  uint64_t healthy_seed_ = 1;
};

TEST_F(BadRequestTest, EachGetsItsExactStatusAndTheDaemonStaysHealthy) {
  const auto chunk = testing::RandomChunk(testing::InfoForBytes(3 << 20), 5);
  const uint64_t sum = DecodeChunkHeader(chunk)->payload_checksum;
  const v1::ChunkKey good = ProtoKey(testing::KeyFor(1));

  v1::ChunkKey short_hash = good;
  short_hash.set_prefix_hash(good.prefix_hash().substr(0, 15));
  v1::ChunkKey bad_ns = good;
  bad_ns.set_namespace_("no spaces/allowed");
  v1::ChunkKey other_tenant = good;
  other_tenant.set_namespace_("tenant-z");

  struct Case {
    const char* name;
    std::function<absl::Status()> call;
    absl::StatusCode code;
    const char* message;
  };
  std::vector<uint8_t> corrupt = chunk;
  corrupt[5000] ^= 0x40;
  std::vector<uint8_t> padded = chunk;
  padded.resize(chunk.size() + 10);
  const std::vector<uint8_t> big_frame(2 << 20, 7);
  const std::vector<uint8_t> huge_frame(5 << 20, 7);
  const Case cases[] = {
      {"malformed key (15-byte hash)", [&] { return GetStatus(short_hash); },
       absl::StatusCode::kInvalidArgument, "prefix_hash: 15 bytes, need 16"},
      {"malformed namespace", [&] { return GetStatus(bad_ns); }, absl::StatusCode::kInvalidArgument,
       "key.namespace"},
      {"namespace not served", [&] { return GetStatus(other_tenant); },
       absl::StatusCode::kPermissionDenied, "tenant-z"},
      {"unknown key", [&] { return GetStatus(good); }, absl::StatusCode::kNotFound,
       "is not stored"},
      {"stream without header",
       [&] {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::PutResponse resp;
         auto w = stub_->Put(&ctx, &resp);
         v1::PutRequest m;
         m.set_data("abc");
         w->Write(m);
         w->WritesDone();
         return FromGrpcStatus(w->Finish());
       },
       absl::StatusCode::kInvalidArgument, "first Put message must carry the header"},
      {"second header mid-stream",
       [&] {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::PutResponse resp;
         auto w = stub_->Put(&ctx, &resp);
         const v1::PutRequest m = PutHeader(good, chunk.size(), sum);
         v1::PutRequest d;
         d.set_data(chunk.data(), 1000);
         w->Write(m);
         w->Write(d);
         w->Write(m);
         w->WritesDone();
         return FromGrpcStatus(w->Finish());
       },
       absl::StatusCode::kInvalidArgument, "after the header at byte 1000 is not a data frame"},
      {"stream that ends after its header", [&] { return Put(good, chunk.size(), sum, {}); },
       absl::StatusCode::kInvalidArgument, "ended after 0 of"},
      {"size below a header", [&] { return Put(good, 10, sum, {}); },
       absl::StatusCode::kInvalidArgument, "header.size 10 is outside"},
      {"truncated stream",
       [&] { return Put(good, chunk.size(), sum, ByteSpan(chunk).subspan(0, chunk.size() - 100)); },
       absl::StatusCode::kInvalidArgument, "ended after"},
      {"more bytes than declared", [&] { return Put(good, chunk.size() - 10, sum, chunk); },
       absl::StatusCode::kInvalidArgument, "more than the"},
      {"wrong payload size (trailing bytes)", [&] { return Put(good, padded.size(), sum, padded); },
       absl::StatusCode::kInvalidArgument, ""},
      {"oversized frame (2 MiB > max_frame_bytes)",
       [&] { return Put(good, big_frame.size(), sum, big_frame, big_frame.size()); },
       absl::StatusCode::kInvalidArgument, "exceeds max_frame_bytes"},
      {"frame over the gRPC message limit",
       [&] { return Put(good, huge_frame.size(), sum, huge_frame, huge_frame.size()); },
       absl::StatusCode::kResourceExhausted, ""},
      {"payload corrupted in flight", [&] { return Put(good, corrupt.size(), sum, corrupt); },
       absl::StatusCode::kDataLoss, "hashes to"},
      {"commit checksum mismatch",
       [&]() -> absl::Status {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::ReserveRequest rq;
         *rq.mutable_key() = ProtoKey(testing::KeyFor(2));
         rq.set_size(chunk.size());
         v1::ReserveResponse rr;
         if (auto st = stub_->Reserve(&ctx, rq, &rr); !st.ok()) return FromGrpcStatus(st);
         KVDN_RETURN_IF_ERROR(Put(good, chunk.size(), 0, chunk, 1 << 20, rr.transfer().id()));
         grpc::ClientContext ctx2;
         Deadline(&ctx2);
         v1::CommitRequest c;
         c.set_reservation_id(rr.transfer().id());
         c.set_payload_checksum(sum ^ 1);
         v1::CommitResponse cr;
         return FromGrpcStatus(stub_->Commit(&ctx2, c, &cr));
       },
       absl::StatusCode::kDataLoss, "does not match"},
      {"expired reservation",
       [&]() -> absl::Status {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::ReserveRequest rq;
         *rq.mutable_key() = ProtoKey(testing::KeyFor(3));
         rq.set_size(chunk.size());
         v1::ReserveResponse rr;
         if (auto st = stub_->Reserve(&ctx, rq, &rr); !st.ok()) return FromGrpcStatus(st);
         std::this_thread::sleep_for(std::chrono::milliseconds(2500));  // ttl 1500 ms
         grpc::ClientContext ctx2;
         Deadline(&ctx2);
         v1::CommitRequest c;
         c.set_reservation_id(rr.transfer().id());
         c.set_payload_checksum(sum);
         v1::CommitResponse cr;
         return FromGrpcStatus(stub_->Commit(&ctx2, c, &cr));
       },
       absl::StatusCode::kAborted, "expired"},
      {"reserve of a key another reservation is writing",
       [&]() -> absl::Status {
         v1::ReserveResponse first;
         KVDN_RETURN_IF_ERROR(Reserve(ProtoKey(testing::KeyFor(4)), chunk.size(), &first));
         v1::ReserveResponse second;
         const absl::Status st = Reserve(ProtoKey(testing::KeyFor(4)), chunk.size(), &second);
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::ReleaseRequest rq;
         rq.set_reservation_id(first.transfer().id());
         v1::ReleaseResponse r;
         KVDN_RETURN_IF_ERROR(FromGrpcStatus(stub_->Release(&ctx, rq, &r)));
         return st;
       },
       absl::StatusCode::kAborted, "is being written by reservation"},
      {"reserve of a stored key",
       [&]() -> absl::Status {
         KVDN_RETURN_IF_ERROR(Put(ProtoKey(testing::KeyFor(5)), chunk.size(), sum, chunk));
         v1::ReserveResponse rr;
         return Reserve(ProtoKey(testing::KeyFor(5)), chunk.size(), &rr);
       },
       absl::StatusCode::kAlreadyExists, "is stored"},
      {"commit of an unknown reservation",
       [&]() -> absl::Status {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::CommitRequest c;
         c.set_reservation_id(987654321);
         v1::CommitResponse cr;
         return FromGrpcStatus(stub_->Commit(&ctx, c, &cr));
       },
       absl::StatusCode::kNotFound, "no reservation 987654321"},
      {"release of nothing",
       [&]() -> absl::Status {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::ReleaseResponse r;
         return FromGrpcStatus(stub_->Release(&ctx, {}, &r));
       },
       absl::StatusCode::kInvalidArgument, "lease_id or reservation_id"},
      {"release of lease_ids beside a lease_id",
       [&]() -> absl::Status {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::ReleaseRequest rq;
         rq.set_lease_id(5);
         rq.add_lease_ids(6);
         v1::ReleaseResponse r;
         return FromGrpcStatus(stub_->Release(&ctx, rq, &r));
       },
       absl::StatusCode::kInvalidArgument, "not both"},
      {"release of a zero lease id",
       [&]() -> absl::Status {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::ReleaseRequest rq;
         rq.add_lease_ids(6);
         rq.add_lease_ids(0);
         v1::ReleaseResponse r;
         return FromGrpcStatus(stub_->Release(&ctx, rq, &r));
       },
       absl::StatusCode::kInvalidArgument, "lease_ids[1] is 0"},
      {"release of 4097 lease ids",
       [&]() -> absl::Status {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::ReleaseRequest rq;
         for (int i = 1; i <= 4097; ++i) rq.add_lease_ids(static_cast<uint64_t>(i));
         v1::ReleaseResponse r;
         return FromGrpcStatus(stub_->Release(&ctx, rq, &r));
       },
       absl::StatusCode::kInvalidArgument, "4097 ids; at most 4096"},
      {"lookup hash of the wrong length",
       [&]() -> absl::Status {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::LookupRequest rq;
         rq.set_namespace_("tenant-a");
         rq.add_prefix_hashes(std::string(16, 'a'));
         rq.add_prefix_hashes("short");
         v1::LookupResponse r;
         return FromGrpcStatus(stub_->Lookup(&ctx, rq, &r));
       },
       absl::StatusCode::kInvalidArgument, "prefix_hashes[1]: 5 bytes"},
      {"lease longer than allowed",
       [&]() -> absl::Status {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::GetDescriptorRequest rq;
         *rq.mutable_key() = good;
         rq.set_lease_ms(100000000);
         v1::GetDescriptorResponse r;
         return FromGrpcStatus(stub_->GetDescriptor(&ctx, rq, &r));
       },
       absl::StatusCode::kInvalidArgument, "exceeds max_lease_ttl_ms"},
      {"GetDescriptors with 4097 keys",
       [&]() -> absl::Status {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::GetDescriptorsRequest rq;
         for (int i = 0; i < 4097; ++i) *rq.add_keys() = good;
         v1::GetDescriptorsResponse r;
         return FromGrpcStatus(stub_->GetDescriptors(&ctx, rq, &r));
       },
       absl::StatusCode::kInvalidArgument, "4097 keys; at most 4096 per call"},
      {"GetDescriptors gpu_only without accept_gpu",
       [&]() -> absl::Status {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::GetDescriptorsRequest rq;
         *rq.add_keys() = good;
         rq.set_gpu_only(true);
         v1::GetDescriptorsResponse r;
         return FromGrpcStatus(stub_->GetDescriptors(&ctx, rq, &r));
       },
       absl::StatusCode::kInvalidArgument, "gpu_only needs accept_gpu"},
      {"GetDescriptors with a malformed second key",
       [&]() -> absl::Status {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::GetDescriptorsRequest rq;
         *rq.add_keys() = good;
         *rq.add_keys() = short_hash;
         v1::GetDescriptorsResponse r;
         return FromGrpcStatus(stub_->GetDescriptors(&ctx, rq, &r));
       },
       absl::StatusCode::kInvalidArgument, "keys[1]"},
      {"GPU memory asked for over TCP",
       [&]() -> absl::Status {
         auto tcp = v1::KvService::NewStub(client::MakeChannel(daemon_.tcp_target()));
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::GetDescriptorRequest rq;
         *rq.mutable_key() = good;
         rq.set_accept_gpu(true);
         v1::GetDescriptorResponse r;
         return FromGrpcStatus(tcp->GetDescriptor(&ctx, rq, &r));
       },
       absl::StatusCode::kFailedPrecondition, "CUDA IPC reaches engines on this node only"},
      {"peer probe with a 3-byte hash",
       [&] {
         auto peer = v1::PeerService::NewStub(client::MakeChannel(daemon_.unix_target()));
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::LookupRequest rq;
         rq.set_namespace_("test");
         rq.add_prefix_hashes(good.prefix_hash());
         rq.add_prefix_hashes("abc");
         v1::ProbeResponse r;
         return FromGrpcStatus(peer->Probe(&ctx, rq, &r));
       },
       absl::StatusCode::kInvalidArgument, "prefix_hashes[1]: 3 bytes, need 16"},
      {"peer probe of a namespace not served",
       [&] {
         auto peer = v1::PeerService::NewStub(client::MakeChannel(daemon_.unix_target()));
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::LookupRequest rq;
         rq.set_namespace_("tenant-z");
         rq.add_prefix_hashes(good.prefix_hash());
         v1::ProbeResponse r;
         return FromGrpcStatus(peer->Probe(&ctx, rq, &r));
       },
       absl::StatusCode::kPermissionDenied, "tenant-z"},
      {"data-plane session with an overlong peer_node",
       [&] {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::OpenDataPlaneRequest rq;
         rq.set_worker_address("x");
         rq.set_peer_node(std::string(300, 'n'));
         v1::OpenDataPlaneResponse r;
         return FromGrpcStatus(stub_->OpenDataPlane(&ctx, rq, &r));
       },
       absl::StatusCode::kInvalidArgument, "peer_node: 300 characters, at most 253"},
      {"same-host data-plane session from another pid namespace",
       [&] {
         grpc::ClientContext ctx;
         Deadline(&ctx);
         v1::OpenDataPlaneRequest rq;
         rq.set_worker_address("x");
         rq.set_pid(getpid());
         rq.set_pid_namespace(transfer::NamespaceId("self", "pid") + 1);
         v1::OpenDataPlaneResponse r;
         return FromGrpcStatus(stub_->OpenDataPlane(&ctx, rq, &r));
       },
       absl::StatusCode::kFailedPrecondition, "is in another pid namespace"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    absl::Status st = c.call();
    EXPECT_EQ(st.code(), c.code) << st;
    EXPECT_THAT(std::string(st.message()), HasSubstr(c.message));
    // Nothing half-written became visible.
    EXPECT_THAT(GetStatus(good), testing::StatusIs(absl::StatusCode::kNotFound));
    ExpectHealthy();
  }
  // The good chunk still goes in after all that.
  EXPECT_OK(Put(good, chunk.size(), sum, chunk));
  EXPECT_OK(GetStatus(good));
}

// Get's frames are written as raw slices over the arena (proto/get_frames.h): a client using the
// generated stub reads them as ordinary GetResponse messages. A Get cancelled mid-stream releases
// its lease (the chunk can be deleted at once) and the daemon keeps serving.
TEST_F(BadRequestTest, GeneratedStubReadsGetFramesAndACancelledGetReleasesItsLease) {
  const auto chunk = testing::RandomChunk(testing::InfoForBytes(8 << 20), 11);
  const ChunkKey key = testing::KeyFor(77);
  ASSERT_OK(Put(ProtoKey(key), chunk.size(), DecodeChunkHeader(chunk)->payload_checksum, chunk));
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::GetRequest req;
    *req.mutable_key() = ProtoKey(key);
    auto r = stub_->Get(&ctx, req);
    v1::GetResponse m;
    std::string got;
    int frames = 0;
    while (r->Read(&m)) {
      if (frames++ == 0) {
        EXPECT_EQ(m.size(), chunk.size());
        EXPECT_EQ(m.tier(), v1::TIER_HOST);
      } else {
        EXPECT_EQ(m.size(), 0u);
      }
      EXPECT_LE(m.data().size(), 512u << 10);  // get_frame_bytes' default
      got += m.data();
    }
    ASSERT_OK(FromGrpcStatus(r->Finish()));
    EXPECT_EQ(frames, static_cast<int>((chunk.size() + (512 << 10) - 1) >> 19));
    ASSERT_EQ(got.size(), chunk.size());
    EXPECT_EQ(std::memcmp(got.data(), chunk.data(), chunk.size()), 0);
  }
  auto admin = v1::AdminService::NewStub(client::MakeChannel(daemon_.unix_target()));
  auto leases = [&]() -> int64_t {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::InspectChunkRequest req;
    *req.mutable_key() = ProtoKey(key);
    v1::InspectChunkResponse resp;
    if (!admin->InspectChunk(&ctx, req, &resp).ok()) return -1;
    return resp.chunk().leases();
  };
  EXPECT_EQ(leases(), 0);
  for (int round = 0; round < 5; ++round) {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::GetRequest req;
    *req.mutable_key() = ProtoKey(key);
    auto r = stub_->Get(&ctx, req);
    v1::GetResponse m;
    ASSERT_TRUE(r->Read(&m));
    ctx.TryCancel();
    while (r->Read(&m)) {
    }
    EXPECT_EQ(r->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // gRPC drops the cancelled streams' frames, and with them the leases.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  int64_t n = -1;
  while ((n = leases()) != 0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(n, 0);
  ExpectHealthy();
  auto c = Connect(daemon_.unix_target());
  std::vector<uint8_t> again(chunk.size());
  EXPECT_EQ(ValueOr(c->GetEncoded(key, MutableByteSpan(again))), chunk.size());
  EXPECT_TRUE(again == chunk);
  ASSERT_OK(c->Delete(key));
  EXPECT_EQ(leases(), -1);
}

// A Put stream the client cancels (or drops) after some frames leaves nothing behind: its
// reservation is dropped, the chunk is not stored, and the same key goes in at once after.
TEST_F(BadRequestTest, ACancelledPutLeavesNoReservation) {
  const auto chunk = testing::RandomChunk(testing::InfoForBytes(8 << 20), 12);
  const uint64_t sum = DecodeChunkHeader(chunk)->payload_checksum;
  const v1::ChunkKey key = ProtoKey(testing::KeyFor(78));
  for (int round = 0; round < 5; ++round) {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::PutResponse resp;
    auto w = stub_->Put(&ctx, &resp);
    v1::PutRequest m = PutHeader(key, chunk.size(), sum);
    ASSERT_TRUE(w->Write(m));
    m.set_data(chunk.data(), 1 << 20);
    ASSERT_TRUE(w->Write(m));
    ctx.TryCancel();
    EXPECT_EQ(w->Finish().error_code(), grpc::StatusCode::CANCELLED);
    // kvdnd drops the reservation as it sees the cancellation, after the client's Finish: the
    // next round's Put of the key before that is ABORTED (the next test), so wait.
    EXPECT_TRUE(WaitForReservations(0));
  }
  EXPECT_THAT(GetStatus(key), testing::StatusIs(absl::StatusCode::kNotFound));
  ASSERT_OK(Put(key, chunk.size(), sum, chunk));
  EXPECT_OK(GetStatus(key));
  ExpectHealthy();
}

// A Put of a key another Put is still writing is ABORTED, not answered "stored": the first may
// yet be cancelled (as here), and the second writer would then believe in a chunk kvdnd does not
// have (before, it got OK with stored = false, and the chunk was lost). The SDK retries it: once
// the first write ends, its Put stores the chunk.
TEST_F(BadRequestTest, APutOfAKeyBeingWrittenIsAbortedAndTheSdkRetriesIt) {
  const ChunkKey k = testing::KeyFor(79, "tenant-a");
  const auto chunk = testing::RandomChunk(testing::InfoForBytes(4 << 20), 13);
  const uint64_t sum = DecodeChunkHeader(chunk)->payload_checksum;
  const v1::ChunkKey key = ProtoKey(k);
  client::ClientOptions o;
  o.target = daemon_.unix_target();
  o.model = SmallModel();
  o.ns = "tenant-a";
  o.deadline = absl::Seconds(20);
  o.max_attempts = 20;  // 20 ms doubling: the first write ends well within them
  auto c = client::Client::Connect(o).value();
  for (int round = 0; round < 2; ++round) {
    // The first writer: header and 1 MiB, then it holds the stream open.
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::PutResponse resp;
    auto w = stub_->Put(&ctx, &resp);
    ASSERT_TRUE(w->Write(PutHeader(key, chunk.size(), sum)));
    v1::PutRequest m;
    m.set_data(chunk.data(), 1 << 20);
    ASSERT_TRUE(w->Write(m));
    ASSERT_TRUE(WaitForReservations(1));
    if (round == 0) {
      // A second writer of the same bytes, raw: ABORTED, naming the write in progress.
      EXPECT_THAT(Put(key, chunk.size(), sum, chunk),
                  testing::StatusIs(absl::StatusCode::kAborted, HasSubstr("being written")));
      ctx.TryCancel();
      EXPECT_EQ(w->Finish().error_code(), grpc::StatusCode::CANCELLED);
      ASSERT_TRUE(WaitForReservations(0));
      // Nothing was stored; the second writer was not told otherwise.
      EXPECT_THAT(GetStatus(key), testing::StatusIs(absl::StatusCode::kNotFound));
    } else {
      // Through the SDK, while the first write is cancelled beside it: stored by the SDK's retry.
      std::thread canceller([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(30));
        ctx.TryCancel();
      });
      EXPECT_TRUE(ValueOr(c->PutEncoded(k, ByteSpan(chunk))));
      canceller.join();
      EXPECT_EQ(w->Finish().error_code(), grpc::StatusCode::CANCELLED);
      std::vector<uint8_t> back(chunk.size());
      EXPECT_EQ(ValueOr(c->GetEncoded(k, MutableByteSpan(back))), chunk.size());
      EXPECT_TRUE(back == chunk);
    }
  }
  // A Put of the stored chunk: OK, stored = false.
  auto again = c->PutEncoded(k, ByteSpan(chunk));
  ASSERT_OK(again.status());
  EXPECT_FALSE(*again);
  ExpectHealthy();
}

// namespace_host_share: a tenant writing far more than the host tier holds demotes its own
// chunks to disk; the other tenant's stay in host memory (they were written first, so the
// global LRU would have taken them first), and /metrics shows each namespace's bytes.
class HostShareTest : public KvdndTest {
 protected:
  std::vector<std::string> ExtraFlags() override {
    const std::string cfg = dir_.Sub("share.json");
    std::ofstream(cfg) << R"({"namespace_host_share": 0.25, "namespace_disk_share": 0.75})";
    return {"--config", cfg};
  }
};

TEST_F(HostShareTest, ANoisyTenantPushesOutItsOwnChunksNotTheOthers) {
  const ModelSpec model{"share-model", 2, 8, 128, Dtype::kBFloat16, 256};  // 2 MiB chunks
  auto quiet = Connect(daemon_.unix_target(), model, "quiet");
  auto noisy = Connect(daemon_.unix_target(), model, "noisy");
  const auto q_tokens = RandomTokens(256 * 8, 1);
  auto q_payloads = Payloads(*quiet, q_tokens.size(), 1);
  ASSERT_OK(quiet->Save(q_tokens, Spans(q_payloads)).status());
  const auto n_tokens = RandomTokens(256 * 160, 2);  // 320 MiB: past the 256 MiB host tier
  auto n_payloads = Payloads(*noisy, n_tokens.size(), 2);
  ASSERT_OK(noisy->Save(n_tokens, Spans(n_payloads)).status());
  auto admin = v1::AdminService::NewStub(client::MakeChannel(daemon_.unix_target()));
  auto in_host = [&](const std::string& ns) {
    grpc::ClientContext ctx;
    v1::ListChunksRequest req;
    req.set_namespace_(ns);
    req.set_tier(v1::TIER_HOST);
    v1::ListChunksResponse r;
    EXPECT_TRUE(admin->ListChunks(&ctx, req, &r).ok());
    return r.total();
  };
  EXPECT_EQ(in_host("quiet"), 8u);
  EXPECT_LE(in_host("noisy"), 32u);  // 64 MiB of 2 MiB chunks
  EXPECT_GE(in_host("noisy"), 16u);
  const double noisy_bytes =
      testing::MetricSample(daemon_.http_port(), "kvdn_namespace_host_bytes{namespace=\"noisy\"}");
  EXPECT_GT(noisy_bytes, 0);
  EXPECT_LE(noisy_bytes, 64.0 * (1 << 20));
  // The disk share's books: the noisy tenant's demoted chunks, within 0.75 of the 512 MiB tier.
  const double noisy_disk =
      testing::MetricSample(daemon_.http_port(), "kvdn_namespace_disk_bytes{namespace=\"noisy\"}");
  EXPECT_GT(noisy_disk, 0);
  EXPECT_LE(noisy_disk, 0.75 * 512 * (1 << 20));
  // kvdnctl stats shows each namespace against its share (64 MiB of the 256 MiB host tier, 384 of
  // the 512 MiB disk tier); --json the same figures.
  const std::string ctl = std::string(KVDN_KVDNCTL_PATH) + " --target " + daemon_.unix_target();
  auto [rc, out] = testing::RunCommand(ctl + " stats");
  EXPECT_EQ(rc, 0);
  EXPECT_THAT(out, ::testing::ContainsRegex("NAMESPACE +TIER +BYTES +SHARE +OF_SHARE"));
  EXPECT_THAT(out, ::testing::ContainsRegex("noisy +host +[0-9.]+ MiB +64.0 MiB +[0-9]+%"));
  EXPECT_THAT(out, ::testing::ContainsRegex("noisy +disk +[0-9.]+ MiB +384.0 MiB +[0-9]+%"));
  EXPECT_THAT(out, ::testing::ContainsRegex("quiet +host +16\\.[0-9] MiB +64.0 MiB +2[56]%"));
  std::tie(rc, out) = testing::RunCommand(ctl + " --json stats");
  EXPECT_THAT(out, HasSubstr("\"namespace\": \"noisy\""));
  EXPECT_THAT(out, HasSubstr("\"share_bytes\": \"67108864\""));
  // Everything reads back, from wherever it is.
  std::vector<std::vector<uint8_t>> got;
  ASSERT_OK_AND_ASSIGN(client::LoadResult lq, LoadLike(*quiet, q_tokens, q_payloads, &got));
  EXPECT_EQ(lq.tokens, q_tokens.size());
  EXPECT_EQ(got, q_payloads);
  ASSERT_OK_AND_ASSIGN(client::LoadResult ln, LoadLike(*noisy, n_tokens, n_payloads, &got));
  EXPECT_EQ(ln.tokens, n_tokens.size());
  EXPECT_EQ(got, n_payloads);
}

TEST_F(KvdndTest, DrainRefusesNewDataCallsAndReadyzTurnsNotReady) {
  EXPECT_EQ(testing::HttpGet(daemon_.http_port(), "/readyz").first, 200);
  auto admin = v1::AdminService::NewStub(client::MakeChannel(daemon_.unix_target()));
  grpc::ClientContext ctx;
  v1::DrainResponse dr;
  ASSERT_TRUE(admin->Drain(&ctx, {}, &dr).ok());
  auto c = Connect(daemon_.unix_target());
  c.reset();
  client::ClientOptions o;
  o.target = daemon_.unix_target();
  o.model = SmallModel();
  o.max_attempts = 1;
  auto c1 = client::Client::Connect(o).value();
  EXPECT_THAT(c1->Lookup(RandomTokens(32, 1)).status(),
              testing::StatusIs(absl::StatusCode::kUnavailable, HasSubstr("draining")));
  auto [code, body] = testing::HttpGet(daemon_.http_port(), "/readyz");
  EXPECT_EQ(code, 503);
  EXPECT_THAT(body, HasSubstr("draining"));
  EXPECT_EQ(testing::HttpGet(daemon_.http_port(), "/healthz").first, 200);
  EXPECT_FALSE(Serving(daemon_.unix_target()));
  EXPECT_EQ(daemon_.Stop(), 0);
}

TEST_F(KvdndTest, MetricsPassPromtoolAndCountCalls) {
  auto c = Connect(daemon_.unix_target());
  const auto tokens = RandomTokens(16 * 2, 4);
  auto payloads = Payloads(*c, tokens.size(), 4);
  ASSERT_OK(c->Save(tokens, Spans(payloads)).status());
  (void)c->Lookup(RandomTokens(16, 99));
  auto [code, body] = testing::HttpGet(daemon_.http_port(), "/metrics");
  ASSERT_EQ(code, 200);
  const std::string file = dir_.Sub("metrics.txt");
  std::ofstream(file) << body;
  std::string err;
  auto [rc, out] = testing::RunCommand("promtool check metrics < " + file, &err);
  EXPECT_EQ(rc, 0) << out << err;
  EXPECT_THAT(
      body,
      HasSubstr(R"(kvdn_grpc_requests_total{service="DataPlane",method="UcxPut",code="OK"} 2)"));
  EXPECT_THAT(body, HasSubstr(R"(kvdn_tier_chunks{tier="host"} 2)"));
  EXPECT_THAT(body, HasSubstr("kvdn_payload_bytes_received_total"));
  // The unix connection got the send buffer kvdnd asks for (4 MiB, doubled by the kernel), or
  // what net.core.wmem_max allows.
  int wmem_max = 0;
  std::ifstream("/proc/sys/net/core/wmem_max") >> wmem_max;
  EXPECT_THAT(body, HasSubstr(absl::StrCat("kvdn_unix_socket_send_buffer_bytes ",
                                           std::min(2 * (4 << 20), 2 * wmem_max), "\n")));
  EXPECT_THAT(body, ::testing::ContainsRegex("kvdn_unix_connections_total [1-9]"));
  EXPECT_THAT(
      body,
      HasSubstr(
          R"(kvdn_grpc_request_duration_seconds_count{service="KvService",method="Lookup"})"));
}

TEST_F(KvdndTest, KvdnctlSubcommands) {
  auto c = Connect(daemon_.unix_target());
  const auto tokens = RandomTokens(16 * 3, 6);
  auto payloads = Payloads(*c, tokens.size(), 6);
  ASSERT_OK(c->Save(tokens, Spans(payloads)).status());
  auto keys = ChunkKeysForTokens("tenant-a", SmallModel(), tokens).value();
  const std::string ctl = std::string(KVDN_KVDNCTL_PATH) + " --target " + daemon_.unix_target();

  auto [rc, out] = testing::RunCommand(ctl + " stats");
  EXPECT_EQ(rc, 0);
  EXPECT_THAT(out, HasSubstr("TIER"));
  EXPECT_THAT(out, ::testing::ContainsRegex("host +3 "));
  std::tie(rc, out) = testing::RunCommand(ctl + " --json stats");
  EXPECT_THAT(out, HasSubstr("\"commits\": \"3\""));
  // The 256 MiB host arena is faulted in on a background thread: it gets there, and the human
  // table then says nothing of it.
  for (int i = 0; i < 200 && out.find("\"prefaulted_bytes\": \"268435456\"") == std::string::npos;
       ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::tie(rc, out) = testing::RunCommand(ctl + " --json stats");
  }
  EXPECT_THAT(out, HasSubstr("\"prefaulted_bytes\": \"268435456\""));
  std::tie(rc, out) = testing::RunCommand(ctl + " stats");
  EXPECT_THAT(out, Not(HasSubstr("faulted in")));

  std::tie(rc, out) = testing::RunCommand(ctl + " ls --namespace tenant-a --page-size 2");
  EXPECT_EQ(rc, 0);
  EXPECT_THAT(out, HasSubstr("2 of 3 chunk(s); next page: --page-token"));
  std::tie(rc, out) = testing::RunCommand(ctl + " ls --namespace tenant-a --page-size 2 --all");
  for (const auto& k : keys) EXPECT_THAT(out, HasSubstr(k.ToString()));
  std::tie(rc, out) = testing::RunCommand(ctl + " ls --tier disk");
  EXPECT_THAT(out, HasSubstr("0 of 0 chunk(s)"));
  std::tie(rc, out) = testing::RunCommand(ctl + " ls --namespace nobody");
  EXPECT_THAT(out, HasSubstr("0 of 0"));

  std::tie(rc, out) = testing::RunCommand(ctl + " inspect " + keys[1].ToString());
  EXPECT_EQ(rc, 0);
  EXPECT_THAT(out, HasSubstr("checksum_ok  yes"));
  EXPECT_THAT(out, HasSubstr("tokens       16"));
  EXPECT_THAT(out, HasSubstr("dtype        bfloat16"));

  std::string err;
  std::tie(rc, out) = testing::RunCommand(ctl + " inspect not-a-key", &err);
  EXPECT_EQ(rc, 1);
  EXPECT_THAT(err, HasSubstr("INVALID_ARGUMENT"));

  std::tie(rc, out) = testing::RunCommand(ctl + " evict " + keys[2].ToString());
  EXPECT_THAT(out, HasSubstr("evicted 1 chunk(s)"));
  EXPECT_EQ(ValueOr(c->Lookup(tokens)), 32u);
  std::tie(rc, out) = testing::RunCommand(ctl + " evict " + keys[2].ToString(), &err);
  EXPECT_EQ(rc, 1);
  EXPECT_THAT(err, HasSubstr("NOT_FOUND"));
  std::tie(rc, out) = testing::RunCommand(ctl + " evict --namespace tenant-a");
  EXPECT_THAT(out, HasSubstr("evicted 2 chunk(s)"));
  EXPECT_EQ(ValueOr(c->Lookup(tokens)), 0u);

  std::tie(rc, out) = testing::RunCommand(ctl + " config");
  EXPECT_EQ(rc, 0);
  EXPECT_THAT(out, HasSubstr("\"host_tier_bytes\": \"268435456\""));
  std::tie(rc, out) = testing::RunCommand(ctl + " health");
  EXPECT_EQ(rc, 0);
  EXPECT_THAT(out, HasSubstr("SERVING"));
  std::tie(rc, out) = testing::RunCommand(ctl + " members");
  EXPECT_EQ(rc, 0);
  EXPECT_THAT(out, HasSubstr("(single node)"));
  EXPECT_THAT(out, HasSubstr("127.0.0.1:"));

  std::tie(rc, out) = testing::RunCommand(
      std::string(KVDN_KVDNCTL_PATH) + " --timeout 1 --target unix:/nonexistent.sock stats", &err);
  EXPECT_EQ(rc, 3);
  EXPECT_THAT(err, HasSubstr("UNAVAILABLE"));

  // No --target: KVDN_TARGET names the daemon (as a pod spec would); --target still wins.
  std::tie(rc, out) = testing::RunCommand("KVDN_TARGET=" + daemon_.unix_target() + " " +
                                          KVDN_KVDNCTL_PATH + " health");
  EXPECT_EQ(rc, 0);
  EXPECT_THAT(out, HasSubstr("SERVING"));
  std::tie(rc, out) =
      testing::RunCommand("KVDN_TARGET=unix:/nonexistent.sock " + std::string(KVDN_KVDNCTL_PATH) +
                          " --target " + daemon_.unix_target() + " health");
  EXPECT_EQ(rc, 0);
}

TEST_F(KvdndTest, AnEmptyTargetMeansKvdnTargetFromTheEnvironment) {
  ASSERT_EQ(setenv("KVDN_TARGET", daemon_.unix_target().c_str(), 1), 0);
  absl::Cleanup unset = [] { unsetenv("KVDN_TARGET"); };  // also when an assertion returns early
  EXPECT_EQ(client::ResolveTarget(""), daemon_.unix_target());
  EXPECT_EQ(client::ResolveTarget("127.0.0.1:1"), "127.0.0.1:1");
  auto c = Connect("");  // data plane kAuto: a unix target, so shared memory
  const auto tokens = RandomTokens(16 * 2, 9);
  auto payloads = Payloads(*c, tokens.size(), 9);
  ASSERT_OK(c->Save(tokens, Spans(payloads)).status());
  ASSERT_OK_AND_ASSIGN(auto found, c->Lookup(tokens));
  EXPECT_EQ(found, tokens.size());
  EXPECT_THAT(c->DataPlaneInUse(), HasSubstr("posix"));
  std::move(unset).Invoke();
  EXPECT_THAT(client::ResolveTarget(""), ::testing::StartsWith("unix:"));
  EXPECT_NE(client::ResolveTarget(""), daemon_.unix_target());
}

// The length-delimited fields numbered `field` at the top level of the protobuf message `msg`
// (a minimal wire-format reader: the reflection API's C++ stubs are not packaged).
std::vector<std::string> LengthDelimitedFields(const std::string& msg, int field) {
  using WFL = google::protobuf::internal::WireFormatLite;
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(msg.data()),
                                            static_cast<int>(msg.size()));
  std::vector<std::string> out;
  while (uint32_t tag = in.ReadTag()) {
    const int number = static_cast<int>(WFL::GetTagFieldNumber(tag));
    switch (WFL::GetTagWireType(tag)) {
      case WFL::WIRETYPE_LENGTH_DELIMITED: {
        uint32_t len = 0;
        std::string v;
        if (!in.ReadVarint32(&len) || !in.ReadString(&v, static_cast<int>(len))) return out;
        if (number == field) out.push_back(std::move(v));
        break;
      }
      default:
        if (!WFL::SkipField(&in, tag)) return out;
    }
  }
  return out;
}

// One ServerReflectionInfo stream, as grpcurl opens it: each request written, its response read.
std::vector<std::string> ReflectionExchange(const std::string& target,
                                            const std::vector<std::string>& requests,
                                            grpc::Status* status) {
  grpc::GenericStub stub(client::MakeChannel(target));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::CompletionQueue cq;
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  auto wait = [&cq]() {
    void* tag;
    bool ok = false;
    return cq.Next(&tag, &ok) && ok;
  };
  std::vector<std::string> responses;
  call->StartCall(nullptr);
  if (wait()) {
    for (const std::string& r : requests) {
      grpc::Slice slice(r);
      grpc::ByteBuffer out(&slice, 1);
      call->Write(out, nullptr);
      if (!wait()) break;
      grpc::ByteBuffer in;
      call->Read(&in, nullptr);
      if (!wait()) break;
      std::vector<grpc::Slice> slices;
      if (!in.Dump(&slices).ok()) break;
      std::string bytes;
      for (const auto& sl : slices)
        bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
      responses.push_back(std::move(bytes));
    }
    call->WritesDone(nullptr);
    wait();
  }
  call->Finish(status, nullptr);
  wait();
  return responses;
}

// A ServerReflectionRequest with string field `field` (4: file_containing_symbol, 7:
// list_services) set to `value`.
std::string ReflectionRequest(int field, const std::string& value) {
  std::string out;
  out.push_back(static_cast<char>(field << 3 | 2));
  out.push_back(static_cast<char>(value.size()));  // < 128 here
  return out + value;
}

TEST_F(KvdndTest, ServerReflectionListsTheServicesAndServesTheirDescriptors) {
  grpc::Status status;
  const auto responses =
      ReflectionExchange(daemon_.unix_target(),
                         {ReflectionRequest(7, ""), ReflectionRequest(4, "kvdn.v1.KvService"),
                          ReflectionRequest(4, "kvdn.v1.NoSuchService")},
                         &status);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(responses.size(), 3u);

  // list_services_response (6) -> service (1) -> name (1).
  std::vector<std::string> names;
  for (const auto& list : LengthDelimitedFields(responses[0], 6)) {
    for (const auto& svc : LengthDelimitedFields(list, 1)) {
      for (const auto& name : LengthDelimitedFields(svc, 1)) names.push_back(name);
    }
  }
  EXPECT_THAT(names, ::testing::IsSupersetOf({"kvdn.v1.KvService", "kvdn.v1.AdminService",
                                              "kvdn.v1.PeerService", "grpc.health.v1.Health"}));

  // file_descriptor_response (4) -> file_descriptor_proto (1): the file that declares KvService,
  // with its methods, as a tool needs it to build requests.
  bool found = false;
  for (const auto& fdr : LengthDelimitedFields(responses[1], 4)) {
    for (const auto& bytes : LengthDelimitedFields(fdr, 1)) {
      google::protobuf::FileDescriptorProto fd;
      ASSERT_TRUE(fd.ParseFromString(bytes));
      for (const auto& svc : fd.service()) {
        if (fd.package() != "kvdn.v1" || svc.name() != "KvService") continue;
        found = true;
        std::vector<std::string> methods;
        for (const auto& m : svc.method()) methods.push_back(m.name());
        EXPECT_THAT(methods, ::testing::IsSupersetOf({"Lookup", "Put", "Get", "Reserve", "Commit",
                                                      "Release", "Delete"}));
      }
    }
  }
  EXPECT_TRUE(found) << "no FileDescriptorProto declaring kvdn.v1.KvService";

  // An unknown symbol: error_response (7) with error_code (1) NOT_FOUND, the stream still open.
  const auto errors = LengthDelimitedFields(responses[2], 7);
  ASSERT_EQ(errors.size(), 1u);
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(errors[0].data()),
                                            static_cast<int>(errors[0].size()));
  uint64_t code = 0;
  ASSERT_EQ(in.ReadTag(), 1u << 3);  // error_code, varint
  ASSERT_TRUE(in.ReadVarint64(&code));
  EXPECT_EQ(code, static_cast<uint64_t>(grpc::StatusCode::NOT_FOUND));
}

// kvdn::TuneMalloc (ClientOptions.tune_malloc; kvdnd at start): a buffer of 1-8 MiB freed and
// allocated again on one of the process's threads (what gRPC does with its read buffers on every
// Get) keeps its pages. With glibc's defaults a thread's arena hands them back to the kernel and
// the next one faults them in again (256-1024 faults over these 8 rounds).
TEST(ClientMallocTest, AFreedBufferIsNotFaultedInAgain) {
  if (!kvdn::TuneMalloc()) {
    GTEST_SKIP() << "malloc not tuned: GLIBC_TUNABLES sets a glibc.malloc tunable, or not glibc "
                    "malloc (a sanitizer's)";
  }
  auto touch = [](size_t n) {
    auto* p = static_cast<volatile char*>(std::malloc(n));
    for (size_t i = 0; i < n; i += 4096) p[i] = 1;
    std::free(const_cast<char*>(p));
  };
  auto faults = [] {
    rusage r{};
    getrusage(RUSAGE_THREAD, &r);
    return r.ru_minflt;
  };
  for (size_t n : {size_t{1} << 20, size_t{4} << 20, size_t{8} << 20}) {
    long f = 0;
    std::thread([&] {
      touch(n);  // this thread's arena grows once
      const long before = faults();
      for (int i = 0; i < 8; ++i) touch(n);
      f = faults() - before;
    }).join();
    EXPECT_LT(f, 16) << (n >> 10) << " KiB buffers";
  }
}

TEST(KvdndConfigTest, InvalidConfigFailsAtStartNamingTheField) {
  TempDir dir;
  const struct {
    const char* json;
    const char* field;
  } cases[] = {
      {R"({"low_watermark": 0.99, "high_watermark": 0.5})", "low_watermark"},
      {R"({"namespace_host_share": 1.5})", "namespace_host_share"},
      {R"({"namespace_disk_share": -0.5})", "namespace_disk_share"},
      {R"({"namespace_gpu_share": 2})", "namespace_gpu_share"},
      {R"({"max_frame_bytes": 10})", "max_frame_bytes"},
      {R"({"max_frame_bytes": 65536, "get_frame_bytes": 65537})", "get_frame_bytes"},
      {R"({"namespaces": ["ok", "not ok"]})", "namespaces[1]"},
      {R"({"no_such_field": 1})", "no_such_field"},
      {R"({"log_level": "loud"})", "log_level"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.json);
    const std::string cfg = dir.Sub("bad.json");
    std::ofstream(cfg) << c.json;
    std::string err;
    auto [rc, out] = testing::RunCommand(
        std::string(KVDN_KVDND_PATH) + " --config " + cfg + " --data-dir " + dir.Sub("data"), &err);
    EXPECT_EQ(rc, 2);
    EXPECT_THAT(err, HasSubstr(c.field));
  }
}

}  // namespace
}  // namespace kvdn
