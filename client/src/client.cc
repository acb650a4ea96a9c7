#include "kvdn/client/client.h"

#include <fcntl.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/support/client_interceptor.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvdn/client/data_plane_client.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/common/defaults.h"
#include "kvdn/common/hash.h"
#include "kvdn/common/malloc_tuning.h"
#include "kvdn/common/thread_pool.h"
#include "kvdn/proto/get_frames.h"
#include "kvdn/proto/grpc_status.h"
#include "kvdn/transfer/ucx_transport.h"
#include "kvdn/v1/kv_service.grpc.pb.h"

namespace kvdn::client {
namespace {

constexpr int kMaxMessageBytes = (4 << 20) + (64 << 10);

// A data-plane Get's destination for a whole encoded chunk in dst: the header into its first 64
// bytes, the payload after them. OUT_OF_RANGE when it does not fit.
absl::StatusOr<MutableByteSpan> PlaceEncoded(MutableByteSpan dst, ByteSpan header,
                                             uint64_t payload_bytes) {
  if (kChunkHeaderBytes + payload_bytes > dst.size()) {
    return absl::OutOfRangeError(absl::StrCat("chunk of ", kChunkHeaderBytes + payload_bytes,
                                              " bytes does not fit a ", dst.size(),
                                              "-byte buffer"));
  }
  std::memcpy(dst.data(), header.data(), std::min(header.size(), kChunkHeaderBytes));
  return dst.subspan(kChunkHeaderBytes, payload_bytes);
}

absl::Status ValidateOptions(const ClientOptions& o) {
  if (absl::Status st = ValidateNamespace(o.ns); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("ClientOptions.ns: ", st.message()));
  }
  if (absl::Status st = o.model.Validate(); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("ClientOptions.model: ", st.message()));
  }
  if (o.deadline <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("ClientOptions.deadline must be positive");
  }
  if (o.max_attempts < 1) return absl::InvalidArgumentError("ClientOptions.max_attempts < 1");
  if (o.parallel_streams < 0 || o.parallel_streams > 256) {
    return absl::InvalidArgumentError("ClientOptions.parallel_streams outside [0, 256]");
  }
  if (o.frame_bytes < 4096 || o.frame_bytes > (4u << 20)) {
    return absl::InvalidArgumentError("ClientOptions.frame_bytes outside [4096, 4 MiB]");
  }
  if (o.async_threads < 1) return absl::InvalidArgumentError("ClientOptions.async_threads < 1");
  if (o.part_bytes != 0 && o.part_bytes < 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("ClientOptions.part_bytes ", o.part_bytes, " below 4096 (0: whole)"));
  }
  if (o.data_plane_lanes < 0 || o.data_plane_lanes > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("ClientOptions.data_plane_lanes ", o.data_plane_lanes, " outside [0, 64]"));
  }
  return ValidateTlsOptions(o.tls, "ClientOptions.tls.");
}

// Where the bytes of one streamed chunk go: the 64-byte header into `header`, the payload into
// `payload` (whole encoded chunks: header and payload are one contiguous buffer).
struct ChunkSink {
  uint8_t header[kChunkHeaderBytes];
  MutableByteSpan payload;
  std::optional<Xxh3_64Stream> hasher;  // over gRPC: fed frame by frame
  std::optional<Xxh3_64Blocks> blocks;  // over UCX: summed part by part as each lands
};

// The calling thread's completion queue, reused by its Get and Put calls one after another.
// Each call waits for every tag it asked for (writes, reads, status) before it returns, so the
// queue is empty between calls. Shut down and drained when the thread ends.
grpc::CompletionQueue& ThreadCq() {
  struct Owner {
    grpc::CompletionQueue cq;
    ~Owner() {
      cq.Shutdown();
      void* tag;
      bool ok;
      while (cq.Next(&tag, &ok)) {
      }
    }
  };
  thread_local Owner owner;
  return owner.cq;
}

// One Get call, read as raw frames: each frame's data is copied from gRPC's receive slices
// straight into its destination (proto/get_frames.h), with no protobuf string in between. The
// server-streaming method is called through the generic stub (one request, then half-close) on a
// completion queue of its own that the calling thread polls: measured faster than a callback
// reactor, whose reactions run on gRPC's threads and must hand the result back.
class GetCall {
 public:
  using OnSize = absl::FunctionRef<absl::Status(uint64_t)>;
  using OnData = absl::FunctionRef<void(uint64_t, ByteSpan)>;
  GetCall(OnSize on_size, OnData on_data) : on_size_(on_size), on_data_(on_data) {}

  // Blocks until the call is over. The chunk's size, or the first error.
  absl::StatusOr<uint64_t> Run(grpc::GenericStub& stub, grpc::ClientContext* ctx,
                               const v1::GetRequest& req, const ChunkKey& key) {
    grpc::ByteBuffer request;
    bool own = false;
    if (!grpc::SerializationTraits<v1::GetRequest>::Serialize(req, &request, &own).ok()) {
      return absl::InternalError("GetRequest does not serialize");
    }
    grpc::CompletionQueue& cq = ThreadCq();
    grpc::Status status;
    {
      // The method's name as kv_service.proto declares it.
      // Headers, request and half-close leave in one write.
      ctx->set_initial_metadata_corked(true);
      auto call = stub.PrepareCall(ctx, "/kvdn.v1.KvService/Get", &cq);
      call->StartCall(Tag(kStarted));  // corked: no tag comes back for it
      call->WriteLast(request, grpc::WriteOptions(), Tag(kWritten));
      grpc::ByteBuffer frame;
      call->Read(&frame, Tag(kRead));
      // Until both the status and the write's tag are back: gRPC does not order the two (the
      // send batch may complete after the status), and a write tag left in this thread's queue
      // would be taken by its next call for that call's own write.
      bool written = false, finished = false;
      while (!(written && finished)) {
        void* tag;
        bool ok;
        if (!cq.Next(&tag, &ok)) break;
        if (tag == Tag(kWritten)) {
          written = true;
        } else if (tag == Tag(kFinished)) {
          finished = true;
        } else if (tag == Tag(kRead)) {
          if (ok && OnFrame(frame)) {
            call->Read(&frame, Tag(kRead));
            continue;
          }
          if (!local_.ok()) ctx->TryCancel();
          call->Finish(&status, Tag(kFinished));
        }
      }
    }
    if (!local_.ok()) return local_;
    if (!status.ok()) return FromGrpcStatus(status);
    if (!have_size_ || got_ != size_) {
      return absl::UnavailableError(absl::StrCat("Get stream of ", key.ToString(), " ended after ",
                                                 got_, " of ", size_, " bytes"));
    }
    return size_;
  }

 private:
  enum Op : intptr_t { kStarted = 1, kWritten, kRead, kFinished };

  static void* Tag(Op op) { return reinterpret_cast<void*>(op); }

  // Hands one frame's data on. False to stop reading (the error is in local_).
  bool OnFrame(const grpc::ByteBuffer& frame) {
    proto::GetFrameFields fields;
    absl::Status st = proto::ParseGetFrame(frame, &fields, [&](const uint8_t* d, size_t n) {
      if (!local_.ok()) return;
      if (!have_size_) {
        local_ = Begin(fields);
        if (!local_.ok()) return;
      }
      if (got_ + n > size_) {
        local_ = absl::InternalError("kvdnd sent more bytes than the chunk's size");
        return;
      }
      on_data_(got_, ByteSpan(d, n));
      got_ += n;
    });
    if (st.ok() && local_.ok() && !have_size_) local_ = Begin(fields);  // a frame without data
    if (!st.ok() && local_.ok()) local_ = st;
    return local_.ok();
  }

  // The first frame: its size field says how many bytes follow.
  absl::Status Begin(const proto::GetFrameFields& fields) {
    if (!fields.has_size) return absl::InternalError("kvdnd's first Get frame has no size");
    have_size_ = true;
    size_ = fields.size;
    return on_size_(size_);
  }

  const OnSize on_size_;
  const OnData on_data_;
  bool have_size_ = false;
  uint64_t size_ = 0;
  uint64_t got_ = 0;
  absl::Status local_;
};

// One Put stream through the generic stub on the calling thread's completion queue: the header
// message, then the chunk in data frames of `frame_bytes`, each sent as a small header slice plus
// a slice over the caller's bytes (proto/get_frames.h): neither a protobuf string nor a
// serialized copy per frame (the generated stub made both). gRPC may hold those slices until
// its transport has written them, past the call's status; Run returns only once it has dropped
// every one (a count in the slices' destroy callback), so the caller's bytes are never read
// after Run returns.
class PutCall {
 public:
  // Blocks until the call is over and gRPC has let go of the caller's bytes. Whether kvdnd
  // stored the chunk (false: it was stored already), or the first error.
  // `authorization`: the call's "authorization" metadata value, empty for none.
  static absl::StatusOr<bool> Run(grpc::GenericStub& stub,
                                  std::chrono::system_clock::time_point deadline,
                                  const std::string& authorization, const v1::PutRequest& header,
                                  absl::Span<const ByteSpan> parts, size_t frame_bytes) {
    auto pin = std::make_shared<Pin>();
    absl::StatusOr<bool> r =
        RunCall(stub, deadline, authorization, header, parts, frame_bytes, pin);
    MutexLock lock(&pin->mu);
    while (pin->refs > 0) pin->cv.Wait(&pin->mu);
    return r;
  }

 private:
  enum Op : intptr_t { kStarted = 1, kWritten, kRead, kFinished };
  static void* Tag(Op op) { return reinterpret_cast<void*>(op); }

  // Counts the slices gRPC holds over the caller's bytes. Each slice's destroy callback owns a
  // shared_ptr to it, so the last one can still unlock the mutex after Run's wait has ended.
  struct Pin {
    Mutex mu;
    CondVar cv;
    int refs ABSL_GUARDED_BY(mu) = 0;
    // The user data for one slice's destroy callback (Unref).
    static void* Ref(const std::shared_ptr<Pin>& pin) {
      MutexLock lock(&pin->mu);
      ++pin->refs;
      return new std::shared_ptr<Pin>(pin);
    }
    static void Unref(void* p) {
      auto* holder = static_cast<std::shared_ptr<Pin>*>(p);
      {
        MutexLock lock(&(*holder)->mu);
        if (--(*holder)->refs == 0) (*holder)->cv.SignalAll();
      }
      delete holder;
    }
  };

  static absl::StatusOr<bool> RunCall(grpc::GenericStub& stub,
                                      std::chrono::system_clock::time_point deadline,
                                      const std::string& authorization,
                                      const v1::PutRequest& header,
                                      absl::Span<const ByteSpan> parts, size_t frame_bytes,
                                      const std::shared_ptr<Pin>& pin) {
    grpc::ByteBuffer first;
    bool own = false;
    if (!grpc::SerializationTraits<v1::PutRequest>::Serialize(header, &first, &own).ok()) {
      return absl::InternalError("PutRequest header does not serialize");
    }
    grpc::CompletionQueue& cq = ThreadCq();
    grpc::Status status;
    grpc::ByteBuffer response;
    bool got_response = false;
    {
      // Its own context, destroyed before Run waits for the slices: the call (and the transport
      // stream holding them) lives until the context lets go of it.
      grpc::ClientContext ctx;
      ctx.set_deadline(deadline);
      if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
      ctx.set_initial_metadata_corked(true);  // headers leave with the first message
      auto call = stub.PrepareCall(&ctx, "/kvdn.v1.KvService/Put", &cq);
      call->StartCall(Tag(kStarted));  // corked: no tag comes back for it
      auto wait = [&](Op want) {
        void* tag;
        bool ok = false;
        while (cq.Next(&tag, &ok) && tag != Tag(want)) {
        }
        return ok;
      };
      // Frames of at most frame_bytes across the parts (a frame does not span two parts).
      size_t part = 0, off = 0;
      auto skip_empty = [&] {
        while (part < parts.size() && off == parts[part].size()) {
          ++part;
          off = 0;
        }
      };
      skip_empty();
      if (part == parts.size()) {
        call->WriteLast(first, grpc::WriteOptions(), Tag(kWritten));
      } else {
        call->Write(first, Tag(kWritten));
      }
      bool ok = wait(kWritten);
      while (ok && part < parts.size()) {
        const size_t n = std::min(frame_bytes, parts[part].size() - off);
        uint8_t h[proto::kMaxPutFrameHeaderBytes];
        const size_t hn = proto::EncodePutDataFrameHeader(n, h);
        grpc::Slice slices[2] = {grpc::Slice(h, hn),
                                 grpc::Slice(const_cast<uint8_t*>(parts[part].data() + off), n,
                                             &Pin::Unref, Pin::Ref(pin))};
        grpc::ByteBuffer frame(slices, 2);
        off += n;
        skip_empty();
        if (part == parts.size()) {
          call->WriteLast(frame, grpc::WriteOptions(), Tag(kWritten));
        } else {
          call->Write(frame, Tag(kWritten));
        }
        ok = wait(kWritten);
      }
      // A write that failed means kvdnd ended the call (an early answer or an error): its
      // response and status tell which.
      call->Read(&response, Tag(kRead));
      got_response = wait(kRead);
      call->Finish(&status, Tag(kFinished));
      wait(kFinished);
    }
    if (!status.ok()) return FromGrpcStatus(status);
    v1::PutResponse resp;
    if (!got_response ||
        !grpc::SerializationTraits<v1::PutResponse>::Deserialize(&response, &resp).ok()) {
      return absl::InternalError("kvdnd's PutResponse is missing or does not parse");
    }
    return resp.stored();
  }
};

}  // namespace

std::string ResolveTarget(const std::string& target) {
  if (!target.empty()) return target;
  if (const char* env = std::getenv("KVDN_TARGET"); env != nullptr && *env != '\0') return env;
  return absl::StrCat("unix:", DefaultUnixSocket());
}

absl::StatusOr<std::string> ResolveToken(const std::string& token) {
  std::string t = token;
  std::string from = "ClientOptions.token";
  if (t.empty()) {
    if (const char* env = std::getenv("KVDN_TOKEN"); env != nullptr && *env != '\0') {
      t = env;
      from = "$KVDN_TOKEN";
    } else if (const char* file = std::getenv("KVDN_TOKEN_FILE"); file != nullptr && *file) {
      std::ifstream in(file);
      if (!in) {
        return absl::NotFoundError(absl::StrCat("$KVDN_TOKEN_FILE: cannot read ", file));
      }
      std::stringstream ss;
      ss << in.rdbuf();
      t = std::string(absl::StripAsciiWhitespace(ss.str()));
      from = absl::StrCat("$KVDN_TOKEN_FILE (", file, ")");
      if (t.empty()) return absl::InvalidArgumentError(absl::StrCat(from, ": the file is empty"));
    } else {
      return std::string();
    }
  }
  for (char c : t) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(
          from,
          ": a token is printable ASCII without spaces (as kvdnd's auth_tokens_file has it)"));
    }
  }
  return t;
}

namespace {

// Adds `authorization: Bearer <token>` to every call of a channel.
class BearerToken final : public grpc::experimental::Interceptor {
 public:
  explicit BearerToken(const std::string* value) : value_(value) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace("authorization", *value_);
    }
    methods->Proceed();
  }

 private:
  const std::string* value_;
};

class BearerTokenFactory final : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerTokenFactory(const std::string& token) : value_("Bearer " + token) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo*) override {
    return new BearerToken(&value_);
  }

 private:
  const std::string value_;  // lives as long as the channel that owns the factory
};

}  // namespace

absl::Status ValidateTlsOptions(const TlsOptions& tls, const std::string& prefix) {
  if (tls.ca_file.empty()) {
    if (!tls.cert_file.empty() || !tls.key_file.empty() || !tls.server_name.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          prefix,
          "ca_file is empty: set it (the CA that signs the server's certificate) to use TLS"));
    }
    return absl::OkStatus();
  }
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, tls.cert_file.empty() ? "cert_file" : "key_file", " is empty while ",
                     tls.cert_file.empty() ? "key_file" : "cert_file", " is set"));
  }
  for (const auto& [field, path] :
       {std::pair<const char*, const std::string&>{"ca_file", tls.ca_file},
        {"cert_file", tls.cert_file},
        {"key_file", tls.key_file}}) {
    if (!path.empty() && ::access(path.c_str(), R_OK) != 0) {
      return absl::NotFoundError(
          absl::StrCat(prefix, field, ": \"", path, "\" cannot be read: ", std::strerror(errno)));
    }
  }
  if (tls.refresh_seconds == 0 || tls.refresh_seconds > 86400) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "refresh_seconds ", tls.refresh_seconds, " is outside [1, 86400]"));
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::ChannelCredentials> MakeTlsCredentials(const TlsOptions& tls) {
  // The files are watched (reread every refresh_seconds), so rotated certificates apply.
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      tls.key_file, tls.cert_file, tls.ca_file, tls.refresh_seconds);
  grpc::experimental::TlsChannelCredentialsOptions o;
  o.set_certificate_provider(provider);
  o.watch_root_certs();
  if (!tls.cert_file.empty()) o.watch_identity_key_cert_pairs();
  return grpc::experimental::TlsCredentials(o);
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, const std::string& token,
                                           const TlsOptions& tls) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  // Large HTTP/2 frames and windows for bulk chunk streams (see daemon/src/server.cc).
  args.SetInt(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, 4 << 20);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20);
  args.SetInt(GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 8 << 20);
  // Separate clients get separate connections (the benchmark measures them side by side).
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  const std::string resolved = ResolveTarget(target);
  const bool use_tls = !tls.ca_file.empty() && !absl::StartsWith(resolved, "unix:");
  if (!use_tls) {
    // NOTE: not with TLS: gRPC 1.51's TLS endpoint over reads this large leaks 576 bytes per
    // connection (as on the server, daemon/src/server.cc).
    args.SetInt(GRPC_ARG_TCP_READ_CHUNK_SIZE, 1 << 20);
    args.SetInt(GRPC_ARG_TCP_MIN_READ_CHUNK_SIZE, 256 << 10);
  }
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (use_tls) {
    creds = MakeTlsCredentials(tls);
    if (!tls.server_name.empty()) args.SetSslTargetNameOverride(tls.server_name);
  }
  if (token.empty()) return grpc::CreateCustomChannel(resolved, creds, args);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<BearerTokenFactory>(token));
  return grpc::experimental::CreateCustomChannelWithInterceptors(resolved, creds, args,
                                                                 std::move(interceptors));
}

// The registered buffer pool: one mapping, first-fit over 4 KiB-aligned extents. Thread-safe.
// Backed by transparent huge pages where the kernel gives them and faulted in at creation: the
// kernel pins a 4 MiB chunk's pages for a shared-memory (cma) copy as 2 pages instead of 1024, and
// no transfer pays first-touch faults.
class ReceivePool {
 public:
  explicit ReceivePool(size_t bytes) : size_((bytes + 4095) & ~size_t{4095}) {
    constexpr size_t kHuge = size_t{2} << 20;
    mapped_ = size_ + kHuge;
    void* p = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      size_ = 0;
      return;
    }
    mapping_ = p;
    base_ = static_cast<uint8_t*>(p) + (kHuge - reinterpret_cast<uintptr_t>(p) % kHuge) % kHuge;
    (void)madvise(base_, size_, MADV_HUGEPAGE);  // advisory
    if (madvise(base_, size_, 23 /* MADV_POPULATE_WRITE */) != 0) {
      for (size_t off = 0; off < size_; off += 4096) base_[off] = 0;
    }
    free_[0] = size_;
  }
  ~ReceivePool() {
    if (mapping_ != nullptr) munmap(mapping_, mapped_);
  }
  uint8_t* base() const { return base_; }
  size_t size() const { return size_; }
  MutableByteSpan Allocate(size_t n) {
    const size_t need = (std::max<size_t>(n, 1) + 4095) & ~size_t{4095};
    MutexLock lock(&mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < need) continue;
      const size_t off = it->first;
      const size_t rest = it->second - need;
      free_.erase(it);
      if (rest > 0) free_[off + need] = rest;
      used_[off] = need;
      return MutableByteSpan(base_ + off, n);
    }
    return {};
  }
  void Free(MutableByteSpan b) {
    if (b.data() == nullptr) return;
    MutexLock lock(&mu_);
    auto it = used_.find(static_cast<size_t>(b.data() - base_));
    if (it == used_.end()) return;
    size_t off = it->first;
    size_t len = it->second;
    used_.erase(it);
    auto next = free_.find(off + len);
    if (next != free_.end()) {
      len += next->second;
      free_.erase(next);
    }
    auto prev = free_.lower_bound(off);
    if (prev != free_.begin()) {
      --prev;
      if (prev->first + prev->second == off) {
        off = prev->first;
        len += prev->second;
        free_.erase(prev);
      }
    }
    free_[off] = len;
  }

 private:
  void* mapping_ = nullptr;
  size_t mapped_ = 0;
  uint8_t* base_ = nullptr;
  size_t size_;
  Mutex mu_;
  std::map<size_t, size_t> free_ ABSL_GUARDED_BY(mu_);  // offset -> bytes
  std::map<size_t, size_t> used_ ABSL_GUARDED_BY(mu_);
};

struct Client::Impl {
  ClientOptions options;
  uint64_t fingerprint = 0;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::KvService::Stub> stub;
  std::unique_ptr<grpc::GenericStub> generic;  // Get and Put, as raw frames (GetCall, PutCall)
  // "Bearer <token>" for every call's "authorization" metadata; empty without a token. Added to
  // each ClientContext rather than by a channel interceptor (MakeChannel's): the interceptor runs
  // at every hook of every batch of every call, and the SDK's calls are its hot path
  // (bench/results/e2e-2026-12-03-tokens.md has both measured; within this VM's noise).
  std::string authorization;
  std::unique_ptr<ThreadPool> streams;  // helpers of ParallelFor in Save/Load
  std::unique_ptr<ThreadPool> async;    // the *Async calls
  std::unique_ptr<ReceivePool> pool;    // receive_pool_bytes > 0
  bool same_host = false;               // the target is a unix socket
  // The daemon's host tier, mapped read-only by MapHostTier; unmapped with the client.
  struct HostMap {
    void* base = nullptr;
    uint64_t size = 0;
    uint64_t arena_id = 0;
  };
  Mutex host_map_mu;
  HostMap host_map ABSL_GUARDED_BY(host_map_mu);
  ~Impl() {
    MutexLock lock(&host_map_mu);
    if (host_map.base != nullptr) munmap(host_map.base, host_map.size);
  }

  // The UCX data plane: data_plane_lanes sessions, each opened on first use and reopened when it
  // fails; null = gRPC.
  struct Lane {
    std::shared_ptr<DataPlaneClient> dp;
    absl::Time retry_at = absl::InfinitePast();
    absl::Status error;
  };
  Mutex dp_mu;
  std::vector<Lane> lanes ABSL_GUARDED_BY(dp_mu);  // sized at Connect
  size_t next_lane ABSL_GUARDED_BY(dp_mu) = 0;     // the lanes are taken in turn

  // The session to move the next payload over (the lanes in turn), or null for gRPC. Errors only
  // with DataPlane::kUcx.
  absl::StatusOr<std::shared_ptr<DataPlaneClient>> DataPlane() {
    KVDN_ASSIGN_OR_RETURN(std::vector<std::shared_ptr<DataPlaneClient>> d, DataPlanes(1));
    return d.empty() ? nullptr : std::move(d[0]);
  }

  // The sessions of the next `k` lanes in turn (a lane more than once when `k` exceeds the lanes;
  // fewer when some cannot open now), or none for gRPC. Errors only with DataPlane::kUcx, when no
  // lane is open.
  absl::StatusOr<std::vector<std::shared_ptr<DataPlaneClient>>> DataPlanes(size_t k) {
    std::vector<std::shared_ptr<DataPlaneClient>> out;
    if (options.data_plane == ClientOptions::DataPlane::kGrpc) return out;
    MutexLock lock(&dp_mu);
    k = std::max<size_t>(k, 1);  // more than lanes.size(): lanes taken more than once
    std::vector<Lane*> picked;
    bool closed = false;
    for (size_t i = 0; i < k; ++i) {
      Lane& lane = lanes[next_lane++ % lanes.size()];
      if (!(lane.dp && lane.dp->healthy())) {
        lane.dp.reset();
        closed = true;
      }
      picked.push_back(&lane);
    }
    if (closed) OpenDueLanes();
    for (Lane* lane : picked) {
      if (lane->dp) out.push_back(lane->dp);
    }
    if (out.empty() && options.data_plane == ClientOptions::DataPlane::kUcx) {
      return absl::UnavailableError(
          absl::StrCat("the UCX data plane is unavailable: ", picked[0]->error.message()));
    }
    return out;
  }

  static std::vector<DataPlaneClient*> Raw(const std::vector<std::shared_ptr<DataPlaneClient>>& d) {
    std::vector<DataPlaneClient*> out;
    out.reserve(d.size());
    for (const auto& s : d) out.push_back(s.get());
    return out;
  }

  // Opens every closed lane whose retry time has come, all at once, each on a thread of its own:
  // an open is an RPC, a UCX worker and a connection (~5 ms on the 2-core VM), so 8 lanes opened
  // one after another as they came up delayed a client's first Load by ~35 ms.
  void OpenDueLanes() ABSL_EXCLUSIVE_LOCKS_REQUIRED(dp_mu) {
    const absl::Time now = absl::Now();
    std::vector<Lane*> due;
    for (Lane& l : lanes) {
      if (!(l.dp && l.dp->healthy()) && now >= l.retry_at) due.push_back(&l);
    }
    if (due.empty()) return;
    std::vector<absl::StatusOr<std::shared_ptr<DataPlaneClient>>> opened(due.size());
    std::vector<std::thread> helpers;
    for (size_t i = 1; i < due.size(); ++i) {
      helpers.emplace_back([this, &opened, i] { opened[i] = OpenSession(); });
    }
    opened[0] = OpenSession();
    for (std::thread& t : helpers) t.join();
    for (size_t i = 0; i < due.size(); ++i) {
      if (opened[i].ok()) {
        due[i]->dp = *std::move(opened[i]);
      } else {
        due[i]->dp.reset();
        due[i]->error = opened[i].status();
        due[i]->retry_at = absl::Now() + absl::Seconds(5);
      }
    }
  }

  // How many parts a UCX Get or Put of `payload_bytes` is cut into when `concurrent` chunks move
  // at once: parts of at least part_bytes, at most one per lane the other chunks leave free. A Put
  // to a daemon on another host (tcp, RDMA) keeps kRemotePutParts parts in flight even where that
  // takes more parts than lanes (parts then share a lane): its parts' transfers and kvdnd's
  // receiving and hashing of each overlap. One lane over tcp on the 2-core VM, 4 clients' 4 MiB
  // Puts: 4.0-4.4 GB/s whole, 5.0-5.8 in 4 parts; one client's: the same or a little more; Gets in
  // parts on one lane were no faster, and Puts over shared memory slower
  // (bench/results/transfer-2026-12-02-tcp-seg.md, transfer-2026-12-02-vm.md).
  static constexpr size_t kRemotePutParts = 4;
  size_t PartsFor(uint64_t payload_bytes, size_t concurrent, bool put = false) const {
    if (options.part_bytes == 0) return 1;
    const uint64_t by_size = payload_bytes / options.part_bytes;
    const size_t n = std::max<size_t>(1, concurrent);
    size_t slots = static_cast<size_t>(options.data_plane_lanes) / n;
    if (put && !same_host) slots = std::max(slots, kRemotePutParts / n);
    return static_cast<size_t>(std::max<uint64_t>(1, std::min<uint64_t>(by_size, slots)));
  }

  // A UCX Get of one chunk's payload (of about `payload_hint` bytes) in `parts` parts over as many
  // lanes, or null when the payload goes over gRPC. Retried on UNAVAILABLE.
  std::optional<absl::StatusOr<uint64_t>> UcxGet(
      const ChunkKey& key, uint64_t lease_id, uint64_t payload_hint, size_t parts,
      DataPlaneClient::Place place, std::optional<DataPlaneClient::Landed> landed = std::nullopt) {
    absl::StatusOr<std::vector<std::shared_ptr<DataPlaneClient>>> d = DataPlanes(parts);
    if (!d.ok()) return d.status();
    if (d->empty()) return std::nullopt;
    const std::vector<DataPlaneClient*> sessions = Raw(*d);
    return WithRetry<absl::StatusOr<uint64_t>>([&](grpc::ClientContext* ctx) {
      return DataPlaneClient::GetInParts(sessions, key, lease_id, payload_hint, place,
                                         absl::FromChrono(ctx->deadline()), landed);
    });
  }

  // A new data-plane session with kvdnd, the receive pool registered with it. Touches only what
  // Connect set up (immutable after it), so several may open at once.
  absl::StatusOr<std::shared_ptr<DataPlaneClient>> OpenSession() const {
    KVDN_ASSIGN_OR_RETURN(
        std::shared_ptr<DataPlaneClient> dp,
        DataPlaneClient::Open(stub.get(), same_host, options.ucx_transports, options.deadline,
                              /*peer_node=*/"", authorization));
    if (pool && pool->base() != nullptr) {
      KVDN_RETURN_IF_ERROR(dp->RegisterPool(pool->base(), pool->size()));
    }
    return dp;
  }

  // Runs `attempt(ctx)` until it returns anything but UNAVAILABLE (or, with `retry_aborted`,
  // ABORTED), attempts run out, or the deadline passes.
  template <typename T, typename F>
  T WithRetry(F attempt, bool retry_aborted = false) {
    const auto deadline =
        std::chrono::system_clock::now() + absl::ToChronoNanoseconds(options.deadline);
    absl::Duration backoff = options.initial_backoff;
    for (int i = 1;; ++i) {
      grpc::ClientContext ctx;
      ctx.set_deadline(deadline);
      if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
      T r = attempt(&ctx);
      const absl::Status st = StatusOf(r);
      const bool again = absl::IsUnavailable(st) || (retry_aborted && absl::IsAborted(st));
      if (!again || i >= options.max_attempts) return r;
      const auto wake = std::chrono::system_clock::now() + absl::ToChronoNanoseconds(backoff);
      if (wake >= deadline) return r;
      std::this_thread::sleep_until(wake);
      backoff *= 2;
    }
  }
  static absl::Status StatusOf(const absl::Status& s) { return s; }
  template <typename T>
  static absl::Status StatusOf(const absl::StatusOr<T>& s) {
    return s.status();
  }

  // Stores one chunk, given as its 64-byte header and its payload, while `concurrent` chunks are
  // stored at once: over UCX (in parts over several lanes when PartsFor says so), else streamed
  // as gRPC frames. ABORTED (another Put of the key is still writing it) is retried as
  // UNAVAILABLE is: once that write ends, the retry finds the chunk stored or reserves it.
  static constexpr bool kRetryAborted = true;
  absl::StatusOr<bool> PutChunk(const ChunkKey& key, uint64_t payload_checksum, ByteSpan header,
                                ByteSpan payload, size_t concurrent) {
    const ByteSpan parts[2] = {header, payload};
    const uint64_t size = header.size() + payload.size();
    KVDN_ASSIGN_OR_RETURN(std::vector<std::shared_ptr<DataPlaneClient>> d,
                          DataPlanes(PartsFor(payload.size(), concurrent, /*put=*/true)));
    if (!d.empty()) {
      const std::vector<DataPlaneClient*> sessions = Raw(d);
      return WithRetry<absl::StatusOr<bool>>(
          [&](grpc::ClientContext* ctx) {
            const absl::Time deadline = absl::FromChrono(ctx->deadline());
            return sessions.size() == 1
                       ? sessions[0]->Put(key, 0, header, payload, deadline)
                       : DataPlaneClient::PutInParts(sessions, key, header, payload, deadline);
          },
          kRetryAborted);
    }
    v1::PutRequest first;
    v1::PutRequest::Header* h = first.mutable_header();
    KeyToProto(key, h->mutable_key());
    h->set_size(size);
    h->set_payload_checksum(payload_checksum);
    return WithRetry<absl::StatusOr<bool>>(
        [&](grpc::ClientContext* ctx) {
          return PutCall::Run(*generic, ctx->deadline(), authorization, first, parts,
                              options.frame_bytes);
        },
        kRetryAborted);
  }

  // Streams one chunk; on_data(offset, bytes) receives it in order. Returns its size.
  template <typename OnSize, typename OnData>
  absl::StatusOr<uint64_t> GetStream(const ChunkKey& key, OnSize on_size, OnData on_data) {
    v1::GetRequest req;
    KeyToProto(key, req.mutable_key());
    return WithRetry<absl::StatusOr<uint64_t>>(
        [&](grpc::ClientContext* ctx) -> absl::StatusOr<uint64_t> {
          GetCall call(on_size, on_data);
          return call.Run(*generic, ctx, req, key);
        });
  }

  // Loads chunk `key` (of `tokens_in_chunk` tokens) into `payload` and verifies it; `concurrent`
  // chunks are being loaded at once.
  absl::Status LoadChunk(const ChunkKey& key, uint32_t tokens_in_chunk, MutableByteSpan payload,
                         size_t concurrent) {
    ChunkSink sink;
    sink.payload = payload;
    const uint64_t expect = kChunkHeaderBytes + payload.size();
    auto on_size = [&](uint64_t size) -> absl::Status {
      sink.hasher.emplace();  // anew on each attempt
      if (size != expect) {
        return absl::FailedPreconditionError(absl::StrCat(
            "chunk ", key.ToString(), " holds ", size, " bytes; this model's chunk of ",
            tokens_in_chunk, " tokens needs ", expect, " (same fingerprint, other shape?)"));
      }
      return absl::OkStatus();
    };
    auto on_data = [&](uint64_t off, ByteSpan d) {
      size_t i = 0;
      if (off < kChunkHeaderBytes) {
        i = std::min<size_t>(d.size(), kChunkHeaderBytes - off);
        std::memcpy(sink.header + off, d.data(), i);
      }
      if (i < d.size()) {
        const uint64_t poff = off + i - kChunkHeaderBytes;
        std::memcpy(payload.data() + poff, d.data() + i, d.size() - i);
        sink.hasher->Update(ByteSpan(payload.data() + poff, d.size() - i));
      }
    };
    // Over UCX: straight into the caller's buffer. A chunk in parts over several lanes is hashed
    // part by part: each part's blocks are summed for the XXH3 by the thread that received it,
    // right after its copy (in its cache), and folded at the end, so no thread reads the whole
    // payload again. A whole chunk is hashed after, in one pass, on this thread (the transport's
    // thread goes on to its next copy).
    const size_t parts = PartsFor(payload.size(), concurrent);
    auto place = [&](ByteSpan header, uint64_t payload_bytes) -> absl::StatusOr<MutableByteSpan> {
      KVDN_RETURN_IF_ERROR(on_size(kChunkHeaderBytes + payload_bytes));
      if (header.size() != kChunkHeaderBytes) {
        return absl::InternalError("kvdnd sent a chunk header of the wrong size");
      }
      std::memcpy(sink.header, header.data(), kChunkHeaderBytes);
      if (parts > 1) sink.blocks.emplace(payload.size());  // anew on each attempt
      return payload;
    };
    // Runs after place (a part lands only in its buffer); a part that overlaps another (a daemon
    // that sends the whole payload for each part) is refused by AddRange and left to Finish.
    auto landed = [&](uint64_t off, ByteSpan bytes) { (void)sink.blocks->AddRange(off, bytes); };
    std::optional<DataPlaneClient::Landed> on_landed;
    if (parts > 1) on_landed.emplace(landed);
    std::optional<absl::StatusOr<uint64_t>> ucx =
        UcxGet(key, 0, payload.size(), parts, place, on_landed);
    uint64_t digest = 0;
    if (ucx.has_value()) {
      KVDN_RETURN_IF_ERROR(ucx->status());
      digest = parts > 1 ? sink.blocks->Finish(payload) : Xxh3_64(payload);
    } else {
      KVDN_RETURN_IF_ERROR(GetStream(key, on_size, on_data).status());
      digest = sink.hasher->Digest();
    }
    KVDN_ASSIGN_OR_RETURN(ChunkHeader h,
                          DecodeChunkHeader(ByteSpan(sink.header, kChunkHeaderBytes)));
    const ModelSpec& m = options.model;
    if (h.info.dtype != m.dtype || h.info.num_layers != m.num_layers ||
        h.info.num_kv_heads != m.num_kv_heads || h.info.head_dim != m.head_dim ||
        h.info.num_tokens != tokens_in_chunk) {
      return absl::FailedPreconditionError(
          absl::StrCat("chunk ", key.ToString(), " has another shape than this client's model"));
    }
    if (digest != h.payload_checksum) {
      return absl::DataLossError(absl::StrFormat(
          "chunk %s: payload hashes to %016x, its header says %016x; discard the buffer",
          key.ToString(), digest, h.payload_checksum));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<size_t> LookupKeys(absl::Span<const ChunkKey> keys) {
    if (keys.empty()) return 0;
    v1::LookupRequest req;
    req.set_namespace_(options.ns);
    req.set_fingerprint(fingerprint);
    for (const ChunkKey& k : keys) {
      const std::array<uint8_t, 16> c = k.prefix_hash.Canonical();
      req.add_prefix_hashes(c.data(), c.size());
    }
    return WithRetry<absl::StatusOr<size_t>>(
        [&](grpc::ClientContext* ctx) -> absl::StatusOr<size_t> {
          v1::LookupResponse resp;
          grpc::Status st = stub->Lookup(ctx, req, &resp);
          if (!st.ok()) return FromGrpcStatus(st);
          return std::min<size_t>(resp.matched_chunks(), keys.size());
        });
  }

  uint32_t TokensInChunk(size_t chunk, size_t num_tokens) const {
    const size_t tpc = options.model.tokens_per_chunk;
    return static_cast<uint32_t>(std::min(tpc, num_tokens - chunk * tpc));
  }
};

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  KVDN_RETURN_IF_ERROR(ValidateOptions(options));
  if (options.tune_malloc) (void)kvdn::TuneMalloc();
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->fingerprint = ModelFingerprint(options.model);
  impl->same_host = absl::StartsWith(ResolveTarget(options.target), "unix:");
  KVDN_ASSIGN_OR_RETURN(impl->options.token, ResolveToken(options.token));
  if (!impl->options.token.empty()) impl->authorization = "Bearer " + impl->options.token;
  impl->channel = MakeChannel(options.target, /*token=*/"", options.tls);
  impl->stub = v1::KvService::NewStub(impl->channel);
  impl->generic = std::make_unique<grpc::GenericStub>(impl->channel);
  // The automatic values (options() reports them).
  int lanes = options.data_plane_lanes;
  if (lanes == 0) {
    lanes = std::clamp(static_cast<int>(std::thread::hardware_concurrency()) / 2, 1, 8);
  }
  impl->options.data_plane_lanes = lanes;
  if (options.parallel_streams == 0) impl->options.parallel_streams = std::max(4, lanes);
  impl->streams = std::make_unique<ThreadPool>(impl->options.parallel_streams - 1);
  impl->async = std::make_unique<ThreadPool>(options.async_threads);
  {
    MutexLock lock(&impl->dp_mu);
    impl->lanes.resize(static_cast<size_t>(lanes));
  }
  if (options.receive_pool_bytes > 0) {
    impl->pool = std::make_unique<ReceivePool>(options.receive_pool_bytes);
    if (impl->pool->base() == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "ClientOptions.receive_pool_bytes: cannot map ", options.receive_pool_bytes, " bytes"));
    }
  }
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

const ClientOptions& Client::options() const { return impl_->options; }
std::shared_ptr<grpc::Channel> Client::channel() const { return impl_->channel; }

uint64_t Client::PayloadBytes(uint32_t tokens_in_chunk) const {
  return impl_->options.model.BytesPerToken() * tokens_in_chunk;
}

std::vector<uint64_t> Client::ChunkPayloadSizes(size_t num_tokens) const {
  const size_t tpc = impl_->options.model.tokens_per_chunk;
  std::vector<uint64_t> out;
  for (size_t c = 0; c * tpc < num_tokens; ++c) {
    out.push_back(PayloadBytes(impl_->TokensInChunk(c, num_tokens)));
  }
  return out;
}

absl::StatusOr<size_t> Client::Lookup(absl::Span<const int32_t> tokens) {
  const ClientOptions& o = impl_->options;
  KVDN_ASSIGN_OR_RETURN(std::vector<ChunkKey> keys,
                        ChunkKeysForTokens(o.ns, o.model, tokens, /*include_tail=*/true));
  KVDN_ASSIGN_OR_RETURN(size_t matched, impl_->LookupKeys(keys));
  return std::min(tokens.size(), matched * o.model.tokens_per_chunk);
}

absl::StatusOr<SaveResult> Client::Save(absl::Span<const int32_t> tokens,
                                        absl::Span<const ByteSpan> payloads, size_t first_chunk) {
  const ClientOptions& o = impl_->options;
  KVDN_ASSIGN_OR_RETURN(std::vector<ChunkKey> keys,
                        ChunkKeysForTokens(o.ns, o.model, tokens, /*include_tail=*/true));
  if (first_chunk > keys.size() || payloads.size() > keys.size() - first_chunk) {
    return absl::InvalidArgumentError(absl::StrCat(payloads.size(), " payloads from chunk ",
                                                   first_chunk, " for ", tokens.size(),
                                                   " tokens, which make ", keys.size(), " chunks"));
  }
  for (size_t j = 0; j < payloads.size(); ++j) {
    const uint64_t want = PayloadBytes(impl_->TokensInChunk(first_chunk + j, tokens.size()));
    if (payloads[j].size() != want) {
      return absl::InvalidArgumentError(absl::StrCat("payload ", j, " (chunk ", first_chunk + j,
                                                     ") has ", payloads[j].size(),
                                                     " bytes; the model needs ", want));
    }
  }
  keys.resize(first_chunk + payloads.size());
  SaveResult result;
  // Chunks already stored from the start need not travel.
  KVDN_ASSIGN_OR_RETURN(size_t matched, impl_->LookupKeys(keys));
  const size_t present = matched > first_chunk ? matched - first_chunk : 0;
  result.chunks_present = present;
  std::vector<absl::Status> statuses(payloads.size());
  std::vector<char> stored(payloads.size(), 0);
  impl_->streams->ParallelFor(payloads.size() - present, o.parallel_streams, [&](size_t k) {
    const size_t j = present + k;
    const size_t i = first_chunk + j;
    ChunkInfo info{o.model.dtype, o.model.num_layers, o.model.num_kv_heads, o.model.head_dim,
                   impl_->TokensInChunk(i, tokens.size())};
    const uint64_t checksum = Xxh3_64(payloads[j]);
    uint8_t header[kChunkHeaderBytes];
    WriteChunkHeader(info, checksum, MutableByteSpan(header, sizeof(header)));
    auto r = impl_->PutChunk(keys[i], checksum, ByteSpan(header, sizeof(header)), payloads[j],
                             std::min<size_t>(payloads.size() - present, o.parallel_streams));
    statuses[j] = r.status();
    if (r.ok()) stored[j] = *r ? 1 : 2;
  });
  for (size_t j = present; j < payloads.size(); ++j) {
    KVDN_RETURN_IF_ERROR(statuses[j]);
    if (stored[j] == 1) {
      ++result.chunks_stored;
      result.bytes_sent += kChunkHeaderBytes + payloads[j].size();
    } else {
      ++result.chunks_present;
    }
  }
  return result;
}

absl::StatusOr<LoadResult> Client::Load(absl::Span<const int32_t> tokens,
                                        absl::Span<const MutableByteSpan> buffers,
                                        size_t first_chunk,
                                        const std::function<void(size_t)>& on_chunk) {
  const ClientOptions& o = impl_->options;
  KVDN_ASSIGN_OR_RETURN(std::vector<ChunkKey> keys,
                        ChunkKeysForTokens(o.ns, o.model, tokens, /*include_tail=*/true));
  if (first_chunk > keys.size()) {
    return absl::InvalidArgumentError(absl::StrCat("first_chunk ", first_chunk, " past the ",
                                                   keys.size(), " chunks of ", tokens.size(),
                                                   " tokens"));
  }
  const size_t n = std::min(keys.size() - first_chunk, buffers.size());
  for (size_t j = 0; j < n; ++j) {
    const uint64_t want = PayloadBytes(impl_->TokensInChunk(first_chunk + j, tokens.size()));
    if (buffers[j].size() != want) {
      return absl::InvalidArgumentError(absl::StrCat("buffer ", j, " (chunk ", first_chunk + j,
                                                     ") has ", buffers[j].size(),
                                                     " bytes; the model's chunk needs ", want));
    }
  }
  keys.resize(first_chunk + n);
  KVDN_ASSIGN_OR_RETURN(size_t matched, impl_->LookupKeys(keys));
  const size_t count = matched > first_chunk ? matched - first_chunk : 0;
  std::vector<absl::Status> statuses(count);
  impl_->streams->ParallelFor(count, o.parallel_streams, [&](size_t j) {
    const size_t i = first_chunk + j;
    statuses[j] = impl_->LoadChunk(keys[i], impl_->TokensInChunk(i, tokens.size()), buffers[j],
                                   std::min<size_t>(count, o.parallel_streams));
    if (statuses[j].ok() && on_chunk) on_chunk(j);
  });
  LoadResult result;
  for (size_t j = 0; j < count; ++j) {
    // Evicted since the lookup: the prefix ends here; the engine recomputes the rest.
    if (absl::IsNotFound(statuses[j])) break;
    KVDN_RETURN_IF_ERROR(statuses[j]);
    const uint32_t t = impl_->TokensInChunk(first_chunk + j, tokens.size());
    ++result.chunks;
    result.tokens += t;
    result.bytes += buffers[j].size();
  }
  return result;
}

std::future<absl::StatusOr<size_t>> Client::LookupAsync(std::vector<int32_t> tokens) {
  auto p = std::make_shared<std::promise<absl::StatusOr<size_t>>>();
  auto f = p->get_future();
  impl_->async->Submit([this, p, t = std::move(tokens)] { p->set_value(Lookup(t)); });
  return f;
}

std::future<absl::StatusOr<SaveResult>> Client::SaveAsync(std::vector<int32_t> tokens,
                                                          std::vector<ByteSpan> payloads) {
  auto p = std::make_shared<std::promise<absl::StatusOr<SaveResult>>>();
  auto f = p->get_future();
  impl_->async->Submit(
      [this, p, t = std::move(tokens), pl = std::move(payloads)] { p->set_value(Save(t, pl)); });
  return f;
}

std::future<absl::StatusOr<LoadResult>> Client::LoadAsync(std::vector<int32_t> tokens,
                                                          std::vector<MutableByteSpan> buffers) {
  auto p = std::make_shared<std::promise<absl::StatusOr<LoadResult>>>();
  auto f = p->get_future();
  impl_->async->Submit(
      [this, p, t = std::move(tokens), b = std::move(buffers)] { p->set_value(Load(t, b)); });
  return f;
}

absl::StatusOr<bool> Client::PutEncoded(const ChunkKey& key, ByteSpan encoded) {
  KVDN_ASSIGN_OR_RETURN(ChunkHeader h, DecodeChunkHeader(encoded));
  return impl_->PutChunk(key, h.payload_checksum, encoded.subspan(0, kChunkHeaderBytes),
                         encoded.subspan(kChunkHeaderBytes), 1);
}

absl::StatusOr<uint64_t> Client::GetEncoded(const ChunkKey& key, MutableByteSpan dst) {
  auto place = [&](ByteSpan h, uint64_t n) { return PlaceEncoded(dst, h, n); };
  const uint64_t hint = dst.size() > kChunkHeaderBytes ? dst.size() - kChunkHeaderBytes : 0;
  std::optional<absl::StatusOr<uint64_t>> ucx =
      impl_->UcxGet(key, 0, hint, impl_->PartsFor(hint, 1), place);
  if (ucx.has_value()) {
    KVDN_ASSIGN_OR_RETURN(uint64_t n, *ucx);
    return kChunkHeaderBytes + n;
  }
  auto on_size = [&](uint64_t size) -> absl::Status {
    if (size > dst.size()) {
      return absl::OutOfRangeError(
          absl::StrCat("chunk of ", size, " bytes does not fit a ", dst.size(), "-byte buffer"));
    }
    return absl::OkStatus();
  };
  auto on_data = [&](uint64_t off, ByteSpan bytes) {
    std::memcpy(dst.data() + off, bytes.data(), bytes.size());
  };
  return impl_->GetStream(key, on_size, on_data);
}

namespace {
TransferDescriptor DescriptorFromProto(const v1::GetDescriptorResponse& resp) {
  TransferDescriptor d;
  d.lease_id = resp.transfer().id();
  d.size = resp.transfer().size();
  d.worker_address = resp.transfer().worker_address();
  d.expires = absl::FromUnixMicros(resp.transfer().expires_unix_micros());
  if (resp.has_gpu()) {
    d.gpu = TransferDescriptor::Gpu{resp.gpu().ipc_handle(), resp.gpu().offset(),
                                    resp.gpu().device_uuid()};
  }
  if (resp.host_arena() != 0) {
    d.host_arena = resp.host_arena();
    d.host_offset = resp.transfer().remote_offset();
  }
  return d;
}
}  // namespace

absl::StatusOr<TransferDescriptor> Client::AcquireDescriptor(const ChunkKey& key,
                                                             absl::Duration lease,
                                                             bool accept_gpu) {
  v1::GetDescriptorRequest req;
  KeyToProto(key, req.mutable_key());
  req.set_lease_ms(static_cast<uint32_t>(absl::ToInt64Milliseconds(lease)));
  req.set_accept_gpu(accept_gpu);
  return impl_->WithRetry<absl::StatusOr<TransferDescriptor>>(
      [&](grpc::ClientContext* ctx) -> absl::StatusOr<TransferDescriptor> {
        v1::GetDescriptorResponse resp;
        grpc::Status st = impl_->stub->GetDescriptor(ctx, req, &resp);
        if (!st.ok()) return FromGrpcStatus(st);
        return DescriptorFromProto(resp);
      });
}

absl::StatusOr<std::vector<TransferDescriptor>> Client::AcquireDescriptors(
    absl::Span<const ChunkKey> keys, absl::Duration lease, bool accept_gpu, bool gpu_only) {
  v1::GetDescriptorsRequest req;
  for (const ChunkKey& k : keys) KeyToProto(k, req.add_keys());
  req.set_lease_ms(static_cast<uint32_t>(absl::ToInt64Milliseconds(lease)));
  req.set_accept_gpu(accept_gpu);
  req.set_gpu_only(gpu_only);
  return impl_->WithRetry<absl::StatusOr<std::vector<TransferDescriptor>>>(
      [&](grpc::ClientContext* ctx) -> absl::StatusOr<std::vector<TransferDescriptor>> {
        v1::GetDescriptorsResponse resp;
        grpc::Status st = impl_->stub->GetDescriptors(ctx, req, &resp);
        if (!st.ok()) return FromGrpcStatus(st);
        std::vector<TransferDescriptor> out;
        out.reserve(resp.descriptors_size());
        for (const auto& d : resp.descriptors()) out.push_back(DescriptorFromProto(d));
        return out;
      });
}

absl::StatusOr<uint64_t> Client::ReadDescriptor(const TransferDescriptor& desc,
                                                MutableByteSpan dst) {
  const uint64_t hint = desc.size > kChunkHeaderBytes ? desc.size - kChunkHeaderBytes : 0;
  KVDN_ASSIGN_OR_RETURN(std::vector<std::shared_ptr<DataPlaneClient>> d,
                        impl_->DataPlanes(impl_->PartsFor(hint, 1)));
  if (d.empty()) {
    return absl::FailedPreconditionError("ReadDescriptor needs the UCX data plane; there is none");
  }
  if (desc.worker_address.empty() || desc.worker_address != d[0]->descriptor_address()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "descriptor of lease ", desc.lease_id,
        desc.worker_address.empty() ? " names no UCX worker"
                                    : " belongs to another daemon than this client's"));
  }
  const std::vector<DataPlaneClient*> sessions = Impl::Raw(d);
  auto place = [&](ByteSpan h, uint64_t n) { return PlaceEncoded(dst, h, n); };
  KVDN_ASSIGN_OR_RETURN(
      uint64_t n, DataPlaneClient::GetInParts(sessions, ChunkKey{}, desc.lease_id, hint, place,
                                              absl::Now() + impl_->options.deadline));
  return kChunkHeaderBytes + n;
}

absl::Status Client::ReleaseDescriptor(const TransferDescriptor& desc) {
  v1::ReleaseRequest req;
  req.set_lease_id(desc.lease_id);
  return impl_->WithRetry<absl::Status>([&](grpc::ClientContext* ctx) {
    v1::ReleaseResponse resp;
    return FromGrpcStatus(impl_->stub->Release(ctx, req, &resp));
  });
}

absl::Status Client::ReleaseDescriptors(absl::Span<const TransferDescriptor> ds) {
  constexpr size_t kMaxIds = 4096;  // per call (kv_service.proto)
  absl::Status first;
  for (size_t from = 0; from < ds.size(); from += kMaxIds) {
    v1::ReleaseRequest req;
    const absl::Span<const TransferDescriptor> part = ds.subspan(from, kMaxIds);
    req.mutable_lease_ids()->Reserve(static_cast<int>(part.size()));
    for (const TransferDescriptor& d : part) req.add_lease_ids(d.lease_id);
    absl::Status st = impl_->WithRetry<absl::Status>([&](grpc::ClientContext* ctx) {
      v1::ReleaseResponse resp;
      return FromGrpcStatus(impl_->stub->Release(ctx, req, &resp));
    });
    if (first.ok()) first = std::move(st);
  }
  return first;
}

absl::StatusOr<HostTierMapping> Client::MapHostTier(bool refresh) {
  MutexLock lock(&impl_->host_map_mu);
  Impl::HostMap& m = impl_->host_map;
  if (m.base != nullptr && !refresh) {
    return HostTierMapping{ByteSpan(static_cast<const uint8_t*>(m.base), m.size), m.arena_id};
  }
  v1::MapHostTierRequest req;
  req.set_pid_namespace(transfer::NamespaceId("self", "pid"));
  KVDN_ASSIGN_OR_RETURN(
      v1::MapHostTierResponse resp,
      impl_->WithRetry<absl::StatusOr<v1::MapHostTierResponse>>(
          [&](grpc::ClientContext* ctx) -> absl::StatusOr<v1::MapHostTierResponse> {
            v1::MapHostTierResponse r;
            grpc::Status st = impl_->stub->MapHostTier(ctx, req, &r);
            if (!st.ok()) return FromGrpcStatus(st);
            return r;
          }));
  if (m.base != nullptr && m.arena_id == resp.arena_id()) {
    return HostTierMapping{ByteSpan(static_cast<const uint8_t*>(m.base), m.size), m.arena_id};
  }
  const std::string path = absl::StrCat("/proc/", resp.pid(), "/fd/", resp.fd());
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("MapHostTier: opening kvdnd's host tier as ", path,
                                            ": ", std::strerror(errno),
                                            " (the engine needs kvdnd's uid or CAP_SYS_PTRACE)"));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < resp.size() || resp.size() == 0) {
    close(fd);
    return absl::InternalError(absl::StrCat("MapHostTier: ", path, " holds ", st.st_size,
                                            " bytes; kvdnd said ", resp.size()));
  }
  void* p = mmap(nullptr, resp.size(), PROT_READ, MAP_SHARED, fd, 0);
  const int mmap_errno = errno;
  close(fd);  // the mapping keeps the memory
  if (p == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("MapHostTier: mapping ", resp.size(), " bytes of ",
                                            path, ": ", std::strerror(mmap_errno)));
  }
  if (m.base != nullptr) munmap(m.base, m.size);
  m = Impl::HostMap{p, resp.size(), resp.arena_id()};
  return HostTierMapping{ByteSpan(static_cast<const uint8_t*>(p), m.size), m.arena_id};
}

std::string Client::DataPlaneInUse() {
  auto d = impl_->DataPlane();
  if (!d.ok() || *d == nullptr) return "grpc";
  size_t lanes;
  {
    MutexLock lock(&impl_->dp_mu);
    lanes = impl_->lanes.size();
  }
  return absl::StrCat("ucx: ", (*d)->transports(),
                      lanes > 1 ? absl::StrCat(" (", lanes, " lanes)") : "");
}

MutableByteSpan Client::AllocateBuffer(size_t size) {
  return impl_->pool ? impl_->pool->Allocate(size) : MutableByteSpan();
}

void Client::FreeBuffer(MutableByteSpan buffer) {
  if (impl_->pool) impl_->pool->Free(buffer);
}

MutableByteSpan Client::PoolRegion() const {
  return impl_->pool ? MutableByteSpan(impl_->pool->base(), impl_->pool->size())
                     : MutableByteSpan();
}

absl::Status Client::Delete(const ChunkKey& key) {
  v1::DeleteRequest req;
  KeyToProto(key, req.mutable_key());
  return impl_->WithRetry<absl::Status>([&](grpc::ClientContext* ctx) {
    v1::DeleteResponse resp;
    return FromGrpcStatus(impl_->stub->Delete(ctx, req, &resp));
  });
}

}  // namespace kvdn::client
