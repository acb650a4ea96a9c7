// UnixListener (daemon/src/unix_listener.h): each accepted connection reaches the callback with
// the send buffer asked for (within what net.core.wmem_max allows), nonblocking; the path is
// checked and cleaned up.
#include "src/unix_listener.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn::daemon {
namespace {

using ::kvdn::testing::StatusIs;
using ::testing::HasSubstr;

class UnixListenerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ =
        std::filesystem::temp_directory_path() / ("kvdn-unix-listener-" + std::to_string(getpid()));
    std::filesystem::create_directories(dir_);
    path_ = (dir_ / "sub" / "l.sock").string();  // the parent is created by Start
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  sockaddr_un Addr() const {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path_.data(), path_.size());
    return addr;
  }

  // Connects a client; -1 on failure.
  int Connect() const {
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const sockaddr_un addr = Addr();
    if (connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
      close(fd);
      return -1;
    }
    return fd;
  }

  static int WmemMax() {
    std::ifstream f("/proc/sys/net/core/wmem_max");
    int v = 0;
    f >> v;
    return v;
  }

  std::filesystem::path dir_;
  std::string path_;
};

struct Accepted {
  std::mutex mu;
  std::vector<int> fds;
  size_t size() {
    std::lock_guard<std::mutex> lock(mu);
    return fds.size();
  }
  bool WaitFor(size_t n) {
    for (int i = 0; i < 500 && size() < n; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return size() >= n;
  }
  ~Accepted() {
    for (int fd : fds) close(fd);
  }
};

TEST_F(UnixListenerTest, ConnectionsGetTheSendBufferAskedFor) {
  Accepted got;
  constexpr int kAsk = 1 << 20;
  ASSERT_OK_AND_ASSIGN(auto listener, UnixListener::Start(path_, kAsk, [&](int fd) {
                         std::lock_guard<std::mutex> lock(got.mu);
                         got.fds.push_back(fd);
                       }));
  std::vector<int> clients;
  for (int i = 0; i < 3; ++i) {
    const int c = Connect();
    ASSERT_GE(c, 0) << strerror(errno);
    clients.push_back(c);
  }
  ASSERT_TRUE(got.WaitFor(3));
  EXPECT_EQ(listener->accepted(), 3u);
  // The kernel doubles the request, capped at twice net.core.wmem_max.
  const int want = std::min(2 * kAsk, 2 * WmemMax());
  for (int fd : got.fds) {
    int sndbuf = 0;
    socklen_t len = sizeof(sndbuf);
    ASSERT_EQ(getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &len), 0);
    EXPECT_EQ(sndbuf, want);
    EXPECT_TRUE(fcntl(fd, F_GETFL) & O_NONBLOCK);
    EXPECT_TRUE(fcntl(fd, F_GETFD) & FD_CLOEXEC);
  }
  EXPECT_EQ(listener->granted_send_buffer_bytes(), want);
  // The connection carries bytes both ways.
  ASSERT_EQ(write(clients[0], "ping", 4), 4);
  char buf[4];
  for (int i = 0; i < 100 && read(got.fds[0], buf, 4) != 4; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(std::string(buf, 4), "ping");
  for (int c : clients) close(c);

  listener->Stop();
  struct stat st;
  EXPECT_NE(lstat(path_.c_str(), &st), 0) << "Stop leaves the socket path behind";
  EXPECT_LT(Connect(), 0);
  listener->Stop();  // idempotent
}

TEST_F(UnixListenerTest, AStaleSocketIsReplaced) {
  {
    ASSERT_OK_AND_ASSIGN(auto first, UnixListener::Start(path_, 65536, [](int fd) { close(fd); }));
  }
  // A crashed daemon leaves its socket file behind: bind one at the path and close it.
  const int stale = socket(AF_UNIX, SOCK_STREAM, 0);
  const sockaddr_un addr = Addr();
  ASSERT_EQ(bind(stale, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)), 0);
  close(stale);  // the file stays, nobody listens
  Accepted got;
  ASSERT_OK_AND_ASSIGN(auto listener, UnixListener::Start(path_, 65536, [&](int fd) {
                         std::lock_guard<std::mutex> lock(got.mu);
                         got.fds.push_back(fd);
                       }));
  const int c = Connect();
  ASSERT_GE(c, 0);
  EXPECT_TRUE(got.WaitFor(1));
  close(c);
}

TEST_F(UnixListenerTest, BadPathsAreRefused) {
  std::filesystem::create_directories(dir_);
  const std::string file = (dir_ / "regular").string();
  std::ofstream(file) << "x";
  EXPECT_THAT(UnixListener::Start(file, 0, [](int fd) { close(fd); }).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("is not a socket")));
  EXPECT_TRUE(std::filesystem::exists(file)) << "a file that is not a socket must not be removed";
  EXPECT_THAT(
      UnixListener::Start("/" + std::string(200, 'a'), 0, [](int fd) { close(fd); }).status(),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("a unix socket path holds")));
  EXPECT_THAT(UnixListener::Start(path_, -1, [](int fd) { close(fd); }).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("negative")));
}

}  // namespace
}  // namespace kvdn::daemon
