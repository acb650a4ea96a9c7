#include "src/unix_listener.h"

#include <errno.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace kvdn::daemon {

absl::StatusOr<std::unique_ptr<UnixListener>> UnixListener::Start(const std::string& path,
                                                                  int send_buffer_bytes,
                                                                  OnAccept on_accept) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("unix_socket ", path, ": ", path.size(),
                                                   " bytes; a unix socket path holds 1 to ",
                                                   sizeof(addr.sun_path) - 1));
  }
  if (send_buffer_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("send_buffer_bytes ", send_buffer_bytes, " is negative"));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::FailedPreconditionError(
          absl::StrCat("unix_socket ", path, " exists and is not a socket"));
    }
    unlink(path.c_str());  // a stale socket of an earlier run
  }
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("socket(AF_UNIX): ", strerror(errno)));
  if (bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(fd, SOMAXCONN) != 0) {
    const int err = errno;
    close(fd);
    return absl::UnavailableError(
        absl::StrCat("cannot listen on unix socket ", path, ": ", strerror(err)));
  }
  const int wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake < 0) {
    const int err = errno;
    close(fd);
    unlink(path.c_str());
    return absl::UnavailableError(absl::StrCat("eventfd: ", strerror(err)));
  }
  std::unique_ptr<UnixListener> l(
      new UnixListener(path, fd, wake, send_buffer_bytes, std::move(on_accept)));
  l->thread_ = std::thread([raw = l.get()] { raw->Run(); });
  return l;
}

UnixListener::UnixListener(std::string path, int fd, int wake_fd, int send_buffer_bytes,
                           OnAccept on_accept)
    : path_(std::move(path)),
      fd_(fd),
      wake_fd_(wake_fd),
      send_buffer_bytes_(send_buffer_bytes),
      on_accept_(std::move(on_accept)) {}

UnixListener::~UnixListener() {
  Stop();
  close(wake_fd_);
}

void UnixListener::Stop() {
  if (stopped_.exchange(true)) return;
  const uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof(one));
  if (thread_.joinable()) thread_.join();
  close(fd_);
  unlink(path_.c_str());
}

void UnixListener::Run() {
  pollfd fds[2] = {{fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
  bool warned_cap = false;
  while (!stopped_.load()) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("unix socket {}: poll failed: {}; no longer accepting", path_, strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;  // Stop
    for (;;) {
      const int c = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (c < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        // Out of descriptors or memory: the connection waits in the backlog; try again shortly
        // rather than spinning on it.
        spdlog::warn("unix socket {}: accept failed: {}", path_, strerror(errno));
        poll(nullptr, 0, 100);
        break;
      }
      if (send_buffer_bytes_ > 0) {
        (void)setsockopt(c, SOL_SOCKET, SO_SNDBUF, &send_buffer_bytes_, sizeof(int));
      }
      int granted = 0;
      socklen_t len = sizeof(granted);
      if (getsockopt(c, SOL_SOCKET, SO_SNDBUF, &granted, &len) == 0) {
        granted_.store(granted, std::memory_order_relaxed);
        // The kernel doubles what it is asked for, up to twice net.core.wmem_max.
        if (send_buffer_bytes_ > 0 && int64_t{granted} < int64_t{2} * send_buffer_bytes_ &&
            !warned_cap) {
          warned_cap = true;
          spdlog::warn(
              "unix socket {}: asked for a {} byte send buffer, the kernel granted {} "
              "(net.core.wmem_max caps it); raise net.core.wmem_max for faster Get over the "
              "unix socket",
              path_, send_buffer_bytes_, granted / 2);
        }
      }
      accepted_.fetch_add(1, std::memory_order_relaxed);
      on_accept_(c);
    }
  }
}

}  // namespace kvdn::daemon
