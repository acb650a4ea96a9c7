// transfer_bench: kvdn Get and Put of whole chunks through a real kvdnd over its UCX data plane,
// over shared memory (a client on the daemon's unix socket: posix + cma) and over tcp (a client on
// the daemon's TCP port with UCX_TLS tcp), beside, in the same run:
//   (a) ucx_perftest ucp_am_bw on the same UCX transports and message size (the ceiling; for tcp
//       with peer error handling on, as kvdn runs it, and off, for reference),
//   (b) Redis 7 SET/GET of the same values (unix socket beside shm, TCP beside tcp),
//   (c) kvdn's own gRPC path (streamed frames) on the same socket.
// Then it checks issue 4's targets against the figures of this run.
//
//   transfer_bench [--sizes-mib 1,4,32] [--clients 1,4] [--seconds 2] [--transports shm,tcp]
//                  [--rounds 3] [--kvdnd PATH] [--redis PATH] [--ucx-perftest PATH]
//                  [--no-receive-pool] [--host-tier-mib 4096] [--get-window-mib 256]
//                  [--systems ucx,perftest,redis,grpc] [--lanes N] [--part-kib N]
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kvdn/common/chunk_format.h"
#include "kvdn/transfer/ucx_transport.h"
#include "loopback_util.h"

namespace kvdn::bench {
namespace {

using DataPlane = client::ClientOptions::DataPlane;

struct Options {
  std::vector<int> sizes_mib = {1, 4, 32};
  std::vector<int> clients = {1, 4};
  std::vector<std::string> transports = {"shm", "tcp"};
  double seconds = 2;
  std::string kvdnd = KVDN_KVDND_PATH;
  std::string redis = "redis-server";
  std::string ucx_perftest = "ucx_perftest";
  bool receive_pool = true;
  int host_tier_mib = 4096;
  // Gets cycle over the chunks of the last this many MiB written (at most a quarter of the host
  // tier); one chunk's worth keeps it in the CPU caches, as ucx_perftest's one buffer is.
  int get_window_mib = 256;
  int rounds = 3;
  int data_plane_threads = 0;  // kvdnd's --data-plane-threads; 0: its default
  int lanes = 0;               // the client's data_plane_lanes; 0: its default
  int part_kib = -1;           // the client's part_bytes in KiB (0: whole); -1: its default
  // What to measure: kvdn over UCX ("ucx"), ucx_perftest, Redis, kvdn over gRPC. Leaving some
  // out is for diagnosis (profiling one of them); a recorded run measures all.
  std::set<std::string> systems = {"ucx", "perftest", "redis", "grpc"};
};

// UCX_TLS for a transport of this benchmark: what kvdn's client and daemon use for it.
std::string UcxTls(const std::string& transport) {
  return transport == "shm" ? "posix,cma" : "tcp";
}

// ucx_perftest ucp_am_bw between two processes on this host, as `o` names it, with the UCX
// settings kvdn gives itself (UcxTunedSettings) unless `ucx_defaults`.
double PerftestGbps(const Options& o, const std::string& tls, size_t size, bool error_handling,
                    std::string* note, bool ucx_defaults = false) {
  PerftestPair p;
  p.perftest = o.ucx_perftest;
  if (!ucx_defaults) p.env = kvdn::transfer::UcxTunedSettings();
  return kvdn::bench::PerftestGbps(p, tls, size, error_handling, note);
}

// The result of the median run by throughput (a zero Result when there was none).
Result Median(std::vector<Result> v) {
  if (v.empty()) return {};
  std::sort(v.begin(), v.end(), [](const Result& a, const Result& b) { return a.gbps < b.gbps; });
  return v[v.size() / 2];
}

struct Row {
  std::string transport;
  std::string op;
  int mib = 0;
  int clients = 0;
  Result ucx, redis, grpc;
  double ceiling = 0;  // ucx_perftest as kvdn runs UCX on this transport
};

}  // namespace
}  // namespace kvdn::bench

int main(int argc, char** argv) {
  using namespace kvdn::bench;  // NOLINT
  Options o;
  std::string cmdline = argv[0];
  for (int i = 1; i < argc; ++i) cmdline += std::string(" ") + argv[i];
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--sizes-mib") {
      o.sizes_mib = ParseList(val());
    } else if (a == "--clients") {
      o.clients = ParseList(val());
    } else if (a == "--seconds") {
      o.seconds = std::atof(val().c_str());
    } else if (a == "--transports") {
      o.transports = absl::StrSplit(val(), ',', absl::SkipEmpty());
    } else if (a == "--kvdnd") {
      o.kvdnd = val();
    } else if (a == "--redis") {
      o.redis = val();
    } else if (a == "--ucx-perftest") {
      o.ucx_perftest = val();
    } else if (a == "--systems") {
      o.systems.clear();
      for (absl::string_view v : absl::StrSplit(val(), ',', absl::SkipEmpty())) {
        o.systems.emplace(v);
      }
    } else if (a == "--data-plane-threads") {
      o.data_plane_threads = std::atoi(val().c_str());
    } else if (a == "--rounds") {
      o.rounds = std::max(1, std::atoi(val().c_str()));
    } else if (a == "--host-tier-mib") {
      o.host_tier_mib = std::atoi(val().c_str());
    } else if (a == "--get-window-mib") {
      o.get_window_mib = std::max(1, std::atoi(val().c_str()));
    } else if (a == "--lanes") {
      o.lanes = std::atoi(val().c_str());
    } else if (a == "--part-kib") {
      o.part_kib = std::atoi(val().c_str());

    } else if (a == "--no-receive-pool") {
      o.receive_pool = false;
    } else {
      std::fprintf(stderr,
                   "usage: transfer_bench [--sizes-mib 1,4,32] [--clients 1,4] [--seconds S] "
                   "[--transports shm,tcp] [--kvdnd PATH] [--redis PATH] [--ucx-perftest PATH] "
                   "[--no-receive-pool] [--host-tier-mib N] [--get-window-mib N] [--rounds N] "
                   "[--data-plane-threads N] [--lanes N] [--part-kib N]"
                   "[--systems "
                   "ucx,perftest,redis,grpc]\n");
      return 2;
    }
  }
  for (const std::string& t : o.transports) {
    if (t != "shm" && t != "tcp") {
      std::fprintf(stderr, "--transports: unknown transport \"%s\" (shm or tcp)\n", t.c_str());
      return 2;
    }
  }
  for (const std::string& v : o.systems) {
    if (v != "ucx" && v != "perftest" && v != "redis" && v != "grpc") {
      std::fprintf(stderr, "--systems: unknown system \"%s\" (ucx, perftest, redis, grpc)\n",
                   v.c_str());
      return 2;
    }
  }
  if (o.sizes_mib.empty() || o.clients.empty() || o.seconds <= 0) {
    std::fprintf(stderr, "--sizes-mib, --clients and --seconds need positive values\n");
    return 2;
  }

  std::printf(
      "# transfer: kvdn over UCX vs ucx_perftest ucp_am_bw, Redis, and kvdn over gRPC, loopback\n"
      "# command: %s\n# cpu: %s (%u cores)\n# ucx: %s\n# redis: %s\n# date: %s\n",
      cmdline.c_str(), CpuModel().c_str(), std::thread::hardware_concurrency(),
      CommandOutput("ucx_info -v | head -1 | sed 's/^# *//'").c_str(),
      CommandOutput((o.redis + " --version").c_str()).c_str(),
      CommandOutput("date -u +%FT%TZ").c_str());
  std::vector<std::string> kvdnd_args;
  if (o.data_plane_threads > 0) {
    kvdnd_args = {"--data-plane-threads", std::to_string(o.data_plane_threads)};
  }
  Servers servers({.kvdnd = o.kvdnd,
                   .redis = o.redis,
                   .host_tier_bytes = uint64_t(o.host_tier_mib) << 20,
                   .kvdnd_args = kvdnd_args});
  if (!servers.error().empty()) {
    std::fprintf(stderr, "%s\n", servers.error().c_str());
    return 1;
  }

  std::vector<Row> rows;
  // tcp: without peer error handling; with UCX's own settings (not kvdn's).
  std::map<std::pair<std::string, int>, std::pair<double, double>> ceiling_other;
  bool all_ok = true;
  int key_base = 0;
  for (int mib : o.sizes_mib) {
    // One encoded chunk of about `mib` MiB; every key holds these bytes.
    const kvdn::ChunkInfo info = kvdn::testing::InfoForBytes(uint64_t(mib) << 20, 1);
    const std::vector<uint8_t> value = kvdn::testing::RandomChunk(info, mib);
    for (const std::string& transport : o.transports) {
      const bool shm = transport == "shm";
      const std::string target = shm ? servers.kvdn_unix() : servers.kvdn_tcp();
      const std::string tls = UcxTls(transport);
      const uint64_t pool = o.receive_pool ? 2 * value.size() + (1 << 20) : 0;
      std::function<std::unique_ptr<Conn>()> systems[3] = {
          [&] {
            return std::unique_ptr<Conn>(new KvdnConn(target, DataPlane::kUcx, tls, pool,
                                                      [&](kvdn::client::ClientOptions& c) {
                                                        c.data_plane_lanes = o.lanes;
                                                        if (o.part_kib >= 0)
                                                          c.part_bytes = uint64_t(o.part_kib) << 10;
                                                      }));
          },
          [&] {
            return std::unique_ptr<Conn>(shm ? new RedisConn(servers.redis_sock(), 0)
                                             : new RedisConn("", servers.redis_port()));
          },
          [&] { return std::unique_ptr<Conn>(new KvdnConn(target, DataPlane::kGrpc)); },
      };
      if (mib == o.sizes_mib.front()) {
        KvdnConn probe(target, DataPlane::kUcx, tls);
        std::printf("# %s: kvdn data plane in use: %s\n", transport.c_str(),
                    probe.client().DataPlaneInUse().c_str());
      }
      const char* names[3] = {"ucx", "redis", "grpc"};
      for (int clients : o.clients) {
        // `rounds` rounds, each measuring every system once, back to back (this VM's loopback
        // speed drifts by tens of percent within minutes); each figure is the median round.
        std::vector<Result> put[3], get[3];
        std::vector<double> ceiling, ceiling_no_eh, ceiling_ucx_defaults;
        for (int round = 0; round < o.rounds; ++round) {
          if (o.systems.count("perftest") != 0) {
            // The ceiling, as kvdn runs UCX on this transport: shared memory without peer error
            // handling, tcp with it (transfer/README.md).
            std::string note;
            ceiling.push_back(PerftestGbps(o, tls, value.size(), /*error_handling=*/!shm, &note));
            if (ceiling.back() == 0) {
              std::fprintf(stderr, "ucx_perftest over %s: %s\n", tls.c_str(), note.c_str());
            }
            if (!shm) {
              ceiling_no_eh.push_back(PerftestGbps(o, tls, value.size(), false, &note));
              ceiling_ucx_defaults.push_back(
                  PerftestGbps(o, tls, value.size(), true, &note, /*ucx_defaults=*/true));
            }
          }
          for (int s = 0; s < 3; ++s) {
            if (o.systems.count(names[s]) == 0) continue;
            auto [p, g] = PutThenGet(systems[s], clients, o.seconds, value, key_base,
                                     std::min<uint64_t>(uint64_t(o.get_window_mib) << 20,
                                                        (uint64_t(o.host_tier_mib) << 20) / 4));
            key_base += 1000000;
            if (s == 1) servers.FlushRedis();
            if (!p.ok || !g.ok) {
              std::fprintf(stderr, "%s, %d MiB, %d clients, %s: failed\n", transport.c_str(), mib,
                           clients, names[s]);
              all_ok = false;
            }
            put[s].push_back(p);
            get[s].push_back(g);
          }
        }
        if (!ceiling_no_eh.empty()) {
          ceiling_other[{transport, mib}] = {Median(ceiling_no_eh), Median(ceiling_ucx_defaults)};
        }
        const double c = Median(ceiling);
        rows.push_back(
            {transport, "get", mib, clients, Median(get[0]), Median(get[1]), Median(get[2]), c});
        rows.push_back(
            {transport, "put", mib, clients, Median(put[0]), Median(put[1]), Median(put[2]), c});
        for (int r = 2; r > 0; --r) {
          const Row& w = rows[rows.size() - r];
          std::printf(
              "## %s %s %d MiB x%d: kvdn/ucx %.2f GB/s  perftest %.2f  redis %.2f  grpc %.2f\n",
              w.transport.c_str(), w.op.c_str(), w.mib, w.clients, w.ucx.gbps, w.ceiling,
              w.redis.gbps, w.grpc.gbps);
        }
        std::fflush(stdout);
      }
    }
  }

  std::printf(
      "\n| transport | op | value | clients | kvdn UCX GB/s | ucx_perftest GB/s | kvdn/perftest "
      "| Redis GB/s | kvdn/Redis | kvdn gRPC GB/s | UCX/gRPC | kvdn UCX p50/p99 ms | Redis "
      "p50/p99 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& w : rows) {
    auto ratio = [](double a, double b) { return b > 0 ? a / b : 0; };
    std::printf(
        "| %s | %s | %d MiB | %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f / %.2f | "
        "%.2f / %.2f |\n",
        w.transport.c_str(), w.op.c_str(), w.mib, w.clients, w.ucx.gbps, w.ceiling,
        ratio(w.ucx.gbps, w.ceiling), w.redis.gbps, ratio(w.ucx.gbps, w.redis.gbps), w.grpc.gbps,
        ratio(w.ucx.gbps, w.grpc.gbps), w.ucx.p50_ms, w.ucx.p99_ms, w.redis.p50_ms, w.redis.p99_ms);
  }
  if (!ceiling_other.empty()) {
    std::printf(
        "\nucx_perftest over tcp (a) without peer error handling (kvdn cannot run so: a dead tcp "
        "peer would abort the process), (b) with UCX's own settings instead of kvdn's (%s):\n\n"
        "| value | (a) GB/s | (b) GB/s |\n|---|---|---|\n",
        absl::StrJoin(kvdn::transfer::UcxTunedSettings(), " ").c_str());
    for (const auto& [k, v] : ceiling_other) {
      std::printf("| %d MiB | %.2f | %.2f |\n", k.second, v.first, v.second);
    }
  }

  // Issue 4's targets, from the rows above.
  std::printf("\nTargets (issue 4):\n");
  for (const Row& w : rows) {
    if (w.mib >= 4) {
      const double f = w.ceiling > 0 ? w.ucx.gbps / w.ceiling : 0;
      std::printf("- %s %s %d MiB x%d: kvdn %.2f of ucx_perftest (>= 0.80): %s\n",
                  w.transport.c_str(), w.op.c_str(), w.mib, w.clients, f,
                  f >= 0.8 ? "met" : "MISSED");
    }
    if (w.mib == 4 && w.op == "get") {
      const double f = w.redis.gbps > 0 ? w.ucx.gbps / w.redis.gbps : 0;
      std::printf("- %s get 4 MiB x%d: kvdn %.2fx Redis GET (>= 2.5x): %s\n", w.transport.c_str(),
                  w.clients, f, f >= 2.5 ? "met" : "MISSED");
    }
  }
  std::printf(
      "\nGB/s = value bytes moved / wall time (1e9 bytes/s), all clients together; each client "
      "is a thread with its own connection (kvdn: its own UCX worker). kvdn Get is GetEncoded "
      "(the whole encoded chunk; the client does not re-hash it, as Load does) and Put is "
      "PutEncoded (kvdnd verifies the payload's XXH3 before it stores), "
      "%s; Redis GET copies the reply into a buffer. "
      "ucx_perftest = one sender and one receiver process, ucp_am_bw, message = value size, "
      "measured in each round beside the others (so once per client count). Every figure is the "
      "median of %d rounds; each round measures every system back to back.\n",
      o.receive_pool ? "into and from the client's registered pool (receive_pool_bytes)"
                     : "into and from heap buffers",
      o.rounds);
  return all_ok ? 0 : 1;
}
