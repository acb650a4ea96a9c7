// Tenant authentication against the real kvdnd (config auth_tokens_file): each tenant's token
// reaches its own namespaces only, over gRPC and over the UCX data plane; ids taken by one tenant
// (reservations, leases, data-plane sessions) are refused to another; AdminService and
// PeerService need their grants; kvdnctl passes a token; a bad tokens file stops kvdnd naming
// the line. Every refusal is checked for its exact status, and the daemon keeps serving.
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "daemon_process.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "kvdn/client/client.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/common/hash.h"
#include "kvdn/common/mutex.h"
#include "kvdn/proto/grpc_status.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/status_matchers.h"
#include "kvdn/testing/waiting.h"
#include "kvdn/transfer/ucx_transport.h"
#include "kvdn/v1/admin_service.grpc.pb.h"
#include "kvdn/v1/data_plane.pb.h"
#include "kvdn/v1/kv_service.grpc.pb.h"
#include "kvdn/v1/peer_service.grpc.pb.h"

namespace kvdn {
namespace {

using ::kvdn::testing::DaemonProcess;
using ::kvdn::testing::RandomBytes;
using ::kvdn::testing::RandomTokens;
using ::kvdn::testing::StatusIs;
using ::kvdn::testing::TempDir;
using ::testing::HasSubstr;

constexpr char kTokenA[] = "tenant-a-token-0123456789";
constexpr char kTokenB[] = "tenant-b-token-0123456789";
constexpr char kAdminToken[] = "admin-token-0123456789abc";
constexpr char kPeerToken[] = "peer-token-0123456789abcd";

ModelSpec SmallModel() { return {"test-model", 2, 2, 64, Dtype::kBFloat16, 16}; }

void Deadline(grpc::ClientContext* ctx) {
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
}

v1::ChunkKey ProtoKey(const std::string& ns, char fill) {
  v1::ChunkKey k;
  k.set_namespace_(ns);
  k.set_fingerprint(42);
  k.set_prefix_hash(std::string(16, fill));
  return k;
}

class AuthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tokens_file_ = dir_.Sub("tokens");
    std::ofstream(tokens_file_) << "# test tokens\n"
                                << kTokenA << " tenant-a\n"
                                << kTokenB << " tenant-b\n"
                                << kAdminToken << " kvdn:admin\n"
                                << kPeerToken << " kvdn:peer\n";
    const std::string cfg = dir_.Sub("config.json");
    std::ofstream(cfg) << R"({"auth_tokens_file": ")" << tokens_file_ << R"("})";
    std::string err;
    ASSERT_TRUE(daemon_.Start({"--config", cfg}, &err)) << err;
  }

  absl::StatusOr<std::unique_ptr<client::Client>> Connect(
      const std::string& token, const std::string& ns,
      client::ClientOptions::DataPlane plane = client::ClientOptions::DataPlane::kAuto,
      const std::string& target = "") {
    client::ClientOptions o;
    o.target = target.empty() ? daemon_.unix_target() : target;
    o.model = SmallModel();
    o.ns = ns;
    o.token = token;
    o.data_plane = plane;
    o.max_attempts = 1;
    return client::Client::Connect(o);
  }
  // An encoded chunk (4 KiB payload) from `seed`.
  static std::vector<uint8_t> Chunk(uint64_t seed) {
    return testing::RandomChunk(ChunkInfo{Dtype::kBFloat16, 1, 1, 64, 16}, seed);
  }
  std::unique_ptr<v1::KvService::Stub> KvStub(const std::string& token) {
    return v1::KvService::NewStub(client::MakeChannel(daemon_.unix_target(), token));
  }
  double AuthFailures(const std::string& reason) {
    return testing::MetricSample(daemon_.http_port(),
                                 "kvdn_auth_failures_total{reason=\"" + reason + "\"}");
  }
  bool Serving() {
    auto stub = grpc::health::v1::Health::NewStub(client::MakeChannel(daemon_.unix_target()));
    grpc::ClientContext ctx;
    Deadline(&ctx);
    grpc::health::v1::HealthCheckResponse r;
    return stub->Check(&ctx, {}, &r).ok() &&
           r.status() == grpc::health::v1::HealthCheckResponse::SERVING;
  }

  struct Raw {
    std::unique_ptr<transfer::UcxTransport> t;
    transfer::PeerId peer = 0;
    uint64_t session = 0;
    Mutex mu;
    CondVar cv;
    std::vector<absl::Status> replies ABSL_GUARDED_BY(mu);
    void Deliver(absl::Status st) {
      MutexLock lock(&mu);
      replies.push_back(std::move(st));
      cv.SignalAll();
    }
    void Send(uint16_t type, const google::protobuf::Message& header, ByteSpan payload) {
      t->Send(peer, type, header.SerializeAsString(), payload, nullptr,
              absl::Now() + absl::Seconds(5), [](absl::Status) {});
    }
    // The next reply's status (UNKNOWN "no reply" after 3 s).
    absl::Status Next(absl::Duration within = absl::Seconds(3)) {
      MutexLock lock(&mu);
      const absl::Time end = absl::Now() + within;
      while (replies.empty() && absl::Now() < end) cv.WaitWithTimeout(&mu, end - absl::Now());
      if (replies.empty()) return absl::UnknownError("no reply");
      absl::Status s = replies.front();
      replies.erase(replies.begin());
      return s;
    }
  };
  // Part (of 2, at payload `offset`) of Put `put_id` by key (namespace `ns`, ProtoKey's with
  // `fingerprint`) of the chunk whose 64-byte header is `header`, over r's session.
  static v1::DataPlanePutRequest PartOfTwo(const Raw& r, const uint8_t* header,
                                           const std::string& ns, uint64_t fingerprint,
                                           uint64_t put_id, uint64_t offset, absl::Time deadline) {
    v1::DataPlanePutRequest m;
    m.set_session_id(r.session);
    m.set_request_id(put_id * 2 + (offset == 0 ? 0 : 1));
    *m.mutable_key() = ProtoKey(ns, 'p');
    m.mutable_key()->set_fingerprint(fingerprint);
    m.set_chunk_header(header, kChunkHeaderBytes);
    m.set_part(true);
    m.set_parts(2);
    m.set_put_id(put_id);
    m.set_payload_offset(offset);
    m.set_deadline_unix_micros(absl::ToUnixMicros(deadline));
    return m;
  }

  // Opens a session with kvdnd with `token`, on its own UCX worker.
  void Open(Raw& r, const std::string& token) {
    transfer::UcxTransportOptions o;
    o.transports = "posix,cma";
    ASSERT_OK_AND_ASSIGN(r.t, transfer::UcxTransport::Create(o));
    r.t->SetHandler(v1::DATA_PLANE_GET_REPLY, [&r](std::unique_ptr<transfer::Incoming> in) {
      v1::DataPlaneGetReply m;
      m.ParseFromString(in->header());
      r.Deliver(absl::Status(static_cast<absl::StatusCode>(m.code()), m.message()));
    });
    r.t->SetHandler(v1::DATA_PLANE_PUT_REPLY, [&r](std::unique_ptr<transfer::Incoming> in) {
      v1::DataPlanePutReply m;
      m.ParseFromString(in->header());
      r.Deliver(absl::Status(static_cast<absl::StatusCode>(m.code()), m.message()));
    });
    v1::OpenDataPlaneRequest req;
    req.set_worker_address(r.t->address());
    req.set_pid(getpid());
    v1::OpenDataPlaneResponse resp;
    grpc::ClientContext ctx;
    Deadline(&ctx);
    ASSERT_TRUE(KvStub(token)->OpenDataPlane(&ctx, req, &resp).ok());
    r.session = resp.session_id();
    ASSERT_OK_AND_ASSIGN(r.peer, r.t->Connect(resp.worker_address(), {resp.pid()}));
  }
  TempDir dir_;
  DaemonProcess daemon_{dir_.path()};
  std::string tokens_file_;
};

TEST_F(AuthTest, EachTenantReachesItsOwnNamespaceOverGrpcAndUcx) {
  using Plane = client::ClientOptions::DataPlane;
  uint64_t seed = 1;
  for (Plane plane : {Plane::kGrpc, Plane::kUcx}) {
    for (const std::string& target : {daemon_.unix_target(), daemon_.tcp_target()}) {
      SCOPED_TRACE(absl::StrCat(target, plane == Plane::kUcx ? " ucx" : " grpc"));
      const auto tokens = RandomTokens(16 * 3 + 5, seed++);  // new chunks each round
      ASSERT_OK_AND_ASSIGN(auto a, Connect(kTokenA, "tenant-a", plane, target));
      std::vector<std::vector<uint8_t>> payloads;
      for (uint64_t s : a->ChunkPayloadSizes(tokens.size())) {
        payloads.push_back(RandomBytes(s, 100 * seed + payloads.size()));
      }
      const std::vector<ByteSpan> spans(payloads.begin(), payloads.end());
      ASSERT_OK(a->Save(tokens, spans).status());
      EXPECT_EQ(a->Lookup(tokens).value_or(0), tokens.size());
      std::vector<std::vector<uint8_t>> got(payloads.size());
      std::vector<MutableByteSpan> bufs;
      for (size_t i = 0; i < got.size(); ++i) {
        got[i].assign(payloads[i].size(), 0xEE);
        bufs.emplace_back(got[i]);
      }
      ASSERT_OK_AND_ASSIGN(client::LoadResult r, a->Load(tokens, bufs));
      EXPECT_EQ(r.tokens, tokens.size());
      EXPECT_EQ(got, payloads);

      // Tenant b's token, naming tenant a's namespace: refused, whatever the path.
      ASSERT_OK_AND_ASSIGN(auto b_as_a, Connect(kTokenB, "tenant-a", plane, target));
      EXPECT_THAT(b_as_a->Lookup(tokens),
                  StatusIs(absl::StatusCode::kPermissionDenied,
                           HasSubstr("does not grant namespace \"tenant-a\"")));
      EXPECT_THAT(b_as_a->Load(tokens, bufs), StatusIs(absl::StatusCode::kPermissionDenied));
      EXPECT_THAT(b_as_a->Save(tokens, spans), StatusIs(absl::StatusCode::kPermissionDenied));
      auto keys = ChunkKeysForTokens("tenant-a", SmallModel(), tokens).value();
      EXPECT_THAT(b_as_a->GetEncoded(keys[0], bufs[0]),
                  StatusIs(absl::StatusCode::kPermissionDenied));
      EXPECT_THAT(b_as_a->Delete(keys[0]), StatusIs(absl::StatusCode::kPermissionDenied));
      // Its own namespace: nothing of a's there.
      ASSERT_OK_AND_ASSIGN(auto b, Connect(kTokenB, "tenant-b", plane, target));
      EXPECT_EQ(b->Lookup(tokens).value_or(99), 0u);
      // a's chunks are intact.
      ASSERT_OK(a->Load(tokens, bufs).status());
      EXPECT_EQ(got, payloads);
    }
  }
  EXPECT_GE(AuthFailures("permission_denied"), 4);
}

TEST_F(AuthTest, CallsWithoutAKnownTokenAreUnauthenticated) {
  const auto tokens = RandomTokens(32, 2);
  ASSERT_OK_AND_ASSIGN(auto none, Connect("", "tenant-a"));
  EXPECT_THAT(none->Lookup(tokens),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("requires a token")));
  ASSERT_OK_AND_ASSIGN(auto unknown, Connect("not-a-known-token-at-all", "tenant-a"));
  EXPECT_THAT(unknown->Lookup(tokens),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("not one this kvdnd knows")));
  // Another scheme than Bearer.
  auto stub = v1::KvService::NewStub(client::MakeChannel(daemon_.unix_target()));
  grpc::ClientContext ctx;
  Deadline(&ctx);
  ctx.AddMetadata("authorization", std::string("Basic ") + kTokenA);
  v1::LookupRequest req;
  req.set_namespace_("tenant-a");
  v1::LookupResponse resp;
  EXPECT_THAT(FromGrpcStatus(stub->Lookup(&ctx, req, &resp)),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("Bearer")));
  // The SDK refuses a token it could not send.
  client::ClientOptions o;
  o.model = SmallModel();
  o.token = "two words";
  EXPECT_THAT(client::Client::Connect(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("ClientOptions.token")));
  EXPECT_GE(AuthFailures("unauthenticated"), 3);
  EXPECT_TRUE(Serving());  // health needs no token
}

TEST_F(AuthTest, TheTokenComesFromTheEnvironmentWhenNotGiven) {
  const std::string file = dir_.Sub("my-token");
  std::ofstream(file) << "  " << kTokenA << "\n";
  setenv("KVDN_TOKEN_FILE", file.c_str(), 1);
  ASSERT_OK_AND_ASSIGN(auto from_file, Connect("", "tenant-a"));
  EXPECT_EQ(from_file->options().token, kTokenA);
  EXPECT_OK(from_file->Lookup(RandomTokens(32, 3)).status());
  setenv("KVDN_TOKEN", kTokenB, 1);  // KVDN_TOKEN first
  ASSERT_OK_AND_ASSIGN(auto from_env, Connect("", "tenant-b"));
  EXPECT_EQ(from_env->options().token, kTokenB);
  EXPECT_OK(from_env->Lookup(RandomTokens(32, 3)).status());
  unsetenv("KVDN_TOKEN");
  setenv("KVDN_TOKEN_FILE", dir_.Sub("missing").c_str(), 1);
  EXPECT_THAT(Connect("", "tenant-a"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("$KVDN_TOKEN_FILE")));
  unsetenv("KVDN_TOKEN_FILE");
}

TEST_F(AuthTest, ReservationsAndLeasesOfOneTenantAreRefusedToAnother) {
  auto a = KvStub(kTokenA);
  auto b = KvStub(kTokenB);
  const std::vector<uint8_t> chunk = Chunk(7);
  const v1::ChunkKey key = ProtoKey("tenant-a", 'r');
  // a reserves; b can neither commit nor abort it.
  v1::ReserveRequest rq;
  *rq.mutable_key() = key;
  rq.set_size(chunk.size());
  v1::ReserveResponse reserved;
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    ASSERT_TRUE(a->Reserve(&ctx, rq, &reserved).ok());
  }
  const uint64_t rid = reserved.transfer().id();
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::CommitRequest c;
    c.set_reservation_id(rid);
    c.set_payload_checksum(123);
    v1::CommitResponse cr;
    EXPECT_THAT(FromGrpcStatus(b->Commit(&ctx, c, &cr)),
                StatusIs(absl::StatusCode::kPermissionDenied,
                         HasSubstr(absl::StrCat("reservation_id ", rid, ": "))));
  }
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::ReleaseRequest r;
    r.set_reservation_id(rid);
    v1::ReleaseResponse rr;
    EXPECT_THAT(FromGrpcStatus(b->Release(&ctx, r, &rr)),
                StatusIs(absl::StatusCode::kPermissionDenied));
  }
  // b cannot write into it either (a Put stream naming the reservation).
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::PutResponse resp;
    auto w = b->Put(&ctx, &resp);
    v1::PutRequest m;
    *m.mutable_header()->mutable_key() = key;
    m.mutable_header()->set_size(chunk.size());
    m.mutable_header()->set_reservation_id(rid);
    w->Write(m);
    w->WritesDone();
    EXPECT_THAT(FromGrpcStatus(w->Finish()),
                StatusIs(absl::StatusCode::kPermissionDenied, HasSubstr("header.reservation_id")));
  }
  // The reservation is a's still: a writes and commits it.
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::PutResponse resp;
    auto w = a->Put(&ctx, &resp);
    v1::PutRequest m;
    *m.mutable_header()->mutable_key() = key;
    m.mutable_header()->set_size(chunk.size());
    m.mutable_header()->set_reservation_id(rid);
    ASSERT_TRUE(w->Write(m));
    m.clear_header();
    m.set_data(chunk.data(), chunk.size());
    ASSERT_TRUE(w->Write(m));
    w->WritesDone();
    ASSERT_TRUE(w->Finish().ok());
    grpc::ClientContext cctx;
    Deadline(&cctx);
    v1::CommitRequest c;
    c.set_reservation_id(rid);
    c.set_payload_checksum(DecodeChunkHeader(chunk).value().payload_checksum);
    v1::CommitResponse cr;
    ASSERT_TRUE(a->Commit(&cctx, c, &cr).ok());
  }
  // a leases it; b cannot release the lease (alone or in a list), nor lease it itself.
  v1::GetDescriptorRequest dq;
  *dq.mutable_key() = key;
  v1::GetDescriptorResponse d;
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    ASSERT_TRUE(a->GetDescriptor(&ctx, dq, &d).ok());
    grpc::ClientContext bctx;
    Deadline(&bctx);
    v1::GetDescriptorResponse bd;
    EXPECT_THAT(FromGrpcStatus(b->GetDescriptor(&bctx, dq, &bd)),
                StatusIs(absl::StatusCode::kPermissionDenied));
  }
  const uint64_t lease = d.transfer().id();
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::ReleaseRequest r;
    r.set_lease_id(lease);
    v1::ReleaseResponse rr;
    EXPECT_THAT(
        FromGrpcStatus(b->Release(&ctx, r, &rr)),
        StatusIs(absl::StatusCode::kPermissionDenied, HasSubstr(absl::StrCat("lease_id ", lease))));
    grpc::ClientContext lctx;
    Deadline(&lctx);
    v1::ReleaseRequest many;
    many.add_lease_ids(lease);
    EXPECT_THAT(FromGrpcStatus(b->Release(&lctx, many, &rr)),
                StatusIs(absl::StatusCode::kPermissionDenied, HasSubstr("lease_ids[0]")));
    grpc::ClientContext actx;
    Deadline(&actx);
    EXPECT_TRUE(a->Release(&actx, r, &rr).ok());  // a's own, still held
  }
  // An unknown id is what it was: NOT_FOUND, for anyone.
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::ReleaseRequest r;
    r.set_lease_id(lease + 1000);
    v1::ReleaseResponse rr;
    EXPECT_THAT(FromGrpcStatus(b->Release(&ctx, r, &rr)), StatusIs(absl::StatusCode::kNotFound));
  }
  EXPECT_TRUE(Serving());
}

TEST_F(AuthTest, AdminAndPeerServicesNeedTheirGrants) {
  auto stats = [&](const std::string& token) {
    auto admin = v1::AdminService::NewStub(client::MakeChannel(daemon_.unix_target(), token));
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::GetStatsResponse r;
    return FromGrpcStatus(admin->GetStats(&ctx, {}, &r));
  };
  EXPECT_THAT(stats(""), StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(stats(kTokenA), StatusIs(absl::StatusCode::kPermissionDenied,
                                       HasSubstr("AdminService.GetStats needs")));
  EXPECT_OK(stats(kAdminToken));
  auto lookup = [&](const std::string& token) {
    auto peer = v1::PeerService::NewStub(client::MakeChannel(daemon_.unix_target(), token));
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::LookupRequest req;
    req.set_namespace_("tenant-a");
    v1::LookupResponse r;
    return FromGrpcStatus(peer->Lookup(&ctx, req, &r));
  };
  EXPECT_THAT(lookup(kTokenA), StatusIs(absl::StatusCode::kPermissionDenied,
                                        HasSubstr("PeerService.Lookup is for other kvdnd")));
  EXPECT_THAT(lookup(kAdminToken), StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_OK(lookup(kPeerToken));
  // A tenant cannot pose as a peer on the data plane (its Puts would not be replicated).
  {
    auto kv = KvStub(kTokenA);
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::OpenDataPlaneRequest req;
    req.set_worker_address("unused");
    req.set_peer_node("node-x");
    v1::OpenDataPlaneResponse resp;
    EXPECT_THAT(FromGrpcStatus(kv->OpenDataPlane(&ctx, req, &resp)),
                StatusIs(absl::StatusCode::kPermissionDenied, HasSubstr("kvdn:peer")));
  }

  // kvdnctl: a token from --token-file, $KVDN_TOKEN or $KVDN_TOKEN_FILE.
  const std::string admin_file = dir_.Sub("admin-token");
  std::ofstream(admin_file) << kAdminToken << "\n";
  const std::string ctl = std::string(KVDN_KVDNCTL_PATH) + " --target " + daemon_.unix_target();
  std::string err;
  auto [rc, out] = testing::RunCommand(ctl + " stats", &err);
  EXPECT_EQ(rc, 1);
  EXPECT_THAT(err, HasSubstr("requires a token"));
  std::tie(rc, out) = testing::RunCommand(ctl + " --token-file " + admin_file + " stats", &err);
  EXPECT_EQ(rc, 0) << err;
  EXPECT_THAT(out, HasSubstr("TIER"));
  std::tie(rc, out) = testing::RunCommand("KVDN_TOKEN_FILE=" + admin_file + " " + ctl + " stats");
  EXPECT_EQ(rc, 0);
  std::tie(rc, out) =
      testing::RunCommand(std::string("KVDN_TOKEN=") + kTokenA + " " + ctl + " stats", &err);
  EXPECT_EQ(rc, 1);
  EXPECT_THAT(err, HasSubstr("kvdn:admin"));
  std::tie(rc, out) =
      testing::RunCommand(ctl + " --token-file " + dir_.Sub("missing") + " stats", &err);
  EXPECT_EQ(rc, 2);
  EXPECT_THAT(err, HasSubstr("--token-file"));
  std::tie(rc, out) = testing::RunCommand(ctl + " health");  // no token needed
  EXPECT_EQ(rc, 0);
}

// A client with its own UCX connection to kvdnd: a data-plane request naming another client's
// session (ids are counters) is dropped, and one naming its own session reaches only its token's
// namespaces.
TEST_F(AuthTest, DataPlaneRequestsStayWithTheirSessionAndItsToken) {
  Raw a, b;
  ASSERT_NO_FATAL_FAILURE(Open(a, kTokenA));
  ASSERT_NO_FATAL_FAILURE(Open(b, kTokenB));
  // a's chunk, stored.
  ASSERT_OK_AND_ASSIGN(auto ca, Connect(kTokenA, "tenant-a"));
  const std::vector<uint8_t> chunk = Chunk(9);
  const ChunkKey key{"tenant-a", 42, Hash128{1, 2}};
  ASSERT_OK(ca->PutEncoded(key, chunk).status());
  v1::DataPlaneGetRequest get;
  get.set_request_id(1);
  auto ck = get.mutable_key();
  ck->set_namespace_(key.ns);
  ck->set_fingerprint(key.fingerprint);
  const auto canonical = key.prefix_hash.Canonical();
  ck->set_prefix_hash(canonical.data(), canonical.size());
  get.set_deadline_unix_micros(absl::ToUnixMicros(absl::Now() + absl::Seconds(5)));
  auto send = [&](Raw& r, const v1::DataPlaneGetRequest& m) { r.Send(v1::DATA_PLANE_GET, m, {}); };
  const double denied = AuthFailures("permission_denied");
  // b, over its own session, asking for a's key: refused.
  get.set_session_id(b.session);
  send(b, get);
  EXPECT_THAT(b.Next(), StatusIs(absl::StatusCode::kPermissionDenied, HasSubstr("tenant-a")));
  // b, over its connection, naming a's session: dropped (no reply to b, nothing to a).
  get.set_session_id(a.session);
  send(b, get);
  EXPECT_THAT(b.Next(), StatusIs(absl::StatusCode::kUnknown, HasSubstr("no reply")));
  EXPECT_THAT(a.Next(), StatusIs(absl::StatusCode::kUnknown, HasSubstr("no reply")));
  EXPECT_GE(AuthFailures("permission_denied"), denied + 2);
  // a, over its own session: served (the reply carries the chunk).
  send(a, get);
  EXPECT_OK(a.Next());
  // b cannot close a's session; a can.
  {
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::CloseDataPlaneRequest req;
    req.set_session_id(a.session);
    v1::CloseDataPlaneResponse resp;
    EXPECT_THAT(FromGrpcStatus(KvStub(kTokenB)->CloseDataPlane(&ctx, req, &resp)),
                StatusIs(absl::StatusCode::kPermissionDenied, HasSubstr("another token")));
    grpc::ClientContext actx;
    Deadline(&actx);
    EXPECT_TRUE(KvStub(kTokenA)->CloseDataPlane(&actx, req, &resp).ok());
  }
  EXPECT_TRUE(Serving());
}

// A Put in parts is assembled by put_id, which the client picks: a part of another token's Put
// with the same put_id starts an assembly of its own instead of failing the first one.
TEST_F(AuthTest, PartsOfAnotherTokensPutWithTheSamePutIdDoNotTouchIt) {
  // The bytes first: the transports (Raw) go before them, with any send still queued.
  const ChunkInfo info{Dtype::kBFloat16, 2, 1, 64, 64};  // 32 KiB payload
  const std::vector<uint8_t> payload = RandomBytes(info.PayloadBytes(), 5);
  uint8_t header[kChunkHeaderBytes];
  WriteChunkHeader(info, Xxh3_64(ByteSpan(payload)), MutableByteSpan(header, sizeof(header)));
  Raw a, b;
  ASSERT_NO_FATAL_FAILURE(Open(a, kTokenA));
  ASSERT_NO_FATAL_FAILURE(Open(b, kTokenB));
  constexpr uint64_t kPutId = 77;
  auto part = [&](const Raw& r, const std::string& ns, uint64_t offset, absl::Duration within) {
    return PartOfTwo(r, header, ns, /*fingerprint=*/42, kPutId, offset, absl::Now() + within);
  };
  const ByteSpan all(payload);
  a.Send(v1::DATA_PLANE_PUT, part(a, "tenant-a", 0, absl::Seconds(20)), all.subspan(0, 16384));
  // b's first part, same put_id, its own namespace and a short deadline: left alone, it expires.
  b.Send(v1::DATA_PLANE_PUT, part(b, "tenant-b", 0, absl::Milliseconds(300)),
         all.subspan(0, 16384));
  absl::SleepFor(absl::Milliseconds(100));
  a.Send(v1::DATA_PLANE_PUT, part(a, "tenant-a", 16384, absl::Seconds(20)), all.subspan(16384));
  EXPECT_OK(a.Next(absl::Seconds(20)));  // both of a's parts: the Put is stored
  EXPECT_OK(a.Next(absl::Seconds(20)));
  absl::SleepFor(absl::Milliseconds(400));
  // b's assembly is swept at the next part that arrives (any put_id): only one of its parts came.
  b.Send(v1::DATA_PLANE_PUT, part(b, "tenant-b", 0, absl::Seconds(5)), all.subspan(0, 16384));
  EXPECT_THAT(b.Next(absl::Seconds(20)),
              StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr("only 1 of")));
  ASSERT_OK_AND_ASSIGN(auto ca, Connect(kTokenA, "tenant-a"));
  std::vector<uint8_t> got(kChunkHeaderBytes + payload.size());
  const v1::ChunkKey k = ProtoKey("tenant-a", 'p');
  ChunkKey key{k.namespace_(), k.fingerprint(),
               Hash128::FromCanonical(reinterpret_cast<const uint8_t*>(k.prefix_hash().data()))};
  ASSERT_OK_AND_ASSIGN(uint64_t n, ca->GetEncoded(key, MutableByteSpan(got)));
  EXPECT_EQ(n, got.size());
  EXPECT_TRUE(std::equal(payload.begin(), payload.end(), got.begin() + kChunkHeaderBytes));
}

// The limit on Puts in parts in flight (4096) is each token's: a tenant holding its limit open
// gets RESOURCE_EXHAUSTED, and another tenant's Put in parts is still assembled and stored.
TEST_F(AuthTest, OneTenantAtItsLimitOfPutsInPartsDoesNotRefuseAnother) {
  // The bytes first: the transports (Raw) go before them, with any send still queued.
  const ChunkInfo info{Dtype::kBFloat16, 1, 1, 16, 64};  // 4 KiB payload
  const std::vector<uint8_t> payload = RandomBytes(info.PayloadBytes(), 6);
  uint8_t header[kChunkHeaderBytes];
  WriteChunkHeader(info, Xxh3_64(ByteSpan(payload)), MutableByteSpan(header, sizeof(header)));
  Raw a, b;
  ASSERT_NO_FATAL_FAILURE(Open(a, kTokenA));
  ASSERT_NO_FATAL_FAILURE(Open(b, kTokenB));
  const ByteSpan all(payload);
  const uint64_t half = payload.size() / 2;
  auto part = [&](const Raw& r, const std::string& ns, uint64_t put_id, uint64_t offset,
                  absl::Time deadline) {  // a chunk of its own per Put
    return PartOfTwo(r, header, ns, /*fingerprint=*/put_id, put_id, offset, deadline);
  };
  constexpr int kLimit = 4096;
  // Long enough for 4096 messages under ASan on two cores: b's Puts stay open all through.
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  for (uint64_t id = 1; id <= kLimit; ++id) {  // b: the first half of each, held open
    b.Send(v1::DATA_PLANE_PUT, part(b, "tenant-b", id, 0, deadline), all.subspan(0, half));
  }
  b.Send(v1::DATA_PLANE_PUT, part(b, "tenant-b", kLimit + 1, 0, deadline), all.subspan(0, half));
  EXPECT_THAT(b.Next(absl::Seconds(40)),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("4096 Puts in parts are in flight with this token")));
  ASSERT_LT(absl::Now(), deadline) << "the test sent too slowly to see the limit";
  // a, meanwhile: both parts of one Put, stored.
  a.Send(v1::DATA_PLANE_PUT, part(a, "tenant-a", 1, 0, deadline), all.subspan(0, half));
  a.Send(v1::DATA_PLANE_PUT, part(a, "tenant-a", 1, half, deadline), all.subspan(half));
  EXPECT_OK(a.Next(absl::Seconds(15)));
  EXPECT_OK(a.Next(absl::Seconds(15)));
  ASSERT_LT(absl::Now(), deadline);
  EXPECT_TRUE(Serving());
}

// The tokens file is read again when it changes (as a Kubernetes Secret update replaces it): a
// token added works at once, a token removed is refused on gRPC calls and on the data-plane
// session it had opened, and a file that does not parse leaves the tokens read before in place.
TEST_F(AuthTest, ChangesToTheTokensFileApplyWithoutARestart) {
  Raw b;
  ASSERT_NO_FATAL_FAILURE(Open(b, kTokenB));
  ASSERT_OK_AND_ASSIGN(auto cb, Connect(kTokenB, "tenant-b"));
  const auto tokens = RandomTokens(64, 9);
  ASSERT_OK(cb->Lookup(tokens).status());
  constexpr char kTokenC[] = "tenant-c-token-0123456789";
  auto replace = [&](const std::string& text) {  // a new file renamed over the old, atomically
    std::ofstream(tokens_file_ + ".new") << text;
    std::filesystem::rename(tokens_file_ + ".new", tokens_file_);
  };
  auto reloads = [&](const char* result) {
    return testing::MetricSample(daemon_.http_port(),
                                 absl::StrCat("kvdn_auth_reloads_total{result=\"", result, "\"}"));
  };
  replace(absl::StrCat(kTokenA, " tenant-a\n", kTokenC, " tenant-c\n", kAdminToken, " kvdn:admin\n",
                       kPeerToken, " kvdn:peer\n"));
  ASSERT_TRUE(testing::Eventually([&] { return reloads("ok") == 1; }, absl::Seconds(10)));
  ASSERT_OK_AND_ASSIGN(auto cc, Connect(kTokenC, "tenant-c"));
  EXPECT_OK(cc->Lookup(tokens).status());
  EXPECT_THAT(cb->Lookup(tokens),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("not one this kvdnd knows")));
  // b's session, opened with the removed token: its next request is refused.
  v1::DataPlaneGetRequest get;
  get.set_session_id(b.session);
  get.set_request_id(1);
  *get.mutable_key() = ProtoKey("tenant-b", 'g');
  get.set_deadline_unix_micros(absl::ToUnixMicros(absl::Now() + absl::Seconds(5)));
  b.Send(v1::DATA_PLANE_GET, get, {});
  EXPECT_THAT(b.Next(), StatusIs(absl::StatusCode::kUnauthenticated,
                                 HasSubstr("no longer in auth_tokens_file")));
  // A file that does not parse: counted, and the tokens read before stay.
  replace("short tenant-a\n");
  ASSERT_TRUE(testing::Eventually([&] { return reloads("failed") == 1; }, absl::Seconds(10)));
  EXPECT_OK(cc->Lookup(tokens).status());
  EXPECT_THAT(cb->Lookup(tokens), StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(daemon_.log(), HasSubstr("keeping the tokens read before"));
  EXPECT_TRUE(Serving());
}

TEST(AuthConfigTest, ABadTokensFileStopsKvdndNamingTheLine) {
  TempDir dir;
  const struct {
    std::string tokens;  // empty: no file at all
    std::string error;
  } cases[] = {
      {"", "auth_tokens_file: cannot read"},
      {"# c\nshort tenant-a\n", "auth_tokens_file: " + dir.Sub("tokens") + ":2: a token of 5"},
      {"abcdefghijklmnopq kvdn:root\n", ":1: unknown grant \"kvdn:root\""},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.tokens);
    const std::string tokens = dir.Sub("tokens");
    std::filesystem::remove(tokens);
    if (!c.tokens.empty()) std::ofstream(tokens) << c.tokens;
    const std::string cfg = dir.Sub("config.json");
    std::ofstream(cfg) << R"({"auth_tokens_file": ")" << tokens << R"("})";
    std::string err;
    auto [rc, out] = testing::RunCommand(
        std::string(KVDN_KVDND_PATH) + " --config " + cfg + " --data-dir " + dir.Sub("data"), &err);
    EXPECT_NE(rc, 0);
    EXPECT_THAT(err + out, HasSubstr(c.error));
  }
}

// kvdnd run with share_host_tier says how to map its host tier (MapHostTier) only to a client on
// its unix socket, in its pid namespace, whose token reaches every namespace: the mapping shows
// every tenant's chunks. The mapping is read-only and holds each leased chunk, byte for byte,
// where its descriptor says; after a restart the daemon's new arena has another id, and a
// refreshed mapping holds the chunks again. A tenant's token, TCP, another pid namespace and a
// kvdnd without the option get precise refusals, and the daemon keeps serving.
TEST(SharedHostTierTest, OnlyTrustedEnginesOnThisNodeMapTheHostTierReadOnly) {
  constexpr char kFleet[] = "fleet-token-0123456789abc";
  TempDir dir;
  const std::string tokens = dir.Sub("tokens");
  std::ofstream(tokens) << kFleet << " kvdn:all-namespaces\n" << kTokenA << " tenant-a\n";
  const std::string cfg = dir.Sub("config.json");
  std::ofstream(cfg) << R"({"auth_tokens_file": ")" << tokens << R"(", "share_host_tier": true})";
  DaemonProcess daemon(dir.Sub("d"));
  std::string err;
  ASSERT_TRUE(daemon.Start({"--config", cfg}, &err)) << err;
  auto connect = [&](const std::string& token, const std::string& target) {
    client::ClientOptions o;
    o.target = target;
    o.model = SmallModel();
    o.ns = "tenant-a";
    o.token = token;
    return client::Client::Connect(o);
  };
  ASSERT_OK_AND_ASSIGN(auto fleet, connect(kFleet, daemon.unix_target()));
  const auto t = RandomTokens(3 * 16 + 5, 71);  // 3 whole chunks and a tail
  std::vector<std::vector<uint8_t>> p;
  for (uint64_t n : fleet->ChunkPayloadSizes(t.size())) p.push_back(RandomBytes(n, 80 + p.size()));
  const std::vector<ByteSpan> spans(p.begin(), p.end());
  ASSERT_OK(fleet->Save(t, spans).status());
  ASSERT_OK_AND_ASSIGN(std::vector<ChunkKey> keys,
                       ChunkKeysForTokens("tenant-a", SmallModel(), t, /*include_tail=*/true));
  // The mapping holds every chunk where its descriptor says, and this process may only read it.
  auto expect_chunks_in = [&](const client::HostTierMapping& m) {
    ASSERT_OK_AND_ASSIGN(auto ds, fleet->AcquireDescriptors(keys, absl::Seconds(10)));
    ASSERT_EQ(ds.size(), p.size());
    for (size_t i = 0; i < ds.size(); ++i) {
      EXPECT_EQ(ds[i].host_arena, m.arena_id);
      ASSERT_LE(ds[i].host_offset + ds[i].size, m.bytes.size());
      const uint8_t* at = m.bytes.data() + ds[i].host_offset + kChunkHeaderBytes;
      EXPECT_TRUE(std::equal(p[i].begin(), p[i].end(), at)) << "chunk " << i;
    }
    ASSERT_OK(fleet->ReleaseDescriptors(ds));
    std::ifstream maps("/proc/self/maps");
    std::string line, perms;
    const auto base = reinterpret_cast<uintptr_t>(m.bytes.data());
    while (std::getline(maps, line)) {
      const uintptr_t from = std::stoull(line.substr(0, line.find('-')), nullptr, 16);
      if (from == base) perms = line.substr(line.find(' ') + 1, 4);
    }
    EXPECT_EQ(perms, "r--s");
  };
  ASSERT_OK_AND_ASSIGN(client::HostTierMapping m, fleet->MapHostTier());
  EXPECT_NE(m.arena_id, 0u);
  expect_chunks_in(m);
  ASSERT_OK_AND_ASSIGN(client::HostTierMapping again, fleet->MapHostTier());
  EXPECT_EQ(again.bytes.data(), m.bytes.data());  // mapped once

  // A tenant's token, the TCP port, another pid namespace: refused, naming why.
  ASSERT_OK_AND_ASSIGN(auto tenant, connect(kTokenA, daemon.unix_target()));
  EXPECT_THAT(tenant->MapHostTier(), StatusIs(absl::StatusCode::kPermissionDenied,
                                              HasSubstr("shows the chunks of every namespace")));
  ASSERT_OK_AND_ASSIGN(auto remote, connect(kFleet, daemon.tcp_target()));
  EXPECT_THAT(remote->MapHostTier(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("unix socket")));
  {
    auto stub = v1::KvService::NewStub(client::MakeChannel(daemon.unix_target(), kFleet));
    grpc::ClientContext ctx;
    Deadline(&ctx);
    v1::MapHostTierRequest req;
    req.set_pid_namespace(transfer::NamespaceId("self", "pid") + 1);
    v1::MapHostTierResponse resp;
    EXPECT_THAT(
        FromGrpcStatus(stub->MapHostTier(&ctx, req, &resp)),
        StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("another pid namespace")));
  }

  // A restarted kvdnd (its chunks back from disk) has a new arena: refresh maps it.
  ASSERT_EQ(daemon.Stop(), 0);
  ASSERT_TRUE(daemon.Start({"--config", cfg}, &err)) << err;
  ASSERT_OK_AND_ASSIGN(client::HostTierMapping stale, fleet->MapHostTier());
  EXPECT_EQ(stale.arena_id, m.arena_id);  // what this client mapped, until refreshed
  ASSERT_OK_AND_ASSIGN(client::HostTierMapping fresh, fleet->MapHostTier(/*refresh=*/true));
  EXPECT_NE(fresh.arena_id, m.arena_id);
  expect_chunks_in(fresh);

  // Without share_host_tier (the default): no arena to map, and descriptors name none.
  ASSERT_EQ(daemon.Stop(), 0);
  const std::string plain = dir.Sub("plain.json");
  std::ofstream(plain) << R"({"auth_tokens_file": ")" << tokens << R"("})";
  ASSERT_TRUE(daemon.Start({"--config", plain}, &err)) << err;
  ASSERT_OK_AND_ASSIGN(auto other, connect(kFleet, daemon.unix_target()));
  EXPECT_THAT(other->MapHostTier(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("share_host_tier")));
  ASSERT_OK_AND_ASSIGN(auto ds, other->AcquireDescriptors(keys, absl::Seconds(10)));
  ASSERT_EQ(ds.size(), p.size());
  for (const auto& d : ds) EXPECT_EQ(d.host_arena, 0u);
  ASSERT_OK(other->ReleaseDescriptors(ds));
}

}  // namespace
}  // namespace kvdn
