// Internal to daemon/: kvdnd's own listener on its unix socket. gRPC's listener leaves each
// accepted unix socket at the kernel's default send buffer (net.core.wmem_default, 208 KiB on
// most hosts), and a unix stream socket's sender blocks once that much is queued: a 512 KiB Get
// frame then needs at least three write / wake / read rounds (its size over the buffer), and four
// clients on two cores spend the CPU on them (bench/results/e2e-2026-12-02-sndbuf.md). This
// listener accepts, sets SO_SNDBUF on the connection, and hands the fd to the gRPC server
// (grpc::AddInsecureChannelFromFd in server.cc). Calls on those connections see the peer "fd:N"
// (IsLocalPeer in server_state.h).
#ifndef KVDN_DAEMON_SRC_UNIX_LISTENER_H_
#define KVDN_DAEMON_SRC_UNIX_LISTENER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "kvdn/common/status.h"

namespace kvdn::daemon {

class UnixListener {
 public:
  // Called on the listener's thread with each accepted connection: nonblocking, close-on-exec,
  // its send buffer set; the callee owns the fd.
  using OnAccept = std::function<void(int fd)>;

  // Binds `path` (a stale socket of an earlier run is removed; anything else there is
  // FAILED_PRECONDITION), listens, and accepts on a thread of its own until Stop.
  // `send_buffer_bytes`: SO_SNDBUF asked for each connection (the kernel doubles it for its own
  // bookkeeping and caps it at twice net.core.wmem_max); 0 leaves the kernel's default.
  // INVALID_ARGUMENT for a path longer than a sockaddr_un holds; UNAVAILABLE when it cannot bind.
  static absl::StatusOr<std::unique_ptr<UnixListener>> Start(const std::string& path,
                                                             int send_buffer_bytes,
                                                             OnAccept on_accept);
  ~UnixListener();  // Stop()
  UnixListener(const UnixListener&) = delete;
  UnixListener& operator=(const UnixListener&) = delete;

  // Stops accepting and closes the listening socket (connections already handed off stay);
  // unlinks the path. Idempotent.
  void Stop();

  // SO_SNDBUF as the kernel reports it for the most recent connection (0 before the first): the
  // kernel's doubled value, less than 2 x send_buffer_bytes where net.core.wmem_max caps it.
  int granted_send_buffer_bytes() const { return granted_.load(std::memory_order_relaxed); }
  uint64_t accepted() const { return accepted_.load(std::memory_order_relaxed); }

 private:
  UnixListener(std::string path, int fd, int wake_fd, int send_buffer_bytes, OnAccept on_accept);
  void Run();

  const std::string path_;
  const int fd_;
  const int wake_fd_;  // an eventfd: Stop writes it to end Run's poll
  const int send_buffer_bytes_;
  const OnAccept on_accept_;
  std::atomic<int> granted_{0};
  std::atomic<uint64_t> accepted_{0};
  std::atomic<bool> stopped_{false};
  std::thread thread_;
};

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_SRC_UNIX_LISTENER_H_
