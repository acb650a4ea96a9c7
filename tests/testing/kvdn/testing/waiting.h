// Shared by tests and benchmarks that run real processes: a free loopback port, and polling for a
// condition that other processes make true.
#ifndef KVDN_TESTING_WAITING_H_
#define KVDN_TESTING_WAITING_H_

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "absl/time/time.h"

namespace kvdn::testing {

// A TCP port on 127.0.0.1 free at the time of the call.
inline int FreeLoopbackPort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

// Polls `pred` every 100 ms for up to `limit`; its last answer.
template <typename Pred>
bool Eventually(Pred pred, absl::Duration limit) {
  const absl::Time until = absl::Now() + limit;
  while (absl::Now() < until) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return pred();
}

}  // namespace kvdn::testing

#endif  // KVDN_TESTING_WAITING_H_
