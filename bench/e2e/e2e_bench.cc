// e2e_bench: Put and Get of whole chunks through a real kvdnd over loopback (gRPC, streamed 1 MiB
// frames), beside Redis 7 SET/GET of the same values at the same concurrency, in the same run.
// Both servers are started by this program (Redis with persistence off) and measured over TCP
// 127.0.0.1 and over a unix socket.
//
//   e2e_bench [--sizes-mib 1,4] [--clients 1,4] [--seconds 2] [--kvdnd PATH] [--redis PATH]
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench_util.h"
#include "kvdn/client/client.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/testing/chunks.h"

namespace kvdn::bench {
namespace {

struct Options {
  std::vector<int> sizes_mib = {1, 4};
  std::vector<int> clients = {1, 4};
  double seconds = 2;
  std::string kvdnd = KVDN_KVDND_PATH;
  std::string redis = "redis-server";
  // kvdn's payload path: "grpc" (this benchmark's subject) or "ucx" (the data plane, for a first
  // look; bench/transfer is its benchmark).
  std::string data_plane = "grpc";
};
std::string g_data_plane = "grpc";

int FreePort() {
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

pid_t Spawn(std::vector<std::string> args, const std::string& log) {
  pid_t pid = fork();
  if (pid == 0) {
    FILE* f = std::fopen(log.c_str(), "w");
    if (f) {
      dup2(fileno(f), 1);
      dup2(fileno(f), 2);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execvp(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

void Stop(pid_t pid) {
  kill(pid, SIGTERM);
  waitpid(pid, nullptr, 0);
}

// One system under test, as the benchmark drives it: per-client connections doing put/get.
class Conn {
 public:
  virtual ~Conn() = default;
  virtual bool Put(int key, ByteSpan value) = 0;
  virtual bool Get(int key, MutableByteSpan dst) = 0;
};

class KvdnConn final : public Conn {
 public:
  explicit KvdnConn(const std::string& target) {
    client::ClientOptions o;
    o.target = target;
    o.model = {"bench", 1, 1, 64, Dtype::kBFloat16, 256};
    o.data_plane = g_data_plane == "ucx" ? client::ClientOptions::DataPlane::kUcx
                                         : client::ClientOptions::DataPlane::kGrpc;
    c_ = client::Client::Connect(o).value();
  }
  bool Put(int key, ByteSpan value) override {
    auto r = c_->PutEncoded(testing::KeyFor(key, "bench"), value);
    return r.ok();
  }
  bool Get(int key, MutableByteSpan dst) override {
    auto r = c_->GetEncoded(testing::KeyFor(key, "bench"), dst);
    return r.ok() && *r == dst.size();
  }

 private:
  std::unique_ptr<client::Client> c_;
};

class RedisConn final : public Conn {
 public:
  RedisConn(const std::string& unix_path, int port) {
    ctx_ =
        unix_path.empty() ? redisConnect("127.0.0.1", port) : redisConnectUnix(unix_path.c_str());
  }
  ~RedisConn() override {
    if (ctx_) redisFree(ctx_);
  }
  bool Put(int key, ByteSpan value) override {
    const std::string k = absl::StrCat("bench:", key);
    auto* r = static_cast<redisReply*>(
        redisCommand(ctx_, "SET %b %b", k.data(), k.size(), value.data(), value.size()));
    const bool ok = r && r->type == REDIS_REPLY_STATUS;
    if (r) freeReplyObject(r);
    return ok;
  }
  bool Get(int key, MutableByteSpan dst) override {
    const std::string k = absl::StrCat("bench:", key);
    auto* r = static_cast<redisReply*>(redisCommand(ctx_, "GET %b", k.data(), k.size()));
    const bool ok = r && r->type == REDIS_REPLY_STRING && r->len == dst.size();
    // Into the caller's buffer, as kvdn's GetEncoded does.
    if (ok) std::memcpy(dst.data(), r->str, r->len);
    if (r) freeReplyObject(r);
    return ok;
  }

 private:
  redisContext* ctx_ = nullptr;
};

struct Result {
  double gbps = 0;
  double p50_ms = 0;
  double p99_ms = 0;
  uint64_t ops = 0;
  bool ok = true;
};

// `clients` threads, each with its own connection, run `op(conn, i)` for `seconds`.
Result Drive(const std::function<std::unique_ptr<Conn>()>& connect, int clients, double seconds,
             uint64_t bytes_per_op, const std::function<bool(Conn&, uint64_t)>& op) {
  std::vector<std::unique_ptr<Conn>> conns;
  for (int c = 0; c < clients; ++c) conns.push_back(connect());
  std::vector<Latencies> lat(clients);
  std::atomic<bool> ok{true};
  std::atomic<uint64_t> next{0};
  const auto start = Clock::now();
  const auto until =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      while (Clock::now() < until) {
        const auto t0 = Clock::now();
        if (!op(*conns[c], next.fetch_add(1))) {
          ok = false;
          return;
        }
        lat[c].Add(Seconds(t0, Clock::now()));
      }
    });
  }
  for (auto& t : threads) t.join();
  const double wall = Seconds(start, Clock::now());
  Latencies all;
  for (auto& l : lat) all.s.insert(all.s.end(), l.s.begin(), l.s.end());
  Result r;
  r.ops = all.s.size();
  r.gbps = static_cast<double>(r.ops * bytes_per_op) / wall / 1e9;
  r.p50_ms = all.Percentile(0.5) * 1e3;
  r.p99_ms = all.Percentile(0.99) * 1e3;
  r.ok = ok;
  return r;
}

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

std::vector<int> ParseList(const std::string& s) {
  std::vector<int> out;
  for (absl::string_view p : absl::StrSplit(s, ',')) {
    int v = 0;
    if (absl::SimpleAtoi(p, &v) && v > 0) out.push_back(v);
  }
  return out;
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
    else if (a == "--kvdnd")
      o.kvdnd = val();
    else if (a == "--redis")
      o.redis = val();
    else if (a == "--data-plane")
      o.data_plane = val();
    else {
      std::fprintf(stderr,
                   "usage: e2e_bench [--sizes-mib 1,4] [--clients 1,4] [--seconds S] "
                   "[--kvdnd PATH] [--redis PATH] [--data-plane grpc|ucx]\n");
      return 2;
    }
  }
  g_data_plane = o.data_plane;
  char tmpl[] = "/tmp/kvdn-e2e.XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  std::printf(
      "# e2e: kvdnd (payloads over %s) vs Redis over loopback\n# command: %s\n# cpu: %s (%u "
      "cores)\n"
      "# redis: %s\n# date: %s\n",
      o.data_plane.c_str(), cmdline.c_str(), CpuModel().c_str(),
      std::thread::hardware_concurrency(), CommandOutput((o.redis + " --version").c_str()).c_str(),
      CommandOutput("date -u +%FT%TZ").c_str());

  const int redis_port = FreePort();
  const std::string redis_sock = dir + "/redis.sock";
  const pid_t redis =
      Spawn({o.redis, "--port", std::to_string(redis_port), "--bind", "127.0.0.1", "--unixsocket",
             redis_sock, "--save", "", "--appendonly", "no", "--protected-mode", "no",
             "--maxmemory", "0", "--proto-max-bulk-len", "64mb"},
            dir + "/redis.log");
  const pid_t kvdnd =
      Spawn({o.kvdnd, "--data-dir", dir + "/kvdn", "--unix-socket", dir + "/kvdnd.sock",
             "--grpc-address", "127.0.0.1:0", "--http-address", "none", "--host-tier-bytes", "3GiB",
             "--no-disk-tier", "--ready-file", dir + "/ready.json", "--log-level", "warn"},
            dir + "/kvdnd.log");
  int grpc_port = 0;
  for (int i = 0; i < 400 && grpc_port == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    const std::string j = CommandOutput(("cat " + dir + "/ready.json 2>/dev/null").c_str());
    const size_t at = j.find("\"grpc_port\": ");
    if (at != std::string::npos) grpc_port = std::atoi(j.c_str() + at + 13);
  }
  if (grpc_port == 0) {
    std::fprintf(stderr, "kvdnd did not start: %s\n",
                 CommandOutput(("cat " + dir + "/kvdnd.log").c_str()).c_str());
    Stop(redis);
    return 1;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // redis listening

  struct System {
    std::string name;
    std::function<std::unique_ptr<Conn>()> connect;
  };
  const std::string tcp = absl::StrCat("127.0.0.1:", grpc_port);
  const std::string unix_target = "unix:" + dir + "/kvdnd.sock";
  const std::vector<std::pair<std::string, std::vector<System>>> transports = {
      {"tcp",
       {{"kvdn", [&] { return std::unique_ptr<Conn>(new KvdnConn(tcp)); }},
        {"redis", [&] { return std::unique_ptr<Conn>(new RedisConn("", redis_port)); }}}},
      {"unix",
       {{"kvdn", [&] { return std::unique_ptr<Conn>(new KvdnConn(unix_target)); }},
        {"redis", [&] { return std::unique_ptr<Conn>(new RedisConn(redis_sock, 0)); }}}},
  };

  std::printf(
      "\n| transport | op | value | clients | kvdn GB/s | redis GB/s | kvdn/redis | socket ceiling "
      "GB/s | kvdn/ceiling | kvdn p50/p99 ms | redis p50/p99 ms |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|\n");
  bool all_ok = true;
  int key_base = 0;
  for (int mib : o.sizes_mib) {
    // One encoded chunk of about `mib` MiB; every key holds these bytes.
    const kvdn::ChunkInfo info = kvdn::testing::InfoForBytes(uint64_t(mib) << 20, 1);
    const std::vector<uint8_t> value = kvdn::testing::RandomChunk(info, mib);
    for (const auto& [transport, systems] : transports) {
      const double ceiling = SocketCeilingGbps(transport == "tcp", value.size(), o.seconds / 2);
      for (int clients : o.clients) {
        Result put[2], get[2];
        for (int s = 0; s < 2; ++s) {
          auto conn = systems[s].connect();
          // Correctness first: a value goes in and comes back bit-identical.
          std::vector<uint8_t> back(value.size());
          const int probe = key_base + 999999;
          if (!conn->Put(probe, value) || !conn->Get(probe, MutableByteSpan(back)) ||
              back != value) {
            std::fprintf(stderr, "%s over %s: round trip failed\n", systems[s].name.c_str(),
                         transport.c_str());
            all_ok = false;
            continue;
          }
          // Put: each op a new key (kvdn keys are content-addressed: a repeat is a no-op).
          const int base = key_base;
          put[s] = Drive(systems[s].connect, clients, o.seconds, value.size(),
                         [&](Conn& c, uint64_t i) { return c.Put(base + int(i), value); });
          // Get: cycle over the last keys written (at most 256 MiB of them; older ones may have
          // been evicted from kvdn's host tier).
          const uint64_t keys =
              std::max<uint64_t>(1, std::min<uint64_t>(put[s].ops, (256ull << 20) / value.size()));
          const int first = base + static_cast<int>(put[s].ops - keys);
          get[s] =
              Drive(systems[s].connect, clients, o.seconds, value.size(), [&](Conn& c, uint64_t i) {
                thread_local std::vector<uint8_t> buf;
                buf.resize(value.size());
                return c.Get(first + int(i % keys), MutableByteSpan(buf));
              });
          if (s == 1) {  // keep Redis's memory bounded between configurations
            redisContext* rc = redisConnect("127.0.0.1", redis_port);
            if (rc) {
              freeReplyObject(redisCommand(rc, "FLUSHALL"));
              redisFree(rc);
            }
          }
          all_ok = all_ok && put[s].ok && get[s].ok;
        }
        key_base += 1000000;
        for (int op = 0; op < 2; ++op) {
          const Result* r = op == 0 ? put : get;
          std::printf(
              "| %s | %s | %d MiB | %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f / %.2f | %.2f / "
              "%.2f |\n",
              transport.c_str(), op == 0 ? "put" : "get", mib, clients, r[0].gbps, r[1].gbps,
              r[1].gbps > 0 ? r[0].gbps / r[1].gbps : 0, ceiling,
              ceiling > 0 ? r[0].gbps / ceiling : 0, r[0].p50_ms, r[0].p99_ms, r[1].p50_ms,
              r[1].p99_ms);
          std::fflush(stdout);
        }
      }
    }
  }
  Stop(kvdnd);
  Stop(redis);
  std::filesystem::remove_all(dir);
  std::printf(
      "\nGB/s = value bytes moved / wall time, all clients together; each client is a "
      "thread with its own connection; kvdn Get is GetEncoded (whole chunk into the "
      "caller's buffer), Redis GET copies the reply into the same kind of buffer. Socket ceiling = "
      "one socket pair of the "
      "same transport, one writer thread and one reader thread moving values of the same size "
      "(no protocol, no server).\n");
  return all_ok ? 0 : 1;
}
