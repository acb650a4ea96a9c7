#include "kvdn/transfer/ucx_transport.h"

#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <future>
#include <optional>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kvdn/common/hash.h"
#include "kvdn/common/logging.h"
#include "kvdn/common/mutex.h"
#include "src/ucx_handles.h"

namespace kvdn::transfer {
namespace {

// Message types are AM ids below this bound (one handler slot each).
constexpr uint16_t kMaxTypes = 32;
// address() = magic + XXH3-64 of the rest + this process's pid and its progress thread's wake
// eventfd (int32 each, little-endian) + the UCX worker address. The checksum keeps bytes that are
// not one of our addresses (a foreign or corrupted descriptor) away from UCX, which would parse
// them unchecked. Version 1 (from older peers) had no pid and eventfd.
constexpr char kAddressMagic[8] = {'K', 'V', 'D', 'N', 'U', 'C', 'X', '2'};
constexpr char kAddressMagicV1[8] = {'K', 'V', 'D', 'N', 'U', 'C', 'X', '1'};
constexpr size_t kAddressPrefixV1 = sizeof(kAddressMagic) + 8;
constexpr size_t kAddressPrefix = kAddressPrefixV1 + 8;

// A same-host peer in another network namespace does not hear UCX's shared-memory wake-ups: UCX
// signals a sleeping receiver through an abstract unix socket, and those are per network
// namespace (a Kubernetes pod and a DaemonSet pod without hostNetwork, say). Its progress thread
// would notice our messages only when its poll times out (up to 100 ms each). For such a peer this
// returns a copy of its wake eventfd (pidfd_getfd: the ptrace access cma needs anyway), which we
// write after each message to it; -1 when not needed or not possible.
int CrossNamespaceWakeFd(int pid, int remote_fd) {
  if (pid <= 0 || remote_fd < 0) return -1;
  const uint64_t mine = NamespaceId("self", "net");
  const uint64_t theirs = NamespaceId(std::to_string(pid), "net");
  if (mine == 0 || theirs == 0 || mine == theirs) return -1;
  const int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) return -1;
  const int fd = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, remote_fd, 0));
  close(pidfd);
  return fd;
}

// UCX_TLS names UCX 1.13 knows (with its aliases), so a typo fails at Create, naming itself.
// Transports that stay on this host.
bool HostOnly(absl::string_view t) {
  static const absl::flat_hash_set<absl::string_view> kLocal = {
      "self", "sm", "shm", "mm", "posix", "sysv", "cma", "knem", "xpmem"};
  return kLocal.contains(t);
}

bool KnownTransport(absl::string_view t) {
  static const absl::flat_hash_set<absl::string_view> kKnown = {
      "all",     "self", "tcp",       "sm",       "shm",      "mm",      "posix",     "sysv",
      "cma",     "knem", "xpmem",     "ib",       "rc",       "rc_v",    "rc_x",      "rc_verbs",
      "rc_mlx5", "ud",   "ud_v",      "ud_x",     "ud_verbs", "ud_mlx5", "dc",        "dc_x",
      "dc_mlx5", "cuda", "cuda_copy", "cuda_ipc", "gdr_copy", "rocm",    "rocm_copy", "rocm_ipc"};
  return kKnown.contains(t);
}

// A payload waiting at the receiver: UCX's descriptor (rendezvous or persistent eager data).
struct PendingPayload {
  void* data = nullptr;  // UCX's descriptor (rendezvous) or persistent eager data, to release
  size_t length = 0;
  bool rndv = false;
  std::string copy;  // transient eager data, copied in the callback
  ucp_ep_h reply_ep = nullptr;
};

}  // namespace

struct UcxTransport::Impl : std::enable_shared_from_this<UcxTransport::Impl> {
  // One Send or Receive in flight.
  struct Op {
    Impl* impl = nullptr;
    DoneCallback done;
    absl::Time deadline;
    ucp_ep_h ep = nullptr;  // to close if cancelling does not end it
    void* request = nullptr;
    std::string header;  // a send's header, alive until the send ends
    bool timed_out = false;
    bool abandoned = false;  // done already called; UCX may still complete the request
    bool warned = false;
    absl::Time cancelled_at;
  };
  struct Peer {
    ucp_ep_h ep = nullptr;
    uint32_t generation = 1;
    bool live = false;
    int pid = 0;       // ConnectOptions::peer_pid
    int wake_fd = -1;  // the peer's wake eventfd, when it needs us to write it (see above)
  };
  struct HandlerSlot {
    Impl* impl = nullptr;
    uint16_t type = 0;
  };

  // Constant after construction.
  UcxTransportOptions options;
  ucx::Context context;
  ucx::Worker worker;
  std::string address;
  size_t max_header = 0;
  TransportCaps caps;
  std::vector<std::string> resources;  // "tl/device" UCX may use
  std::vector<std::string> settings;   // kvdn's UCX settings given to it ("UCX_TCP_...=256K")
  bool peer_errors = true;             // UCP_ERR_HANDLING_MODE_PEER on every connection
  int worker_fd = -1;
  int wake_fd = -1;
  std::array<HandlerSlot, kMaxTypes> slots;

  // Tasks posted to the progress thread.
  Mutex mu;
  std::deque<absl::AnyInvocable<void() &&>> tasks ABSL_GUARDED_BY(mu);
  std::atomic<bool> sleeping{false};
  std::atomic<bool> stop{false};
  std::thread thread;
  std::atomic<std::thread::id> thread_id;

  // Owned by the progress thread.
  std::array<MessageHandler, kMaxTypes> handlers;
  PeerFailureHandler on_peer_failure;
  std::vector<Peer> peers;  // slot index = low 32 bits of PeerId (from 1)
  std::vector<uint32_t> free_slots;
  absl::flat_hash_map<ucp_ep_h, uint32_t> slot_by_ep;
  int cross_ns_peers = 0;         // peers with a wake_fd
  std::vector<ucp_ep_h> touched;  // see Touch
  absl::flat_hash_set<Op*> in_flight;
  std::vector<void*> closing;  // ucp_ep_close_nbx requests not yet done
  bool stopping = false;

  ~Impl() {
    if (wake_fd >= 0) close(wake_fd);
  }

  bool OnProgressThread() const { return std::this_thread::get_id() == thread_id.load(); }

  // Runs fn on the progress thread, later (never inline: UCX callbacks post work that must run
  // after they return).
  void Post(absl::AnyInvocable<void() &&> fn) {
    {
      MutexLock lock(&mu);
      tasks.push_back(std::move(fn));
    }
    if (sleeping.load() && !OnProgressThread()) {
      const uint64_t one = 1;
      (void)!write(wake_fd, &one, sizeof(one));
    }
  }

  // Runs fn on the progress thread and waits for it (inline when already there).
  template <typename F>
  auto RunSync(F fn) -> decltype(fn()) {
    if (OnProgressThread()) return fn();
    std::promise<decltype(fn())> p;
    auto f = p.get_future();
    Post([&p, &fn]() mutable { p.set_value(fn()); });
    return f.get();
  }

  bool RunTasks() {
    std::deque<absl::AnyInvocable<void() &&>> batch;
    {
      MutexLock lock(&mu);
      batch.swap(tasks);
    }
    for (auto& t : batch) std::move(t)();
    return !batch.empty();
  }

  // ---- peers ----

  PeerId IdOf(uint32_t slot) const {
    return (static_cast<uint64_t>(peers[slot].generation) << 32) | slot;
  }
  Peer* Find(PeerId id) {
    const auto slot = static_cast<uint32_t>(id & 0xffffffffu);
    if (slot == 0 || slot >= peers.size()) return nullptr;
    Peer& p = peers[slot];
    if (!p.live || p.generation != static_cast<uint32_t>(id >> 32)) return nullptr;
    return &p;
  }

  // Cross-namespace peers (Peer::wake_fd) hear nothing UCX itself sends them (rendezvous
  // requests and acks go out inside ucp_worker_progress and request starts): after each such
  // step the endpoints it involved are written. `touched` collects them; only kept while a
  // cross-namespace peer exists.
  void Touch(ucp_ep_h ep) {
    if (cross_ns_peers > 0 && ep != nullptr) touched.push_back(ep);
  }
  void WakeTouched() {
    if (touched.empty()) return;
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (ucp_ep_h ep : touched) {
      auto it = slot_by_ep.find(ep);
      if (it == slot_by_ep.end()) continue;
      const int fd = peers[it->second].wake_fd;
      if (fd < 0) continue;
      const uint64_t one = 1;
      (void)!write(fd, &one, sizeof(one));
    }
    touched.clear();
  }

  void CloseEp(ucp_ep_h ep, bool force) {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    void* req = ucp_ep_close_nbx(ep, &param);
    if (req != nullptr && UCS_PTR_IS_PTR(req)) closing.push_back(req);
  }

  // Makes the peer's id stale and closes its endpoint.
  void DropPeer(uint32_t slot, bool force) {
    Peer& p = peers[slot];
    if (!p.live) return;
    p.live = false;
    ++p.generation;
    slot_by_ep.erase(p.ep);
    CloseEp(p.ep, force);
    p.ep = nullptr;
    if (p.wake_fd >= 0) {
      close(p.wake_fd);
      --cross_ns_peers;
    }
    p.wake_fd = -1;
    free_slots.push_back(slot);
  }

  static void OnEpError(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* self = static_cast<Impl*>(arg);
    auto it = self->slot_by_ep.find(ep);
    if (it == self->slot_by_ep.end()) return;
    const uint32_t slot = it->second;
    const PeerId id = self->IdOf(slot);
    self->DropPeer(slot, /*force=*/true);
    const absl::Status st = ucx::FromUcs(status, "peer connection failed");
    spdlog::warn("ucx {}: peer {:#x} failed: {}", self->options.name, id, st.ToString());
    if (self->on_peer_failure) self->on_peer_failure(id, absl::UnavailableError(st.message()));
  }

  absl::StatusOr<PeerId> ConnectOnThread(const std::string& ucx_address, int pid,
                                         int peer_wake_fd) {
    if (stopping) {
      if (peer_wake_fd >= 0) close(peer_wake_fd);
      return absl::UnavailableError("transport is shutting down");
    }
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                        UCP_EP_PARAM_FIELD_ERR_HANDLER;
    params.address = reinterpret_cast<const ucp_address_t*>(ucx_address.data());
    params.err_mode = peer_errors ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    params.err_handler.cb = &Impl::OnEpError;
    params.err_handler.arg = this;
    ucp_ep_h ep = nullptr;
    const ucs_status_t st = ucp_ep_create(worker.get(), &params, &ep);
    if (st != UCS_OK) {
      if (peer_wake_fd >= 0) close(peer_wake_fd);
      return ucx::FromUcs(st, "ucp_ep_create");
    }
    uint32_t slot;
    if (!free_slots.empty()) {
      slot = free_slots.back();
      free_slots.pop_back();
    } else {
      if (peers.empty()) peers.emplace_back();  // slot 0 is never used: PeerId 0 means none
      slot = static_cast<uint32_t>(peers.size());
      peers.emplace_back();
    }
    peers[slot].ep = ep;
    peers[slot].live = true;
    peers[slot].pid = pid;
    peers[slot].wake_fd = peer_wake_fd;
    if (peer_wake_fd >= 0) ++cross_ns_peers;
    slot_by_ep[ep] = slot;
    return IdOf(slot);
  }

  // ---- operations ----

  void Finish(Op* op, absl::Status st) {
    Touch(op->ep);
    if (op->abandoned) {  // its done ran when it was abandoned
      delete op;
      return;
    }
    in_flight.erase(op);
    if (!st.ok() && op->timed_out) {
      st = absl::DeadlineExceededError(
          absl::StrCat("transfer passed its deadline and was cancelled (", st.message(), ")"));
    }
    DoneCallback done = std::move(op->done);
    delete op;
    std::move(done)(std::move(st));
  }

  // A posted operation's first result: done now, failed now, or in flight.
  void Started(Op* op, ucs_status_ptr_t r, absl::string_view what) {
    if (r == nullptr) return Finish(op, absl::OkStatus());
    if (UCS_PTR_IS_ERR(r)) return Finish(op, ucx::FromUcs(UCS_PTR_STATUS(r), what));
    op->request = r;  // its callback runs from a later ucp_worker_progress
  }

  static void OnSendDone(void* request, ucs_status_t status, void* user_data) {
    auto* op = static_cast<Op*>(user_data);
    ucp_request_free(request);
    op->impl->Finish(op, ucx::FromUcs(status, "send"));
  }
  static void OnRecvDone(void* request, ucs_status_t status, size_t, void* user_data) {
    auto* op = static_cast<Op*>(user_data);
    ucp_request_free(request);
    op->impl->Finish(op, ucx::FromUcs(status, "receive"));
  }

  void SendOnThread(PeerId peer, uint16_t type, std::string header, ByteSpan payload,
                    const ucx::MemHandle* memh, absl::Time deadline, DoneCallback done) {
    auto* op = new Op{this, std::move(done), deadline};
    op->header = std::move(header);
    in_flight.insert(op);
    if (stopping) return Finish(op, absl::UnavailableError("transport is shutting down"));
    Peer* p = Find(peer);
    if (p == nullptr) {
      return Finish(op, absl::NotFoundError(absl::StrCat("no peer ", absl::Hex(peer),
                                                         " (disconnected, failed or never made)")));
    }
    op->ep = p->ep;
    ucp_request_param_t param{};
    param.op_attr_mask =
        UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    param.cb.send = &Impl::OnSendDone;
    param.user_data = op;
    param.flags = UCP_AM_SEND_FLAG_REPLY;
    if (memh != nullptr) {
      param.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
      param.memh = memh->get();
    }
    Touch(p->ep);
    Started(op,
            ucp_am_send_nbx(p->ep, type, op->header.data(), op->header.size(), payload.data(),
                            payload.size(), &param),
            "ucp_am_send_nbx");
    WakeTouched();
  }

  void ReceiveOnThread(PendingPayload* pl, MutableByteSpan dst, const ucx::MemHandle* memh,
                       absl::Time deadline, DoneCallback done) {
    std::unique_ptr<PendingPayload> owned(pl);
    auto* op = new Op{this, std::move(done), deadline};
    op->ep = pl->reply_ep;
    in_flight.insert(op);
    if (!pl->rndv) {
      // Eager: the bytes are here already (persistent data), one copy.
      const void* src = pl->data != nullptr ? pl->data : pl->copy.data();
      if (pl->length > 0) std::memcpy(dst.data(), src, pl->length);
      if (pl->data != nullptr) ucp_am_data_release(worker.get(), pl->data);
      return Finish(op, absl::OkStatus());
    }
    if (stopping) {
      ucp_am_data_release(worker.get(), pl->data);
      return Finish(op, absl::UnavailableError("transport is shutting down"));
    }
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    param.cb.recv_am = &Impl::OnRecvDone;
    param.user_data = op;
    if (memh != nullptr) {
      param.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
      param.memh = memh->get();
    }
    Touch(pl->reply_ep);
    Started(op, ucp_am_recv_data_nbx(worker.get(), pl->data, dst.data(), dst.size(), &param),
            "ucp_am_recv_data_nbx");
    WakeTouched();
  }

  static ucs_status_t OnMessage(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param) {
    auto* slot = static_cast<HandlerSlot*>(arg);
    Impl* self = slot->impl;
    const bool keep =
        (param->recv_attr & (UCP_AM_RECV_ATTR_FLAG_DATA | UCP_AM_RECV_ATTR_FLAG_RNDV)) != 0;
    const MessageHandler& handler = self->handlers[slot->type];
    if (!handler || self->stopping) return UCS_OK;  // UCX drops the payload
    auto pl = std::make_unique<PendingPayload>();
    pl->length = length;
    pl->rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    if (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) pl->reply_ep = param->reply_ep;
    if (keep) {
      pl->data = data;
    } else if (length > 0) {
      // Transient eager data (not expected: handlers ask for persistent data): copy it now.
      pl->copy.assign(static_cast<const char*>(data), length);
    }
    PeerId peer = 0;
    if (pl->reply_ep != nullptr) {
      auto it = self->slot_by_ep.find(pl->reply_ep);
      if (it != self->slot_by_ep.end()) peer = self->IdOf(it->second);
    }
    PendingPayload* raw = pl.release();
    std::weak_ptr<Impl> weak = self->weak_from_this();
    auto incoming = std::make_unique<Incoming>(
        peer, slot->type, std::string(static_cast<const char*>(header), header_length), length,
        [weak, raw] {
          std::shared_ptr<Impl> impl = weak.lock();
          if (!impl) {
            delete raw;
            return;
          }
          impl->Post([impl, raw] {
            if (raw->data != nullptr) ucp_am_data_release(impl->worker.get(), raw->data);
            delete raw;
          });
        });
    incoming->transport_data = raw;
    handler(std::move(incoming));
    return keep ? UCS_INPROGRESS : UCS_OK;
  }

  // Cancels operations past their deadline. Those a cancel did not end within the grace: with
  // peer error handling, their connection is closed (which ends them); without, they are abandoned
  // once the peer's process is gone (nobody can touch their memory then).
  void CheckDeadlines() {
    const absl::Time now = absl::Now();
    std::vector<ucp_ep_h> to_close;
    std::vector<Op*> to_abandon;
    for (Op* op : in_flight) {
      if (op->request == nullptr || now < op->deadline) continue;
      if (!op->timed_out) {
        op->timed_out = true;
        op->cancelled_at = now;
        ucp_request_cancel(worker.get(), op->request);
        continue;
      }
      if (now - op->cancelled_at <= options.cancel_grace || op->ep == nullptr) continue;
      if (peer_errors) {
        to_close.push_back(op->ep);
        op->ep = nullptr;
        continue;
      }
      auto it = slot_by_ep.find(op->ep);
      const int pid = it == slot_by_ep.end() ? 0 : peers[it->second].pid;
      if (pid != 0 && !ProcessAlive(pid)) {
        to_abandon.push_back(op);
      } else if (!op->warned) {
        op->warned = true;
        spdlog::warn(
            "ucx {}: a transfer is stuck past its deadline and its peer (pid {}) lives: "
            "holding its memory until it ends",
            options.name, pid);
      }
    }
    for (Op* op : to_abandon) {
      auto it = slot_by_ep.find(op->ep);
      if (it != slot_by_ep.end()) AbandonPeer(it->second);  // and every other op of its peer
    }
    for (ucp_ep_h ep : to_close) {
      auto it = slot_by_ep.find(ep);
      if (it != slot_by_ep.end()) {
        const uint32_t slot = it->second;
        const PeerId id = IdOf(slot);
        DropPeer(slot, /*force=*/true);
        if (on_peer_failure) {
          on_peer_failure(id, absl::UnavailableError("a transfer did not end after cancelling"));
        }
      } else {
        CloseEp(ep, /*force=*/true);  // the peer's side of a connection we did not make
      }
    }
  }

  // For a same-host peer whose process is gone (shared memory has no failure detection): ends
  // its operations in flight with UNAVAILABLE (nobody can touch their memory any more), closes
  // its endpoint with force and reports the failure.
  void AbandonPeer(uint32_t slot) {
    const ucp_ep_h ep = peers[slot].ep;
    const int pid = peers[slot].pid;
    const PeerId id = IdOf(slot);
    std::vector<Op*> ops;
    for (Op* op : in_flight) {
      if (op->ep == ep && op->request != nullptr) ops.push_back(op);
    }
    // Abandoned before the close, so a completion the close may report finds them so (Finish).
    for (Op* op : ops) {
      in_flight.erase(op);
      op->abandoned = true;
      DoneCallback done = std::move(op->done);
      std::move(done)(absl::UnavailableError(
          absl::StrCat("peer process ", pid, " exited with the transfer in flight")));
    }
    DropPeer(slot, /*force=*/true);  // the peer is gone: nothing on its side to upset
    if (on_peer_failure) on_peer_failure(id, absl::UnavailableError("peer process exited"));
  }

  void ReapClosing() {
    auto done = [](void* req) {
      if (ucp_request_check_status(req) == UCS_INPROGRESS) return false;
      ucp_request_free(req);
      return true;
    };
    closing.erase(std::remove_if(closing.begin(), closing.end(), done), closing.end());
  }

  void Loop() {
    thread_id.store(std::this_thread::get_id());
    absl::Time spin_until = absl::Now();
    absl::Time next_check = absl::Now();
    while (!stop.load()) {
      bool worked = false;
      while (ucp_worker_progress(worker.get()) != 0) worked = true;
      if (worked && cross_ns_peers > 0) {
        // Progress may have sent protocol messages to any peer with a transfer in flight.
        for (Op* op : in_flight) Touch(op->ep);
      }
      WakeTouched();
      worked |= RunTasks();
      const absl::Time now = absl::Now();
      if (now >= next_check) {
        CheckDeadlines();
        ReapClosing();
        next_check = now + absl::Milliseconds(10);
      }
      if (worked) {
        spin_until = now + options.poll_before_sleep;
        continue;
      }
      if (now < spin_until) {
        // Let a thread with work have the core: with more progress threads than cores (4 clients
        // and kvdnd on 2 cores), spinning without yielding took the CPU from the copies
        // (transfer-2026-12-01-yield.md: shm 4 MiB Get x4 17.5 -> 30.5-32.9 GB/s).
        std::this_thread::yield();
        continue;
      }
      // Sleep until the worker has events, a task is posted, or the next deadline check.
      sleeping.store(true);
      bool have_tasks;
      {
        MutexLock lock(&mu);
        have_tasks = !tasks.empty();
      }
      if (!have_tasks && ucp_worker_arm(worker.get()) == UCS_OK) {
        pollfd fds[2] = {{worker_fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
        const int timeout_ms = in_flight.empty() && closing.empty() ? 100 : 10;
        (void)poll(fds, 2, timeout_ms);
        if (fds[1].revents & POLLIN) {
          uint64_t v;
          (void)!read(wake_fd, &v, sizeof(v));
        }
      }
      sleeping.store(false);
    }
    Shutdown();
  }

  // On the progress thread, at the end: fails what is in flight, closes every connection.
  void Shutdown() {
    stopping = true;
    RunTasks();
    // Without peer error handling a forced close is undefined for UCX: flush instead (bounded
    // below).
    for (uint32_t s = 1; s < peers.size(); ++s) DropPeer(s, /*force=*/peer_errors);
    for (Op* op : in_flight) {
      if (op->request != nullptr) ucp_request_cancel(worker.get(), op->request);
    }
    const absl::Time give_up = absl::Now() + absl::Seconds(2);
    while ((!closing.empty() || !in_flight.empty()) && absl::Now() < give_up) {
      ucp_worker_progress(worker.get());
      RunTasks();
      ReapClosing();
    }
    RunTasks();
    if (!in_flight.empty()) {
      spdlog::warn("ucx {}: {} transfers did not end at shutdown", options.name, in_flight.size());
    }
    thread_id.store(std::thread::id());
  }
};

namespace {

// Unmaps on the progress thread (every UCX call happens there).
class UcxRegion final : public MemoryRegion {
 public:
  UcxRegion(std::shared_ptr<UcxTransport::Impl> impl, uint8_t* base, size_t size, ucp_mem_h memh)
      : MemoryRegion(base, size), impl_(std::move(impl)) {
    memh_.emplace(impl_->context.get(), memh);
  }
  ~UcxRegion() override {
    impl_->RunSync([this] {
      memh_.reset();
      return 0;
    });
  }
  const ucx::MemHandle* memh() const { return &*memh_; }

 private:
  std::shared_ptr<UcxTransport::Impl> impl_;
  std::optional<ucx::MemHandle> memh_;
};

const ucx::MemHandle* MemhOf(const MemoryRegion* region) {
  if (region == nullptr) return nullptr;
  return static_cast<const UcxRegion*>(region)->memh();
}

// A setting kvdn gives UCX: its environment variable, the name ucp_config_modify takes (a UCT
// transport's setting goes without its transport's prefix: "RX_SEG_SIZE", which UCX applies to
// every transport that has it; "TCP_RX_SEG_SIZE" only draws a warning), and the value.
struct TunedSetting {
  const char* env;
  const char* key;
  const char* value;
  bool tcp = false;  // a setting of UCX's tcp transport: given only where tcp may be used (UCX
                     // warns at each worker of a context that has no transport for a setting)
};

constexpr TunedSetting kTunedSettings[] = {
    // Detect a dead peer on shared memory in seconds, not UCX's default 20 s.
    {"UCX_KEEPALIVE_INTERVAL", "KEEPALIVE_INTERVAL", "2s"},
    // tcp reads into receive segments of 256 KiB, not 64 KiB (tcp is the only transport of UCX
    // 1.13 with this setting): one client's 4 MiB transfers over loopback went from ~4 to ~6 GB/s
    // on the 2-core VM; 512 KiB and 1 MiB were no better overall there
    // (bench/results/transfer-2026-12-02-tcp-seg.md).
    {"UCX_TCP_RX_SEG_SIZE", "RX_SEG_SIZE", "256K", /*tcp=*/true},
};

// Whether a context with UCX_TLS `tls` ("" for UCX's default, all) may use tcp: a list that names
// tcp or all, or a negated list ("^...") that does not name tcp.
bool MayUseTcp(absl::string_view tls) {
  const bool negated = absl::ConsumePrefix(&tls, "^");
  bool named = false, all = tls.empty();
  for (absl::string_view t : absl::StrSplit(tls, ',')) {
    named |= t == "tcp";
    all |= t == "all";
  }
  return negated ? !named : named || all;
}

}  // namespace

std::vector<std::string> UcxTunedSettings() {
  std::vector<std::string> out;
  for (const TunedSetting& t : kTunedSettings) {
    if (std::getenv(t.env) == nullptr) out.push_back(absl::StrCat(t.env, "=", t.value));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<UcxTransport>> UcxTransport::Create(
    const UcxTransportOptions& options) {
  if (!options.transports.empty()) {
    for (absl::string_view t : absl::StrSplit(options.transports, ',')) {
      if (!t.empty() && t.front() == '^') t.remove_prefix(1);
      if (!KnownTransport(t)) {
        return absl::InvalidArgumentError(
            absl::StrCat("transports: unknown UCX transport '", t, "' in '", options.transports,
                         "' (use UCX_TLS names: tcp, posix, sysv, cma, rc, ud, dc, cuda_ipc...)"));
      }
    }
  }
  auto impl = std::make_shared<Impl>();
  impl->options = options;
  ucp_config_t* raw_config = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &raw_config);
  if (st != UCS_OK) return ucx::FromUcs(st, "ucp_config_read");
  ucx::Config config(raw_config);
  if (!options.transports.empty()) {
    st = ucp_config_modify(config.get(), "TLS", options.transports.c_str());
    if (st != UCS_OK) return ucx::FromUcs(st, "transports");
  }
  // kvdn's settings where the environment (read above) names none.
  const char* env_tls = std::getenv("UCX_TLS");
  const bool tcp = MayUseTcp(!options.transports.empty() ? options.transports
                             : env_tls != nullptr        ? env_tls
                                                         : "");
  for (const TunedSetting& t : kTunedSettings) {
    if (std::getenv(t.env) != nullptr || (t.tcp && !tcp)) continue;
    st = ucp_config_modify(config.get(), t.key, t.value);
    if (st != UCS_OK) return ucx::FromUcs(st, absl::StrCat("ucp_config_modify ", t.key));
    impl->settings.push_back(absl::StrCat(t.env, "=", t.value));
  }

  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  if (!options.transports.empty()) {
    impl->peer_errors = false;
    for (absl::string_view t : absl::StrSplit(options.transports, ',')) {
      if (!HostOnly(t)) impl->peer_errors = true;
    }
  }
  params.name = options.name.c_str();
  ucp_context_h context = nullptr;
  st = ucp_init(&params, config.get(), &context);
  if (st != UCS_OK) {
    return absl::UnavailableError(absl::StrCat("UCX found no usable transport (transports '",
                                               options.transports, "'): ", ucs_status_string(st)));
  }
  impl->context.reset(context);

  // The resources UCX may use, from its own report.
  {
    char* buf = nullptr;
    size_t len = 0;
    FILE* f = open_memstream(&buf, &len);
    if (f != nullptr) {
      ucp_context_print_info(context, f);
      std::fclose(f);
      for (absl::string_view line : absl::StrSplit(absl::string_view(buf, len), '\n')) {
        if (!absl::StrContains(line, "resource") || !absl::StrContains(line, "flags")) continue;
        const size_t at = line.rfind(' ');
        if (at == absl::string_view::npos) continue;
        std::string r(line.substr(at + 1));
        const std::string tl = r.substr(0, r.find('/'));
        if (tl == "self") continue;
        if (tl == "tcp" || absl::StartsWith(tl, "rc") || absl::StartsWith(tl, "ud") ||
            absl::StartsWith(tl, "dc")) {
          impl->caps.remote = true;
        }
        if (absl::StartsWith(tl, "rc") || absl::StartsWith(tl, "dc")) impl->caps.one_sided = true;
        if (absl::StartsWith(tl, "cuda") || tl == "gdr_copy") impl->caps.gpu_memory = true;
        impl->resources.push_back(std::move(r));
      }
      std::free(buf);
    }
  }
  if (impl->resources.empty()) {
    return absl::UnavailableError(absl::StrCat("UCX transports '", options.transports,
                                               "' offer no device to reach another process"));
  }

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  ucp_worker_h worker = nullptr;
  st = ucp_worker_create(context, &wp, &worker);
  if (st != UCS_OK) return ucx::FromUcs(st, "ucp_worker_create");
  impl->worker.reset(worker);

  ucp_worker_attr_t attr{};
  attr.field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER;
  st = ucp_worker_query(worker, &attr);
  if (st != UCS_OK) return ucx::FromUcs(st, "ucp_worker_query");
  impl->max_header = attr.max_am_header;

  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;
  st = ucp_worker_get_address(worker, &addr, &addr_len);
  if (st != UCS_OK) return ucx::FromUcs(st, "ucp_worker_get_address");
  {
    ucx::WorkerAddress owned(worker, addr, addr_len);
    impl->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (impl->wake_fd < 0) return absl::InternalError("eventfd failed");
    uint8_t ids[8];
    StoreLe<int32_t>(ids, static_cast<int32_t>(getpid()));
    StoreLe<int32_t>(ids + 4, impl->wake_fd);
    std::string rest(reinterpret_cast<const char*>(ids), sizeof(ids));
    rest.append(owned.bytes().data(), owned.bytes().size());
    const uint64_t sum = Xxh3_64(AsBytes(rest));
    impl->address.assign(kAddressMagic, sizeof(kAddressMagic));
    impl->address.append(reinterpret_cast<const char*>(&sum), sizeof(sum));
    impl->address.append(rest);
  }

  st = ucp_worker_get_efd(worker, &impl->worker_fd);
  if (st != UCS_OK) return ucx::FromUcs(st, "ucp_worker_get_efd");

  for (uint16_t t = 0; t < kMaxTypes; ++t) {
    impl->slots[t] = Impl::HandlerSlot{impl.get(), t};
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                    UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    hp.id = t;
    hp.flags = UCP_AM_FLAG_WHOLE_MSG | UCP_AM_FLAG_PERSISTENT_DATA;
    hp.cb = &Impl::OnMessage;
    hp.arg = &impl->slots[t];
    st = ucp_worker_set_am_recv_handler(worker, &hp);
    if (st != UCS_OK) return ucx::FromUcs(st, "ucp_worker_set_am_recv_handler");
  }

  impl->thread = std::thread([raw = impl.get()] { raw->Loop(); });
  while (impl->thread_id.load() == std::thread::id()) std::this_thread::yield();
  return std::unique_ptr<UcxTransport>(new UcxTransport(std::move(impl)));
}

UcxTransport::UcxTransport(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

UcxTransport::~UcxTransport() {
  impl_->stop.store(true);
  const uint64_t one = 1;
  (void)!write(impl_->wake_fd, &one, sizeof(one));
  impl_->thread.join();
}

TransportCaps UcxTransport::caps() const { return impl_->caps; }
std::string UcxTransport::address() const { return impl_->address; }
size_t UcxTransport::max_header_bytes() const { return impl_->max_header; }

std::string UcxTransport::Describe() const {
  std::string out = absl::StrCat(
      "ucx ", impl_->options.transports.empty() ? "tls=auto" : "tls=" + impl_->options.transports,
      " devices=", absl::StrJoin(impl_->resources, ","));
  if (!impl_->settings.empty())
    absl::StrAppend(&out, " settings=", absl::StrJoin(impl_->settings, ","));
  // What each connection uses: the transports of its lanes, from UCX's own report.
  std::vector<std::string> lanes = impl_->RunSync([this] {
    std::vector<std::string> per_peer;
    for (const Impl::Peer& p : impl_->peers) {
      if (!p.live) continue;
      char* buf = nullptr;
      size_t len = 0;
      FILE* f = open_memstream(&buf, &len);
      if (f == nullptr) continue;
      ucp_ep_print_info(p.ep, f);
      std::fclose(f);
      std::vector<std::string> tls;
      for (absl::string_view line : absl::StrSplit(absl::string_view(buf, len), '\n')) {
        const size_t lane = line.find("lane[");
        if (lane == absl::string_view::npos) continue;
        const size_t colon = line.find(':', lane);
        if (colon == absl::string_view::npos) continue;
        absl::string_view rest = absl::StripLeadingAsciiWhitespace(line.substr(colon + 1));
        const size_t c2 = rest.find(':');
        rest = rest.substr(c2 == absl::string_view::npos ? 0 : c2 + 1);
        std::string tl(rest.substr(0, rest.find_first_of(" .")));
        if (std::find(tls.begin(), tls.end(), tl) == tls.end()) tls.push_back(tl);
      }
      std::free(buf);
      // A peer in another network namespace, woken through its eventfd.
      per_peer.push_back(
          absl::StrCat(absl::StrJoin(tls, "+"), p.wake_fd >= 0 ? "(netns-wake)" : ""));
    }
    return per_peer;
  });
  if (!lanes.empty()) absl::StrAppend(&out, " peers=[", absl::StrJoin(lanes, " "), "]");
  return out;
}

void UcxTransport::SetHandler(uint16_t type, MessageHandler handler) {
  if (type >= kMaxTypes) {
    spdlog::error("ucx {}: message type {} >= {} ignored", impl_->options.name, type, kMaxTypes);
    return;
  }
  impl_->RunSync([&] {
    impl_->handlers[type] = std::move(handler);
    return 0;
  });
}

void UcxTransport::SetPeerFailureHandler(PeerFailureHandler handler) {
  impl_->RunSync([&] {
    impl_->on_peer_failure = std::move(handler);
    return 0;
  });
}

bool UcxTransport::detects_peer_failure() const { return impl_->peer_errors; }

uint64_t NamespaceId(const std::string& pid, const char* kind) {
  struct stat st {};
  const std::string path = absl::StrCat("/proc/", pid, "/ns/", kind);
  return stat(path.c_str(), &st) == 0 ? st.st_ino : 0;
}

bool ProcessAlive(int pid) {
  if (pid <= 0 || (kill(pid, 0) != 0 && errno != EPERM)) return false;
  // A zombie (exited, not yet waited for by its parent) still answers kill(pid, 0): read its
  // state, the field after the command name's closing parenthesis in /proc/<pid>/stat.
  FILE* f = std::fopen(absl::StrCat("/proc/", pid, "/stat").c_str(), "r");
  if (f == nullptr) return true;  // no /proc: kill's answer stands
  char buf[512];
  const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = '\0';
  const char* paren = std::strrchr(buf, ')');
  if (paren == nullptr || paren[1] != ' ') return true;
  return paren[2] != 'Z' && paren[2] != 'X';
}

absl::StatusOr<PeerId> UcxTransport::Connect(absl::string_view address,
                                             const ConnectOptions& options) {
  const bool v1 = address.size() > kAddressPrefixV1 &&
                  std::memcmp(address.data(), kAddressMagicV1, sizeof(kAddressMagicV1)) == 0;
  if (!v1 && (address.size() <= kAddressPrefix ||
              std::memcmp(address.data(), kAddressMagic, sizeof(kAddressMagic)) != 0)) {
    return absl::InvalidArgumentError(absl::StrCat("not a kvdn UCX address (", address.size(),
                                                   " bytes without the KVDNUCX2 prefix)"));
  }
  uint64_t sum;
  std::memcpy(&sum, address.data() + sizeof(kAddressMagic), sizeof(sum));
  const absl::string_view rest = address.substr(kAddressPrefixV1);
  if (Xxh3_64(AsBytes(rest)) != sum) {
    return absl::InvalidArgumentError("UCX address fails its checksum (corrupted or truncated)");
  }
  if (impl_->OnProgressThread()) {
    return absl::FailedPreconditionError("Connect called on the transport's progress thread");
  }
  int wake_fd = -1;
  if (!v1) {
    const auto* ids = reinterpret_cast<const uint8_t*>(rest.data());
    const int32_t pid = LoadLe<int32_t>(ids);
    // Only for the process the caller vouches for (its pid came with the session).
    if (options.peer_pid > 0 && pid == options.peer_pid) {
      wake_fd = CrossNamespaceWakeFd(pid, LoadLe<int32_t>(ids + 4));
    }
  }
  const std::string copy(rest.substr(v1 ? 0 : 8));
  return impl_->RunSync([&] { return impl_->ConnectOnThread(copy, options.peer_pid, wake_fd); });
}

void UcxTransport::Disconnect(PeerId peer) {
  impl_->Post([impl = impl_.get(), peer] {
    const auto* p = impl->Find(peer);
    if (p == nullptr) return;
    const auto slot = static_cast<uint32_t>(peer & 0xffffffffu);
    if (p->pid != 0 && !ProcessAlive(p->pid)) {
      impl->AbandonPeer(slot);  // a graceful close would wait on it forever
    } else {
      impl->DropPeer(slot, /*force=*/false);
    }
  });
}

absl::StatusOr<std::unique_ptr<MemoryRegion>> UcxTransport::Register(void* base, size_t size) {
  if (base == nullptr || size == 0) {
    return absl::InvalidArgumentError("Register needs a non-empty range");
  }
  auto memh = impl_->RunSync([&]() -> absl::StatusOr<ucp_mem_h> {
    ucp_mem_map_params_t p{};
    p.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    p.address = base;
    p.length = size;
    ucp_mem_h h = nullptr;
    const ucs_status_t st = ucp_mem_map(impl_->context.get(), &p, &h);
    if (st != UCS_OK) return ucx::FromUcs(st, absl::StrCat("ucp_mem_map of ", size, " bytes"));
    return h;
  });
  if (!memh.ok()) return memh.status();
  return std::unique_ptr<MemoryRegion>(
      new UcxRegion(impl_, static_cast<uint8_t*>(base), size, *memh));
}

void UcxTransport::Send(PeerId peer, uint16_t type, std::string header, ByteSpan payload,
                        const MemoryRegion* region, absl::Time deadline, DoneCallback done) {
  absl::Status bad;
  if (type >= kMaxTypes) {
    bad = absl::InvalidArgumentError(absl::StrCat("message type ", type, " >= ", kMaxTypes));
  } else if (header.size() > impl_->max_header) {
    bad = absl::InvalidArgumentError(
        absl::StrCat("header of ", header.size(), " bytes exceeds ", impl_->max_header));
  } else if (region != nullptr && !payload.empty() &&
             !region->Contains(payload.data(), payload.size())) {
    bad = absl::InvalidArgumentError("payload lies outside the registered region named");
  }
  if (!bad.ok()) {
    impl_->Post([done = std::move(done), bad]() mutable { std::move(done)(bad); });
    return;
  }
  impl_->Post([impl = impl_.get(), peer, type, header = std::move(header), payload,
               memh = MemhOf(region), deadline, done = std::move(done)]() mutable {
    impl->SendOnThread(peer, type, std::move(header), payload, memh, deadline, std::move(done));
  });
}

void UcxTransport::Receive(std::unique_ptr<Incoming> incoming, MutableByteSpan dst,
                           const MemoryRegion* region, absl::Time deadline, DoneCallback done) {
  absl::Status bad;
  if (dst.size() != incoming->payload_bytes()) {
    bad = absl::InvalidArgumentError(absl::StrCat(
        "receive buffer of ", dst.size(), " bytes for a payload of ", incoming->payload_bytes()));
  } else if (region != nullptr && !dst.empty() && !region->Contains(dst.data(), dst.size())) {
    bad = absl::InvalidArgumentError("receive buffer lies outside the registered region named");
  }
  if (!bad.ok()) {
    incoming.reset();  // discards the payload
    impl_->Post([done = std::move(done), bad]() mutable { std::move(done)(bad); });
    return;
  }
  (void)incoming->TakeDiscard();
  auto* pl = static_cast<PendingPayload*>(incoming->transport_data);
  impl_->Post([impl = impl_.get(), pl, dst, memh = MemhOf(region), deadline,
               done = std::move(done)]() mutable {
    impl->ReceiveOnThread(pl, dst, memh, deadline, std::move(done));
  });
}

}  // namespace kvdn::transfer
