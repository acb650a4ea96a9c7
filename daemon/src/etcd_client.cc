#include "kvdn/daemon/etcd_client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "etcd/rpc.grpc.pb.h"
#include "kvdn/common/mutex.h"
#include "kvdn/common/status.h"
#include "kvdn/daemon/config.h"

namespace kvdn::daemon {
namespace {

absl::Status FromGrpc(const grpc::Status& st, absl::string_view what, const std::string& endpoint) {
  return absl::Status(static_cast<absl::StatusCode>(st.error_code()),
                      absl::StrCat("etcd ", what, " via ", endpoint, ": ", st.error_message()));
}

bool Retryable(const grpc::Status& st) { return st.error_code() == grpc::StatusCode::UNAVAILABLE; }

EtcdKeyValue FromProto(const mvccpb::KeyValue& kv) {
  return EtcdKeyValue{kv.key(), kv.value(), kv.lease(), kv.mod_revision()};
}

std::string Quoted(absl::string_view key) { return absl::StrCat("\"", key, "\""); }

}  // namespace

std::string PrefixRangeEnd(absl::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    const auto last = static_cast<unsigned char>(end.back());
    if (last < 0xff) {
      end.back() = static_cast<char>(last + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');  // every key >= prefix
}

struct EtcdClient::Impl {
  EtcdOptions options;
  std::string joined;
  // One channel to an endpoint and its stubs.
  struct Conn {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<etcdserverpb::KV::Stub> kv;
    std::unique_ptr<etcdserverpb::Lease::Stub> lease;
    std::unique_ptr<etcdserverpb::Watch::Stub> watch;
  };
  struct Endpoint {
    std::string address;
    Mutex mu;
    std::shared_ptr<Conn> conn ABSL_GUARDED_BY(mu);
    absl::Time built ABSL_GUARDED_BY(mu);
  };
  std::vector<std::unique_ptr<Endpoint>> endpoints;
  std::atomic<size_t> current{0};  // the endpoint that answered last

  // Plain, or TLS with the files watched (made once: one file-watcher thread for all channels).
  std::shared_ptr<grpc::ChannelCredentials> credentials;

  std::shared_ptr<Conn> NewConn(const std::string& address) const {
    auto c = std::make_shared<Conn>();
    c->address = address;
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
    args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
    args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 1000);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    if (!options.tls.server_name.empty()) args.SetSslTargetNameOverride(options.tls.server_name);
    c->channel = grpc::CreateCustomChannel(address, credentials, args);
    c->kv = etcdserverpb::KV::NewStub(c->channel);
    c->lease = etcdserverpb::Lease::NewStub(c->channel);
    c->watch = etcdserverpb::Watch::NewStub(c->channel);
    return c;
  }
  // The connection to endpoint `at`.
  std::shared_ptr<Conn> ConnOf(size_t at) {
    Endpoint& e = *endpoints[at % endpoints.size()];
    MutexLock lock(&e.mu);
    return e.conn;
  }
  // After UNAVAILABLE on `conn`: replace it with a new channel (at most every 500 ms). A channel
  // whose first connection attempts failed (etcd not yet up, or restarting) does not recover by
  // itself here: etcd 3.4 accepts connections before it serves them and multiplexes gRPC with
  // HTTP on one port (cmux), and gRPC C++ 1.51's reconnects to it then time out waiting for the
  // server's SETTINGS frame for as long as we tried (tens of seconds), while a new channel
  // connects at once.
  void Reconnect(size_t at, const std::shared_ptr<Conn>& conn) {
    Endpoint& e = *endpoints[at % endpoints.size()];
    MutexLock lock(&e.mu);
    if (e.conn != conn || absl::Now() - e.built < absl::Milliseconds(500)) return;
    e.conn = NewConn(e.address);
    e.built = absl::Now();
  }

  // Runs `call(conn, context)` on the current endpoint, then on the others while the answer is
  // UNAVAILABLE, all within one deadline.
  template <typename Call>
  absl::Status Unary(absl::string_view what, Call&& call) {
    const absl::Time deadline = absl::Now() + options.deadline;
    grpc::Status last;
    std::string last_endpoint;
    const size_t start = current.load();
    for (size_t i = 0; i < endpoints.size(); ++i) {
      const size_t at = (start + i) % endpoints.size();
      std::shared_ptr<Conn> conn = ConnOf(at);
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(deadline));
      last = call(*conn, &ctx);
      last_endpoint = conn->address;
      if (!Retryable(last)) {
        current.store(at);  // it answered
        break;
      }
      Reconnect(at, conn);
      if (absl::Now() >= deadline) break;
    }
    if (last.ok()) return absl::OkStatus();
    absl::Status st = FromGrpc(last, what, last_endpoint);
    if (absl::IsUnavailable(st)) {
      // gRPC's words for a TLS mismatch ("Socket closed", "Endpoint read failed") do not say
      // which side of it this client is on.
      st = absl::UnavailableError(absl::StrCat(st.message(), " (", ConnectionKind(), ")"));
    }
    return st;
  }
  std::string ConnectionKind() const {
    const client::TlsOptions& t = options.tls;
    if (t.ca_file.empty()) return "plain connection: an etcd serving https needs etcd_tls";
    return absl::StrCat("TLS trusting ", t.ca_file,
                        t.cert_file.empty() ? ", no client certificate"
                                            : absl::StrCat(", client certificate ", t.cert_file),
                        t.server_name.empty() ? "" : absl::StrCat(", name ", t.server_name));
  }

  // A long-running stream's thread: `body(endpoint, ctx)` runs until it returns; Stop cancels the
  // context in use and joins.
  class StreamTask final : public Task {
   public:
    template <typename Body>
    StreamTask(Impl* impl, Body body) {
      thread_ = std::thread([this, impl, body = std::move(body)]() mutable { body(impl, this); });
    }
    ~StreamTask() override {
      {
        MutexLock lock(&mu_);
        stop_ = true;
        if (ctx_ != nullptr) ctx_->TryCancel();
        cv_.SignalAll();
      }
      thread_.join();
    }
    // The context the body uses now (cancelled by the destructor); false when stopping.
    bool Use(grpc::ClientContext* ctx) {
      MutexLock lock(&mu_);
      ctx_ = ctx;
      return !stop_;
    }
    bool stopping() {
      MutexLock lock(&mu_);
      return stop_;
    }
    // Sleeps `d` unless stopped first; false when stopping.
    bool Sleep(absl::Duration d) {
      MutexLock lock(&mu_);
      const absl::Time until = absl::Now() + d;
      while (!stop_ && absl::Now() < until) cv_.WaitWithTimeout(&mu_, until - absl::Now());
      return !stop_;
    }

   private:
    Mutex mu_;
    CondVar cv_;
    bool stop_ ABSL_GUARDED_BY(mu_) = false;
    grpc::ClientContext* ctx_ ABSL_GUARDED_BY(mu_) = nullptr;
    std::thread thread_;
  };
};

EtcdClient::EtcdClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
EtcdClient::~EtcdClient() = default;

const std::string& EtcdClient::endpoints() const { return impl_->joined; }

absl::StatusOr<std::unique_ptr<EtcdClient>> EtcdClient::Connect(const EtcdOptions& options) {
  if (options.endpoints.empty()) return absl::InvalidArgumentError("etcd: no endpoints given");
  KVDN_RETURN_IF_ERROR(client::ValidateTlsOptions(options.tls, "etcd tls."));
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->joined = absl::StrJoin(options.endpoints, ",");
  impl->credentials = options.tls.ca_file.empty() ? grpc::InsecureChannelCredentials()
                                                  : client::MakeTlsCredentials(options.tls);
  for (const std::string& e : options.endpoints) {
    if (!ValidHostPort(e)) {
      return absl::InvalidArgumentError(absl::StrCat("etcd endpoint \"", e, "\" is not host:port"));
    }
    auto ep = std::make_unique<Impl::Endpoint>();
    ep->address = e;
    {
      MutexLock lock(&ep->mu);
      ep->conn = impl->NewConn(e);
      ep->built = absl::Now();
    }
    impl->endpoints.push_back(std::move(ep));
  }
  return std::unique_ptr<EtcdClient>(new EtcdClient(std::move(impl)));
}

absl::StatusOr<int64_t> EtcdClient::Put(absl::string_view key, absl::string_view value,
                                        int64_t lease) {
  etcdserverpb::PutRequest req;
  req.set_key(std::string(key));
  req.set_value(std::string(value));
  req.set_lease(lease);
  etcdserverpb::PutResponse resp;
  KVDN_RETURN_IF_ERROR(impl_->Unary(
      absl::StrCat("Put ", Quoted(key)),
      [&](Impl::Conn& e, grpc::ClientContext* ctx) { return e.kv->Put(ctx, req, &resp); }));
  return resp.header().revision();
}

absl::StatusOr<std::optional<EtcdKeyValue>> EtcdClient::Get(absl::string_view key) {
  etcdserverpb::RangeRequest req;
  req.set_key(std::string(key));
  etcdserverpb::RangeResponse resp;
  KVDN_RETURN_IF_ERROR(impl_->Unary(
      absl::StrCat("Get ", Quoted(key)),
      [&](Impl::Conn& e, grpc::ClientContext* ctx) { return e.kv->Range(ctx, req, &resp); }));
  if (resp.kvs_size() == 0) return std::optional<EtcdKeyValue>();
  return std::optional<EtcdKeyValue>(FromProto(resp.kvs(0)));
}

absl::StatusOr<std::vector<EtcdKeyValue>> EtcdClient::GetPrefix(absl::string_view prefix,
                                                                int64_t* revision) {
  etcdserverpb::RangeRequest req;
  req.set_key(std::string(prefix));
  req.set_range_end(PrefixRangeEnd(prefix));
  etcdserverpb::RangeResponse resp;
  KVDN_RETURN_IF_ERROR(impl_->Unary(
      absl::StrCat("Get prefix ", Quoted(prefix)),
      [&](Impl::Conn& e, grpc::ClientContext* ctx) { return e.kv->Range(ctx, req, &resp); }));
  std::vector<EtcdKeyValue> out;
  out.reserve(static_cast<size_t>(resp.kvs_size()));
  for (const auto& kv : resp.kvs()) out.push_back(FromProto(kv));
  if (revision != nullptr) *revision = resp.header().revision();
  return out;
}

absl::StatusOr<int64_t> EtcdClient::Delete(absl::string_view key) {
  etcdserverpb::DeleteRangeRequest req;
  req.set_key(std::string(key));
  etcdserverpb::DeleteRangeResponse resp;
  KVDN_RETURN_IF_ERROR(impl_->Unary(
      absl::StrCat("Delete ", Quoted(key)),
      [&](Impl::Conn& e, grpc::ClientContext* ctx) { return e.kv->DeleteRange(ctx, req, &resp); }));
  return resp.deleted();
}

absl::StatusOr<int64_t> EtcdClient::GrantLease(absl::Duration ttl) {
  const int64_t seconds = absl::ToInt64Seconds(ttl);
  if (seconds < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("etcd lease ttl ", absl::FormatDuration(ttl), " is below 1 s"));
  }
  etcdserverpb::LeaseGrantRequest req;
  req.set_ttl(seconds);
  etcdserverpb::LeaseGrantResponse resp;
  KVDN_RETURN_IF_ERROR(impl_->Unary("LeaseGrant", [&](Impl::Conn& e, grpc::ClientContext* ctx) {
    return e.lease->LeaseGrant(ctx, req, &resp);
  }));
  if (!resp.error().empty()) {
    return absl::FailedPreconditionError(absl::StrCat("etcd LeaseGrant: ", resp.error()));
  }
  return resp.id();
}

absl::Status EtcdClient::RevokeLease(int64_t lease) {
  etcdserverpb::LeaseRevokeRequest req;
  req.set_id(lease);
  etcdserverpb::LeaseRevokeResponse resp;
  return impl_->Unary(absl::StrCat("LeaseRevoke ", lease),
                      [&](Impl::Conn& e, grpc::ClientContext* ctx) {
                        return e.lease->LeaseRevoke(ctx, req, &resp);
                      });
}

absl::StatusOr<int64_t> EtcdClient::LeaseTimeToLive(int64_t lease) {
  etcdserverpb::LeaseTimeToLiveRequest req;
  req.set_id(lease);
  etcdserverpb::LeaseTimeToLiveResponse resp;
  KVDN_RETURN_IF_ERROR(impl_->Unary(absl::StrCat("LeaseTimeToLive ", lease),
                                    [&](Impl::Conn& e, grpc::ClientContext* ctx) {
                                      return e.lease->LeaseTimeToLive(ctx, req, &resp);
                                    }));
  if (resp.ttl() < 0) {
    return absl::NotFoundError(absl::StrCat("etcd lease ", lease, " expired or never existed"));
  }
  return resp.ttl();
}

std::unique_ptr<EtcdClient::Task> EtcdClient::KeepAlive(int64_t lease,
                                                        std::function<void(absl::Status)> on_lost,
                                                        absl::Duration interval) {
  auto body = [lease, on_lost = std::move(on_lost), interval](Impl* impl, Impl::StreamTask* task) {
    absl::Duration every = interval > absl::ZeroDuration() ? interval : absl::Seconds(1);
    size_t at = impl->current.load();
    while (!task->stopping()) {
      std::shared_ptr<Impl::Conn> conn = impl->ConnOf(at);
      grpc::ClientContext ctx;
      if (!task->Use(&ctx)) break;
      auto stream = conn->lease->LeaseKeepAlive(&ctx);
      etcdserverpb::LeaseKeepAliveRequest req;
      req.set_id(lease);
      for (;;) {
        etcdserverpb::LeaseKeepAliveResponse resp;
        if (!stream->Write(req) || !stream->Read(&resp)) break;
        if (resp.ttl() <= 0) {
          task->Use(nullptr);
          ctx.TryCancel();
          (void)stream->Finish();
          on_lost(absl::NotFoundError(
              absl::StrCat("etcd lease ", lease, " is gone (expired or revoked)")));
          return;
        }
        if (interval <= absl::ZeroDuration()) {
          every = std::max(absl::Milliseconds(500), absl::Seconds(resp.ttl()) / 3);
        }
        if (!task->Sleep(every)) break;
      }
      task->Use(nullptr);
      ctx.TryCancel();
      (void)stream->Finish();
      // The stream broke: a new connection, on the next endpoint, after a pause.
      impl->Reconnect(at, conn);
      ++at;
      if (!task->Sleep(absl::Milliseconds(250))) break;
    }
  };
  return std::make_unique<Impl::StreamTask>(impl_.get(), std::move(body));
}

std::unique_ptr<EtcdClient::Task> EtcdClient::WatchPrefix(
    absl::string_view prefix, int64_t start_revision,
    std::function<void(const EtcdEvent&)> on_event, std::function<void(absl::Status)> on_end) {
  auto body = [prefix = std::string(prefix), start_revision, on_event = std::move(on_event),
               on_end = std::move(on_end)](Impl* impl, Impl::StreamTask* task) {
    const size_t at = impl->current.load();
    std::shared_ptr<Impl::Conn> conn = impl->ConnOf(at);
    grpc::ClientContext ctx;
    if (!task->Use(&ctx)) return;
    auto stream = conn->watch->Watch(&ctx);
    etcdserverpb::WatchRequest req;
    auto* create = req.mutable_create_request();
    create->set_key(prefix);
    create->set_range_end(PrefixRangeEnd(prefix));
    create->set_start_revision(start_revision);
    absl::Status end;
    if (stream->Write(req)) {
      etcdserverpb::WatchResponse resp;
      while (stream->Read(&resp)) {
        if (resp.compact_revision() > 0) {
          end = absl::OutOfRangeError(absl::StrCat("etcd watch of ", Quoted(prefix),
                                                   " from revision ", start_revision,
                                                   ": compacted up to ", resp.compact_revision()));
          break;
        }
        if (resp.canceled()) {
          end = absl::UnavailableError(absl::StrCat("etcd canceled the watch of ", Quoted(prefix),
                                                    ": ", resp.cancel_reason()));
          break;
        }
        for (const auto& ev : resp.events()) {
          EtcdEvent out;
          out.type =
              ev.type() == mvccpb::Event::DELETE ? EtcdEvent::Type::kDelete : EtcdEvent::Type::kPut;
          out.kv = FromProto(ev.kv());
          on_event(out);
        }
      }
    }
    task->Use(nullptr);
    ctx.TryCancel();
    const grpc::Status st = stream->Finish();
    if (task->stopping()) return;
    if (end.ok()) {
      impl->Reconnect(at, conn);
      end = absl::UnavailableError(absl::StrCat("etcd watch of ", Quoted(prefix), " via ",
                                                conn->address, " ended: ", st.error_message()));
    }
    on_end(end);
  };
  return std::make_unique<Impl::StreamTask>(impl_.get(), std::move(body));
}

}  // namespace kvdn::daemon
