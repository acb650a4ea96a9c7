// Shared by the benchmarks that drive real servers over loopback (bench/e2e, bench/transfer):
// spawning kvdnd and redis-server, one connection per client thread to each, and the loop that
// drives them for a fixed time.
#ifndef KVDN_BENCH_LOOPBACK_UTIL_H_
#define KVDN_BENCH_LOOPBACK_UTIL_H_

#include <grpcpp/grpcpp.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench_util.h"
#include "kvdn/client/client.h"
#include "kvdn/testing/chunks.h"
#include "kvdn/testing/waiting.h"
#include "kvdn/v1/admin_service.grpc.pb.h"

namespace kvdn::bench {

using ::kvdn::testing::FreeLoopbackPort;

// Starts `args` with stdout and stderr in `log`, `env` ("NAME=value") added to the environment.
// The child gets SIGTERM when the benchmark dies (a benchmark killed by a signal used to leave
// its kvdnd and redis-server running). Call from a thread that outlives the child: the signal
// follows the forking thread.
inline pid_t Spawn(std::vector<std::string> args, const std::string& log,
                   const std::vector<std::string>& env = {}) {
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);  // the benchmark died before prctl
    FILE* f = std::fopen(log.c_str(), "w");
    if (f) {
      dup2(fileno(f), 1);
      dup2(fileno(f), 2);
    }
    for (const std::string& e : env) putenv(const_cast<char*>(e.c_str()));
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execvp(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

inline void Stop(pid_t pid) {
  kill(pid, SIGTERM);
  waitpid(pid, nullptr, 0);
}

// A kvdnd (host tier only, no HTTP) and a redis-server (persistence off) in a temporary
// directory, stopped and removed on destruction.
class Servers {
 public:
  struct Options {
    std::string kvdnd;
    std::string redis = "redis-server";
    uint64_t host_tier_bytes = 3ull << 30;
    std::vector<std::string> kvdnd_args;  // more flags
    std::string admin_token;              // for a kvdnd with tenant tokens (auth_tokens_file)
  };

  // Empty `error()` once both serve.
  explicit Servers(const Options& o) {
    char tmpl[] = "/tmp/kvdn-bench.XXXXXX";
    dir_ = mkdtemp(tmpl);
    redis_port_ = FreeLoopbackPort();
    redis_sock_ = dir_ + "/redis.sock";
    redis_ = Spawn({o.redis, "--port", std::to_string(redis_port_), "--bind", "127.0.0.1",
                    "--unixsocket", redis_sock_, "--save", "", "--appendonly", "no",
                    "--protected-mode", "no", "--maxmemory", "0", "--proto-max-bulk-len", "64mb"},
                   dir_ + "/redis.log");
    std::vector<std::string> args = {o.kvdnd,
                                     "--data-dir",
                                     dir_ + "/kvdn",
                                     "--unix-socket",
                                     dir_ + "/kvdnd.sock",
                                     "--grpc-address",
                                     "127.0.0.1:0",
                                     "--http-address",
                                     "none",
                                     "--host-tier-bytes",
                                     std::to_string(o.host_tier_bytes),
                                     "--no-disk-tier",
                                     "--ready-file",
                                     dir_ + "/ready.json",
                                     "--log-level",
                                     "warn"};
    args.insert(args.end(), o.kvdnd_args.begin(), o.kvdnd_args.end());
    kvdnd_ = Spawn(args, dir_ + "/kvdnd.log");
    for (int i = 0; i < 400 && grpc_port_ == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      const std::string j = CommandOutput(("cat " + dir_ + "/ready.json 2>/dev/null").c_str());
      const size_t at = j.find("\"grpc_port\": ");
      if (at != std::string::npos) grpc_port_ = std::atoi(j.c_str() + at + 13);
    }
    if (grpc_port_ == 0) {
      error_ = "kvdnd did not start: " + CommandOutput(("cat " + dir_ + "/kvdnd.log").c_str());
      return;
    }
    // kvdnd faults its host arena in on a background thread: wait for that to end (its stats say
    // when), so it does not take CPU from the first measurements.
    auto admin = v1::AdminService::NewStub(client::MakeChannel(kvdn_unix(), o.admin_token));
    for (int i = 0; i < 1200; ++i) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      v1::GetStatsResponse s;
      if (!admin->GetStats(&ctx, {}, &s).ok()) break;
      bool done = true;
      for (const auto& t : s.tiers()) done = done && t.prefaulted_bytes() >= t.capacity_bytes();
      if (done) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    for (int i = 0; i < 100; ++i) {  // redis listening
      if (redisContext* rc = redisConnectUnix(redis_sock_.c_str()); rc != nullptr) {
        const bool up = rc->err == 0;
        redisFree(rc);
        if (up) return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    error_ = "redis-server did not start: " + CommandOutput(("cat " + dir_ + "/redis.log").c_str());
  }
  ~Servers() {
    if (kvdnd_ > 0) Stop(kvdnd_);
    if (redis_ > 0) Stop(redis_);
    std::filesystem::remove_all(dir_);
  }
  Servers(const Servers&) = delete;
  Servers& operator=(const Servers&) = delete;

  const std::string& error() const { return error_; }
  const std::string& dir() const { return dir_; }
  std::string kvdn_tcp() const { return absl::StrCat("127.0.0.1:", grpc_port_); }
  std::string kvdn_unix() const { return "unix:" + dir_ + "/kvdnd.sock"; }
  int redis_port() const { return redis_port_; }
  const std::string& redis_sock() const { return redis_sock_; }
  // Empties Redis (keeps its memory bounded between configurations).
  void FlushRedis() const {
    if (redisContext* rc = redisConnectUnix(redis_sock_.c_str()); rc != nullptr) {
      if (void* r = redisCommand(rc, "FLUSHALL")) freeReplyObject(r);
      redisFree(rc);
    }
  }

 private:
  std::string dir_, redis_sock_, error_;
  pid_t redis_ = -1, kvdnd_ = -1;
  int redis_port_ = 0, grpc_port_ = 0;
};

// One system under test, as the benchmarks drive it: per-client connections doing put/get.
class Conn {
 public:
  // A subclass with its own FreeBuffer has released the buffers already (ReleaseBuffer).
  virtual ~Conn() {
    delete[] buffer_.data();
    delete[] source_.data();
  }
  virtual bool Put(int key, ByteSpan value) = 0;
  virtual bool Get(int key, MutableByteSpan dst) = 0;
  // This connection's buffer of `size` bytes for Get, kept for the next call of the same size:
  // the system's registered memory where it has some.
  MutableByteSpan Buffer(size_t size) { return Keep(buffer_, size); }
  // A copy of `value` in this connection's second buffer (of the same kind), to Put from: what an
  // engine that stages its KV in the SDK's registered memory hands over.
  ByteSpan Source(const std::vector<uint8_t>& value) {
    MutableByteSpan b = Keep(source_, value.size());
    if (source_of_ != &value) {
      std::memcpy(b.data(), value.data(), value.size());
      source_of_ = &value;
    }
    return b;
  }

 protected:
  virtual MutableByteSpan AllocateBuffer(size_t size) {
    return MutableByteSpan(new uint8_t[size](), size);
  }
  virtual void FreeBuffer(MutableByteSpan b) { delete[] b.data(); }
  // Subclasses whose FreeBuffer needs their own members call this in their destructor.
  void ReleaseBuffer() {
    for (MutableByteSpan* b : {&buffer_, &source_}) {
      if (b->data() != nullptr) FreeBuffer(*b);
      *b = MutableByteSpan();
    }
  }

 private:
  MutableByteSpan Keep(MutableByteSpan& b, size_t size) {
    if (b.size() != size) {
      if (b.data() != nullptr) FreeBuffer(b);
      b = AllocateBuffer(size);
      if (&b == &source_) source_of_ = nullptr;
    }
    return b;
  }
  MutableByteSpan buffer_;
  MutableByteSpan source_;
  const std::vector<uint8_t>* source_of_ = nullptr;
};

class KvdnConn final : public Conn {
 public:
  // `tune`, when set, changes the client's options last (lanes, parts, ...).
  KvdnConn(const std::string& target, client::ClientOptions::DataPlane data_plane,
           const std::string& ucx_transports = "", uint64_t receive_pool_bytes = 0,
           const std::function<void(client::ClientOptions&)>& tune = nullptr) {
    client::ClientOptions o;
    o.target = target;
    o.model = {"bench", 1, 1, 64, Dtype::kBFloat16, 256};
    o.data_plane = data_plane;
    o.ucx_transports = ucx_transports;
    o.receive_pool_bytes = receive_pool_bytes;
    if (tune) tune(o);
    auto c = client::Client::Connect(o);
    if (!c.ok()) {
      std::fprintf(stderr, "kvdn connect %s: %s\n", target.c_str(), c.status().ToString().c_str());
      std::exit(1);
    }
    c_ = std::move(*c);
  }
  bool Put(int key, ByteSpan value) override {
    auto r = c_->PutEncoded(testing::KeyFor(key, "bench"), value);
    if (!r.ok()) Report("put", r.status());
    return r.ok();
  }
  bool Get(int key, MutableByteSpan dst) override {
    auto r = c_->GetEncoded(testing::KeyFor(key, "bench"), dst);
    if (!r.ok()) Report("get", r.status());
    return r.ok() && *r == dst.size();
  }
  ~KvdnConn() override { ReleaseBuffer(); }
  client::Client& client() { return *c_; }

 protected:
  // From the client's registered receive pool when it has one (receive_pool_bytes).
  MutableByteSpan AllocateBuffer(size_t size) override {
    MutableByteSpan b = c_->AllocateBuffer(size);
    if (b.data() != nullptr) {
      pooled_.insert(b.data());
      return b;
    }
    return Conn::AllocateBuffer(size);
  }
  void FreeBuffer(MutableByteSpan b) override {
    if (pooled_.erase(b.data()) != 0) {
      c_->FreeBuffer(b);
    } else {
      Conn::FreeBuffer(b);
    }
  }

 private:
  static void Report(const char* op, const absl::Status& st) {
    std::fprintf(stderr, "kvdn %s: %s\n", op, st.ToString().c_str());
  }
  std::unique_ptr<client::Client> c_;
  std::set<const uint8_t*> pooled_;
};

class RedisConn final : public Conn {
 public:
  // Over the unix socket `unix_path`, or TCP 127.0.0.1:`port` when it is empty.
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
inline Result Drive(const std::function<std::unique_ptr<Conn>()>& connect, int clients,
                    double seconds, uint64_t bytes_per_op,
                    const std::function<bool(Conn&, uint64_t)>& op) {
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

// Put then Get of `value` through `connect`'s system with `clients` clients for `seconds` each:
// after a round trip checked bit for bit, each Put (from Conn::Source) writes a new key from
// `key_base` on (kvdn
// keys are content-addressed: a repeat would be a no-op), each Get reads one of the last keys
// written (at most `get_window_bytes` of them — keep it well below kvdnd's host tier, so none
// has been evicted) into a buffer of the system's
// kind. {put, get}; both !ok when the round trip fails.
inline std::pair<Result, Result> PutThenGet(const std::function<std::unique_ptr<Conn>()>& connect,
                                            int clients, double seconds,
                                            const std::vector<uint8_t>& value, int key_base,
                                            uint64_t get_window_bytes = 256ull << 20) {
  std::pair<Result, Result> r;
  {
    auto conn = connect();
    MutableByteSpan back = conn->Buffer(value.size());
    const int probe = key_base + 999999;
    const bool round_trip = conn->Put(probe, value) && conn->Get(probe, back) &&
                            std::memcmp(back.data(), value.data(), value.size()) == 0;
    if (!round_trip) {
      r.first.ok = r.second.ok = false;
      return r;
    }
  }
  r.first = Drive(connect, clients, seconds, value.size(),
                  [&](Conn& c, uint64_t i) { return c.Put(key_base + int(i), c.Source(value)); });
  const uint64_t keys =
      std::max<uint64_t>(1, std::min<uint64_t>(r.first.ops, get_window_bytes / value.size()));
  const int first = key_base + static_cast<int>(r.first.ops - keys);
  r.second = Drive(connect, clients, seconds, value.size(), [&](Conn& c, uint64_t i) {
    return c.Get(first + int(i % keys), c.Buffer(value.size()));
  });
  return r;
}

// Where the two ucx_perftest processes run: by default both on this host over loopback; a
// prefix (e.g. {"ip", "netns", "exec", "ns1"}) runs one inside a network namespace, and
// `server_ip` is then the server's address as the client reaches it.
struct PerftestPair {
  std::string perftest = "ucx_perftest";
  std::vector<std::string> server_prefix;
  std::vector<std::string> client_prefix;
  std::string server_ip = "127.0.0.1";
  std::vector<std::string> env;  // "NAME=value" for both, besides UCX_TLS
};

// ucx_perftest ucp_am_bw between two processes: GB/s (1e9 bytes/s) of `size`-byte messages over
// `tls` (with peer error handling, -e, when `error_handling`), 0 when it fails (`note` says why).
inline double PerftestGbps(const PerftestPair& p, const std::string& tls, size_t size,
                           bool error_handling, std::string* note) {
  const int port = FreeLoopbackPort();
  const int iters = static_cast<int>(std::clamp<uint64_t>((6ull << 30) / size, 60, 3000));
  const std::string flags =
      absl::StrFormat("-p %d -t ucp_am_bw -s %u -n %d -w %d%s", port, size, iters,
                      std::max(10, iters / 10), error_handling ? " -e" : "");
  const std::string log = absl::StrFormat("/tmp/kvdn-perftest-%d.log", getpid());
  std::vector<std::string> args = p.server_prefix;
  args.push_back(p.perftest);
  for (absl::string_view f : absl::StrSplit(flags, ' ')) args.emplace_back(f);
  std::vector<std::string> env = p.env;
  env.push_back("UCX_TLS=" + tls);
  const pid_t server = Spawn(args, log, env);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const std::string out = CommandOutput(
      absl::StrCat(absl::StrJoin(p.client_prefix, " "), " env ", absl::StrJoin(env, " "),
                   " timeout 120 ", p.perftest, " ", p.server_ip, " ", flags, " 2>&1")
          .c_str());
  kill(server, SIGKILL);
  waitpid(server, nullptr, 0);
  std::remove(log.c_str());
  // "Final: iters p50 avg overall bw_avg bw_overall rate_avg rate_overall", bandwidth in 2^20
  // bytes per second.
  const size_t at = out.find("Final:");
  if (at == std::string::npos) {
    const size_t err = out.find("no active messages transport");
    *note = err != std::string::npos ? out.substr(err, 60) : "ucx_perftest failed";
    return 0;
  }
  std::vector<std::string> cols =
      absl::StrSplit(out.substr(at, out.find('\n', at) - at), ' ', absl::SkipEmpty());
  double mbps = 0;
  if (cols.size() < 7 || !absl::SimpleAtod(cols[6], &mbps)) {
    *note = "unparsed ucx_perftest output";
    return 0;
  }
  return mbps * 1048576.0 / 1e9;
}

// The median of `v` (0 when empty).
inline double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// "1,4,32" -> {1, 4, 32}; entries that are not positive integers are dropped.
inline std::vector<int> ParseList(const std::string& s) {
  std::vector<int> out;
  for (absl::string_view p : absl::StrSplit(s, ',')) {
    int v = 0;
    if (absl::SimpleAtoi(p, &v) && v > 0) out.push_back(v);
  }
  return out;
}

}  // namespace kvdn::bench

#endif  // KVDN_BENCH_LOOPBACK_UTIL_H_
