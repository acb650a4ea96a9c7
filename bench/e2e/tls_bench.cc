// tls_bench: what TLS (config tls) costs kvdn's gRPC path over TCP loopback: Put and Get of whole
// chunks (1 and 4 MiB) with 1 and 4 clients, and the small Lookup call one at a time, against a
// plain kvdnd and one with TLS on its TCP listener, in the same run (rounds alternate which goes
// first; figures are medians). The plain kvdnd is the ceiling TLS is measured against. Certificates
// are made with openssl in a temp dir (P-256 keys; gRPC negotiates TLS 1.3 with AES-GCM).
//   tls_bench [--sizes-mib 1,4] [--clients 1,4] [--seconds 2] [--rounds 3] [--lookups 2000]
//             [--kvdnd PATH]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench_util.h"
#include "kvdn/client/client.h"
#include "kvdn/testing/chunks.h"
#include "loopback_util.h"

namespace kvdn::bench {
namespace {

// A CA and a certificate for 127.0.0.1 it signs, in `dir`; false with the command that failed.
bool MakeCerts(const std::string& dir, std::string* error) {
  std::ofstream(dir + "/server.ext") << "subjectAltName=IP:127.0.0.1\n";
  const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  const std::string cmds[] = {
      absl::StrCat("openssl req -x509 ", key, " -keyout ", dir, "/ca.key -out ", dir,
                   "/ca.pem -days 2 -subj /CN=kvdn-bench-ca"),
      absl::StrCat("openssl req ", key, " -keyout ", dir, "/server.key -out ", dir,
                   "/server.csr -subj /CN=kvdnd"),
      absl::StrCat("openssl x509 -req -in ", dir, "/server.csr -CA ", dir, "/ca.pem -CAkey ", dir,
                   "/ca.key -CAcreateserial -out ", dir, "/server.pem -days 2 -extfile ", dir,
                   "/server.ext"),
  };
  for (const std::string& c : cmds) {
    if (std::system((c + " >/dev/null 2>&1").c_str()) != 0) {
      *error = c;
      return false;
    }
  }
  return true;
}

// p50 of `n` Lookups of a 4-chunk prefix, one at a time, in microseconds.
double LookupP50Us(client::Client& c, int n) {
  const std::vector<int32_t> tokens = testing::RandomTokens(1024, 7);
  Latencies l;
  for (int i = 0; i < n; ++i) {
    const auto t0 = Clock::now();
    if (!c.Lookup(tokens).ok()) return -1;
    l.Add(Seconds(t0, Clock::now()));
  }
  return l.Percentile(0.5) * 1e6;
}

}  // namespace
}  // namespace kvdn::bench

int main(int argc, char** argv) {
  using namespace kvdn::bench;  // NOLINT
  std::vector<int> sizes = {1, 4}, clients_list = {1, 4};
  double seconds = 2;
  int rounds = 3, lookups = 2000;
  std::string kvdnd = KVDN_KVDND_PATH;
  std::string cmdline = argv[0];
  for (int i = 1; i < argc; ++i) cmdline += std::string(" ") + argv[i];
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    auto ints = [&](std::vector<int>* out) {
      out->clear();
      for (absl::string_view p : absl::StrSplit(v, ',')) {
        int x = 0;
        if (absl::SimpleAtoi(p, &x)) out->push_back(x);
      }
    };
    if (a == "--sizes-mib") {
      ints(&sizes);
    } else if (a == "--clients") {
      ints(&clients_list);
    } else if (a == "--seconds") {
      seconds = std::atof(v.c_str());
    } else if (a == "--rounds") {
      rounds = std::atoi(v.c_str());
    } else if (a == "--lookups") {
      lookups = std::atoi(v.c_str());
    } else if (a == "--kvdnd") {
      kvdnd = v;
    } else {
      std::fprintf(stderr,
                   "usage: tls_bench [--sizes-mib 1,4] [--clients 1,4] [--seconds S] [--rounds N] "
                   "[--lookups N] [--kvdnd PATH]\n");
      return 2;
    }
  }
  char tmpl[] = "/tmp/kvdn-tls-bench.XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  std::string err;
  if (!MakeCerts(dir, &err)) {
    std::fprintf(stderr, "making certificates failed: %s\n", err.c_str());
    return 1;
  }
  std::ofstream(dir + "/tls.json")
      << R"({"tls": {"cert_file": ")" << dir << R"(/server.pem", "key_file": ")" << dir
      << R"(/server.key"}})";
  Servers plain({.kvdnd = kvdnd, .host_tier_bytes = 2ull << 30});
  Servers tls({.kvdnd = kvdnd,
               .host_tier_bytes = 2ull << 30,
               .kvdnd_args = {"--config", dir + "/tls.json"}});
  if (!plain.error().empty() || !tls.error().empty()) {
    std::fprintf(stderr, "%s%s\n", plain.error().c_str(), tls.error().c_str());
    return 1;
  }
  const std::string ca = dir + "/ca.pem";
  auto connect = [&](bool with_tls) {
    const std::string target = with_tls ? tls.kvdn_tcp() : plain.kvdn_tcp();
    return [target, with_tls, ca] {
      return std::unique_ptr<Conn>(new KvdnConn(target,
                                                kvdn::client::ClientOptions::DataPlane::kGrpc, "",
                                                0, [&](kvdn::client::ClientOptions& o) {
                                                  if (with_tls) o.tls.ca_file = ca;
                                                }));
    };
  };
  std::printf(
      "# tls: kvdnd gRPC over TCP loopback, plain vs TLS\n# command: %s\n# cpu: %s (%u "
      "cores)\n# date: %s\n",
      cmdline.c_str(), CpuModel().c_str(), std::thread::hardware_concurrency(),
      CommandOutput("date -u +%FT%TZ").c_str());
  std::printf(
      "\n| op | value | clients | plain GB/s | TLS GB/s | TLS/plain (range) | plain p50/p99 ms "
      "| TLS p50/p99 ms |\n|---|---|---|---|---|---|---|---|\n");
  int key_base = 0;
  bool ok = true;
  for (int mib : sizes) {
    const kvdn::ChunkInfo info = kvdn::testing::InfoForBytes(uint64_t(mib) << 20, 1);
    const std::vector<uint8_t> value = kvdn::testing::RandomChunk(info, mib);
    for (int clients : clients_list) {
      std::vector<double> gbps[2][2], p50[2][2], p99[2][2], ratio[2];
      for (int round = 0; round < rounds; ++round) {
        Result r[2][2];  // [op][plain, tls]
        for (int k = 0; k < 2; ++k) {
          const int s = (round + k) % 2;
          std::tie(r[0][s], r[1][s]) =
              PutThenGet(connect(s == 1), clients, seconds, value, key_base);
          ok = ok && r[0][s].ok && r[1][s].ok;
          key_base += 1000000;
        }
        for (int op = 0; op < 2; ++op) {
          for (int s = 0; s < 2; ++s) {
            gbps[op][s].push_back(r[op][s].gbps);
            p50[op][s].push_back(r[op][s].p50_ms);
            p99[op][s].push_back(r[op][s].p99_ms);
          }
          ratio[op].push_back(r[op][0].gbps > 0 ? r[op][1].gbps / r[op][0].gbps : 0);
        }
      }
      for (int op = 0; op < 2; ++op) {
        const auto [lo, hi] = std::minmax_element(ratio[op].begin(), ratio[op].end());
        std::printf(
            "| %s | %d MiB | %d | %.2f | %.2f | %.2f (%.2f-%.2f) | %.2f / %.2f | %.2f / "
            "%.2f |\n",
            op == 0 ? "put" : "get", mib, clients, Median(gbps[op][0]), Median(gbps[op][1]),
            Median(ratio[op]), *lo, *hi, Median(p50[op][0]), Median(p99[op][0]), Median(p50[op][1]),
            Median(p99[op][1]));
        std::fflush(stdout);
      }
    }
  }
  // The small call: a Lookup of a 1024-token prefix, one at a time, on one connection each.
  std::vector<double> lp[2];
  for (int round = 0; round < rounds; ++round) {
    for (int k = 0; k < 2; ++k) {
      const int s = (round + k) % 2;
      auto conn = connect(s == 1)();
      lp[s].push_back(LookupP50Us(static_cast<KvdnConn&>(*conn).client(), lookups));
    }
  }
  std::printf(
      "\n| call | plain p50 us | TLS p50 us | TLS - plain us |\n|---|---|---|---|\n"
      "| Lookup (4 chunks) | %.0f | %.0f | %.0f |\n",
      Median(lp[0]), Median(lp[1]), Median(lp[1]) - Median(lp[0]));
  std::printf(
      "\nGB/s = value bytes moved / wall time, all clients together; each client a thread "
      "with its own connection (TLS session); payloads as gRPC frames (with TLS the UCX "
      "data plane does not serve tcp clients). Medians of %d rounds; TLS/plain is the "
      "median of the per-round ratios.\n",
      rounds);
  std::system(("rm -rf " + dir).c_str());
  return ok ? 0 : 1;
}
