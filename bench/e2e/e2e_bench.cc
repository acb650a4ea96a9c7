// e2e_bench: Put and Get of whole chunks through a real kvdnd over loopback (gRPC, streamed 1 MiB
// frames), beside Redis 7 SET/GET of the same values at the same concurrency, in the same run.
// Both servers are started by this program (Redis with persistence off) and measured over TCP
// 127.0.0.1 and over a unix socket.
//
//   e2e_bench [--sizes-mib 1,4] [--clients 1,4] [--seconds 2] [--rounds 3] [--kvdnd PATH]
//             [--redis PATH]
//
// Each cell runs `rounds` times, kvdn and Redis back to back (which goes first alternates), and
// reports the medians; kvdn/redis is the median of the per-round ratios (each round's pair ran
// under the same conditions on this noisy 2-core VM), with their range.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_split.h"
#include "kvdn/common/chunk_format.h"
#include "loopback_util.h"

namespace kvdn::bench {
namespace {

struct Options {
  std::vector<int> sizes_mib = {1, 4};
  std::vector<int> clients = {1, 4};
  double seconds = 2;
  int rounds = 3;
  std::string kvdnd = KVDN_KVDND_PATH;
  std::string redis = "redis-server";
  // kvdn's payload path: "grpc" (this benchmark's subject) or "ucx" (the data plane, for a first
  // look; bench/transfer is its benchmark).
  std::string data_plane = "grpc";
  std::vector<std::string> transports = {"tcp", "unix"};
};
// The transport's ceiling: one connected pair of sockets (TCP loopback or unix), a writer thread
// sending `value_bytes` messages and a reader receiving them into one buffer, for `seconds`.
double SocketCeilingGbps(bool tcp, size_t value_bytes, double seconds) {
  int fds[2] = {-1, -1};
  if (tcp) {
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    socklen_t len = sizeof(a);
    getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &len);
    listen(lfd, 1);
    fds[0] = socket(AF_INET, SOCK_STREAM, 0);
    connect(fds[0], reinterpret_cast<sockaddr*>(&a), sizeof(a));
    fds[1] = accept(lfd, nullptr, nullptr);
    close(lfd);
  } else {
    socketpair(AF_UNIX, SOCK_STREAM, 0, fds);
  }
  std::vector<uint8_t> src(value_bytes, 0x5A), dst(value_bytes);
  std::atomic<bool> stop{false};
  uint64_t received = 0;
  std::thread reader([&] {
    for (;;) {
      const ssize_t n = read(fds[1], dst.data(), dst.size());
      if (n <= 0) return;
      received += static_cast<uint64_t>(n);
    }
  });
  const auto start = Clock::now();
  while (Seconds(start, Clock::now()) < seconds) {
    for (size_t off = 0; off < src.size();) {
      const ssize_t n = write(fds[0], src.data() + off, src.size() - off);
      if (n <= 0) break;
      off += static_cast<size_t>(n);
    }
  }
  shutdown(fds[0], SHUT_WR);
  reader.join();
  const double wall = Seconds(start, Clock::now());
  close(fds[0]);
  close(fds[1]);
  return static_cast<double>(received) / wall / 1e9;
}

}  // namespace
}  // namespace kvdn::bench

int main(int argc, char** argv) {
  using namespace kvdn::bench;  // NOLINT
  using kvdn::ByteSpan;
  using kvdn::MutableByteSpan;
  Options o;
  std::string cmdline = argv[0];
  for (int i = 1; i < argc; ++i) cmdline += std::string(" ") + argv[i];
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--sizes-mib")
      o.sizes_mib = ParseList(val());
    else if (a == "--clients")
      o.clients = ParseList(val());
    else if (a == "--seconds")
      o.seconds = std::atof(val().c_str());
    else if (a == "--rounds")
      o.rounds = std::max(1, std::atoi(val().c_str()));
    else if (a == "--kvdnd")
      o.kvdnd = val();
    else if (a == "--redis")
      o.redis = val();
    else if (a == "--data-plane")
      o.data_plane = val();
    else if (a == "--transports")
      o.transports = absl::StrSplit(val(), ',');
    else {
      std::fprintf(stderr,
                   "usage: e2e_bench [--sizes-mib 1,4] [--clients 1,4] [--seconds S] "
                   "[--rounds N] [--kvdnd PATH] [--redis PATH] [--data-plane grpc|ucx] "
                   "[--transports tcp,unix]\n");
      return 2;
    }
  }
  const auto data_plane = o.data_plane == "ucx" ? kvdn::client::ClientOptions::DataPlane::kUcx
                                                : kvdn::client::ClientOptions::DataPlane::kGrpc;
  std::printf(
      "# e2e: kvdnd (payloads over %s) vs Redis over loopback\n# command: %s\n# cpu: %s (%u "
      "cores)\n"
      "# redis: %s\n# date: %s\n",
      o.data_plane.c_str(), cmdline.c_str(), CpuModel().c_str(),
      std::thread::hardware_concurrency(), CommandOutput((o.redis + " --version").c_str()).c_str(),
      CommandOutput("date -u +%FT%TZ").c_str());
  Servers servers({.kvdnd = o.kvdnd, .redis = o.redis});
  if (!servers.error().empty()) {
    std::fprintf(stderr, "%s\n", servers.error().c_str());
    return 1;
  }

  struct System {
    std::string name;
    std::function<std::unique_ptr<Conn>()> connect;
  };
  const std::string tcp = servers.kvdn_tcp();
  const std::string unix_target = servers.kvdn_unix();
  const std::vector<std::pair<std::string, std::vector<System>>> transports = {
      {"tcp",
       {{"kvdn", [&] { return std::unique_ptr<Conn>(new KvdnConn(tcp, data_plane)); }},
        {"redis", [&] { return std::unique_ptr<Conn>(new RedisConn("", servers.redis_port())); }}}},
      {"unix",
       {{"kvdn", [&] { return std::unique_ptr<Conn>(new KvdnConn(unix_target, data_plane)); }},
        {"redis", [&] { return std::unique_ptr<Conn>(new RedisConn(servers.redis_sock(), 0)); }}}},
  };

  std::printf(
      "\n| transport | op | value | clients | kvdn GB/s | redis GB/s | kvdn/redis (range) | socket "
      "ceiling GB/s | kvdn/ceiling | kvdn p50/p99 ms | redis p50/p99 ms |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|\n");
  bool all_ok = true;
  int key_base = 0;
  std::vector<std::string> verdicts;
  for (int mib : o.sizes_mib) {
    // One encoded chunk of about `mib` MiB; every key holds these bytes.
    const kvdn::ChunkInfo info = kvdn::testing::InfoForBytes(uint64_t(mib) << 20, 1);
    const std::vector<uint8_t> value = kvdn::testing::RandomChunk(info, mib);
    for (const auto& [transport, systems] : transports) {
      if (std::find(o.transports.begin(), o.transports.end(), transport) == o.transports.end()) {
        continue;
      }
      const double ceiling = SocketCeilingGbps(transport == "tcp", value.size(), o.seconds / 2);
      for (int clients : o.clients) {
        // [op][system]: per-round figures.
        std::vector<double> gbps[2][2], p50[2][2], p99[2][2], ratio[2];
        for (int round = 0; round < o.rounds; ++round) {
          Result r[2][2];
          for (int k = 0; k < 2; ++k) {
            const int s = (round + k) % 2;  // alternate who goes first
            std::tie(r[0][s], r[1][s]) =
                PutThenGet(systems[s].connect, clients, o.seconds, value, key_base);
            if (!r[0][s].ok && !r[1][s].ok && r[0][s].ops == 0) {
              std::fprintf(stderr, "%s over %s: round trip failed\n", systems[s].name.c_str(),
                           transport.c_str());
            }
            if (s == 1) servers.FlushRedis();
            all_ok = all_ok && r[0][s].ok && r[1][s].ok;
            key_base += 1000000;
          }
          for (int op = 0; op < 2; ++op) {
            for (int s = 0; s < 2; ++s) {
              gbps[op][s].push_back(r[op][s].gbps);
              p50[op][s].push_back(r[op][s].p50_ms);
              p99[op][s].push_back(r[op][s].p99_ms);
            }
            ratio[op].push_back(r[op][1].gbps > 0 ? r[op][0].gbps / r[op][1].gbps : 0);
          }
        }
        for (int op = 0; op < 2; ++op) {
          const double kv = Median(gbps[op][0]);
          const double rat = Median(ratio[op]);
          const auto [lo, hi] = std::minmax_element(ratio[op].begin(), ratio[op].end());
          std::printf(
              "| %s | %s | %d MiB | %d | %.2f | %.2f | %.2f (%.2f-%.2f) | %.2f | %.2f | %.2f / "
              "%.2f | %.2f / %.2f |\n",
              transport.c_str(), op == 0 ? "put" : "get", mib, clients, kv, Median(gbps[op][1]),
              rat, *lo, *hi, ceiling, ceiling > 0 ? kv / ceiling : 0, Median(p50[op][0]),
              Median(p99[op][0]), Median(p50[op][1]), Median(p99[op][1]));
          std::fflush(stdout);
          if (op == 1) {
            char line[160];
            std::snprintf(line, sizeof(line), "- get %s %d MiB x%d: kvdn/redis %.2f (>= 1.00): %s",
                          transport.c_str(), mib, clients, rat, rat >= 1.0 ? "met" : "MISSED");
            verdicts.push_back(line);
          }
        }
      }
    }
  }
  std::printf(
      "\nGB/s = value bytes moved / wall time, all clients together; each client is a "
      "thread with its own connection; kvdn Get is GetEncoded (whole chunk into the "
      "caller's buffer), Redis GET copies the reply into the same kind of buffer. Socket ceiling = "
      "one socket pair of the "
      "same transport, one writer thread and one reader thread moving values of the same size "
      "(no protocol, no server). Figures are medians of %d rounds.\n\nTarget (issue 3): kvdn Get "
      ">= Redis GET (median per-round ratio)\n",
      o.rounds);
  for (const std::string& v : verdicts) std::printf("%s\n", v.c_str());
  return all_ok ? 0 : 1;
}
