#include "kvdn/daemon/membership.h"

#include <algorithm>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/json_util.h"
#include "kvdn/common/mutex.h"
#include "kvdn/common/status.h"
#include "kvdn/v1/peer_service.pb.h"
#include "spdlog/spdlog.h"

namespace kvdn::daemon {
namespace {

bool ValidName(absl::string_view s, size_t max) {
  if (s.empty() || s.size() > max) return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-';
  });
}

bool EtcdDown(const absl::Status& st) {
  return absl::IsUnavailable(st) || absl::IsDeadlineExceeded(st);
}

}  // namespace

std::string MemberRecord::ToJson() const {
  v1::MemberRecord m;
  m.set_node(node);
  m.set_grpc_address(grpc_address);
  m.set_data_plane(data_plane);
  m.set_joined_unix_ms(absl::ToUnixMillis(joined));
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(m, &out);
  return out;
}

absl::StatusOr<MemberRecord> MemberRecord::FromJson(absl::string_view json) {
  v1::MemberRecord m;
  const auto st = google::protobuf::util::JsonStringToMessage(
      google::protobuf::StringPiece(json.data(), json.size()), &m);
  if (!st.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("member record is not valid JSON: ", st.message().as_string()));
  }
  if (m.node().empty()) return absl::InvalidArgumentError("member record has no node");
  return MemberRecord{m.node(), m.grpc_address(), m.data_plane(),
                      absl::FromUnixMillis(m.joined_unix_ms())};
}

struct Membership::Impl {
  MembershipOptions options;
  std::unique_ptr<EtcdClient> etcd;
  std::string prefix;
  std::string key;

  mutable Mutex mu;
  CondVar cv;
  std::map<std::string, MemberRecord> view ABSL_GUARDED_BY(mu);
  bool degraded ABSL_GUARDED_BY(mu) = false;
  bool stop ABSL_GUARDED_BY(mu) = false;
  bool need_register ABSL_GUARDED_BY(mu) = false;
  bool need_resync ABSL_GUARDED_BY(mu) = false;
  int64_t lease = 0;  // supervisor thread only (and Join, before it starts)
  std::unique_ptr<EtcdClient::Task> keepalive;  // supervisor thread only
  std::unique_ptr<EtcdClient::Task> watch;      // supervisor thread only
  std::thread supervisor;

  void Notify() {
    if (!options.on_change) return;
    std::map<std::string, MemberRecord> copy;
    {
      MutexLock lock(&mu);
      copy = view;
    }
    options.on_change(copy);
  }
  void Flag(bool Impl::*which) {
    MutexLock lock(&mu);
    this->*which = true;
    cv.SignalAll();
  }
  void SetDegraded(bool d) {
    MutexLock lock(&mu);
    if (degraded != d) {
      if (d) {
        spdlog::warn("membership: etcd {} unreachable; keeping the last view", etcd->endpoints());
      } else {
        spdlog::info("membership: etcd reachable again");
      }
    }
    degraded = d;
  }

  // A new lease, our record on it, and its keep-alive.
  absl::Status Register() {
    keepalive.reset();
    KVDN_ASSIGN_OR_RETURN(int64_t l, etcd->GrantLease(options.ttl));
    MemberRecord self = options.self;
    self.joined = absl::Now();
    if (absl::Status st = etcd->Put(key, self.ToJson(), l).status(); !st.ok()) {
      (void)etcd->RevokeLease(l);
      return st;
    }
    lease = l;
    keepalive = etcd->KeepAlive(l, [this](absl::Status st) {
      spdlog::warn("membership: {}; registering again", std::string(st.message()));
      Flag(&Impl::need_register);
    });
    return absl::OkStatus();
  }

  // Reads every member, replaces the view, and watches from there.
  absl::Status Resync() {
    watch.reset();
    int64_t revision = 0;
    KVDN_ASSIGN_OR_RETURN(std::vector<EtcdKeyValue> kvs, etcd->GetPrefix(prefix, &revision));
    std::map<std::string, MemberRecord> fresh;
    for (const EtcdKeyValue& kv : kvs) {
      auto r = MemberRecord::FromJson(kv.value);
      if (!r.ok()) {
        spdlog::warn("membership: ignoring {}: {}", kv.key, std::string(r.status().message()));
        continue;
      }
      fresh[kv.key.substr(prefix.size())] = *r;
    }
    {
      MutexLock lock(&mu);
      view = std::move(fresh);
    }
    Notify();
    watch = etcd->WatchPrefix(
        prefix, revision + 1, [this](const EtcdEvent& e) { OnEvent(e); },
        [this](absl::Status st) {
          spdlog::warn("membership: watch ended ({}); re-reading members",
                       std::string(st.message()));
          Flag(&Impl::need_resync);
        });
    return absl::OkStatus();
  }

  void OnEvent(const EtcdEvent& e) {
    const std::string node = e.kv.key.substr(prefix.size());
    {
      MutexLock lock(&mu);
      if (e.type == EtcdEvent::Type::kDelete) {
        view.erase(node);
      } else if (auto r = MemberRecord::FromJson(e.kv.value); r.ok()) {
        view[node] = *r;
      } else {
        spdlog::warn("membership: ignoring {}: {}", e.kv.key, std::string(r.status().message()));
        return;
      }
    }
    Notify();
  }

  // Re-registers / re-syncs when flagged; otherwise probes etcd every third of the TTL.
  void Supervise() {
    const absl::Duration probe = std::max(absl::Milliseconds(500), options.ttl / 3);
    for (;;) {
      bool reg = false, resync = false;
      {
        MutexLock lock(&mu);
        const absl::Time until = absl::Now() + probe;
        while (!stop && !need_register && !need_resync && absl::Now() < until) {
          cv.WaitWithTimeout(&mu, until - absl::Now());
        }
        if (stop) return;
        reg = need_register;
        resync = need_resync;
        need_register = need_resync = false;
      }
      absl::Status st;
      if (reg) st = Register();
      if (st.ok() && resync) st = Resync();
      if (!reg && !resync) {
        auto ttl = etcd->LeaseTimeToLive(lease);
        st = ttl.status();
        if (absl::IsNotFound(st)) {  // expired while we could not reach etcd
          spdlog::warn("membership: lease {} is gone; registering again", lease);
          reg = true;
          st = Register();
          if (st.ok()) st = Resync();
        }
      }
      SetDegraded(!st.ok() && EtcdDown(st));
      if (!st.ok()) {
        // Retry what failed at the next round.
        MutexLock lock(&mu);
        need_register = need_register || reg;
        need_resync = need_resync || resync;
        if (!EtcdDown(st)) spdlog::warn("membership: {}", std::string(st.message()));
      }
    }
  }
};

Membership::Membership(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Membership::~Membership() {
  {
    MutexLock lock(&impl_->mu);
    impl_->stop = true;
    impl_->cv.SignalAll();
  }
  impl_->supervisor.join();
  impl_->watch.reset();
  impl_->keepalive.reset();
  if (impl_->lease != 0) (void)impl_->etcd->RevokeLease(impl_->lease);
}

absl::StatusOr<std::unique_ptr<Membership>> Membership::Join(MembershipOptions options) {
  if (!ValidName(options.cluster, 63)) {
    return absl::InvalidArgumentError(absl::StrCat("cluster name \"", options.cluster,
                                                   "\" must be 1-63 characters of [A-Za-z0-9._-]"));
  }
  if (!ValidName(options.self.node, 253)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "node name \"", options.self.node, "\" must be 1-253 characters of [A-Za-z0-9._-]"));
  }
  if (options.ttl < absl::Seconds(2)) {
    return absl::InvalidArgumentError(
        absl::StrCat("membership ttl ", absl::FormatDuration(options.ttl), " is below 2 s"));
  }
  auto impl = std::make_unique<Impl>();
  KVDN_ASSIGN_OR_RETURN(impl->etcd, EtcdClient::Connect(options.etcd));
  impl->prefix = absl::StrCat("/kvdn/", options.cluster, "/members/");
  impl->key = impl->prefix + options.self.node;
  impl->options = std::move(options);
  // A live entry under our name from another address is another node: refuse. From our own
  // address it is this node's previous run (restarted within the TTL): replace it.
  KVDN_ASSIGN_OR_RETURN(auto existing, impl->etcd->Get(impl->key));
  if (existing.has_value()) {
    auto r = MemberRecord::FromJson(existing->value);
    if (r.ok() && r->grpc_address != impl->options.self.grpc_address) {
      return absl::AlreadyExistsError(absl::StrCat(
          "node name \"", impl->options.self.node, "\" is registered in cluster \"",
          impl->options.cluster, "\" by ", r->grpc_address, "; use another node_name"));
    }
  }
  KVDN_RETURN_IF_ERROR(impl->Register());
  if (absl::Status st = impl->Resync(); !st.ok()) {
    impl->keepalive.reset();
    (void)impl->etcd->RevokeLease(impl->lease);
    return st;
  }
  Impl* raw = impl.get();
  impl->supervisor = std::thread([raw] { raw->Supervise(); });
  return std::unique_ptr<Membership>(new Membership(std::move(impl)));
}

std::map<std::string, MemberRecord> Membership::Members() const {
  MutexLock lock(&impl_->mu);
  return impl_->view;
}

bool Membership::degraded() const {
  MutexLock lock(&impl_->mu);
  return impl_->degraded;
}

const std::string& Membership::prefix() const { return impl_->prefix; }

}  // namespace kvdn::daemon
