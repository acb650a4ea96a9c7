// rpc_latency_bench: the latency of the small calls an engine makes for every request — Lookup of
// a prefix, GetDescriptors (lease a run of chunks), Release of those leases — and of the other
// calls of KvService (GetDescriptor, small Put streams, Delete), one at a time through the SDK
// against a real kvdnd over its unix socket, with their tail (p99.9, max, calls over 50 ms),
// beside Redis 7 PING and GET of a small value from the same process over Redis's unix socket, in
// the same run (the floor of a request/response over a local socket). With --auth 1, the kvdn rows
// run a second time against a kvdnd that authenticates tenants (auth_tokens_file), the client
// sending its token with every call: what tenant isolation costs a call.
//   rpc_latency_bench [--calls 10000] [--rounds 2] [--auth 0|1] [--kvdnd PATH] [--redis PATH]
#include <hiredis/hiredis.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "bench_util.h"
#include "kvdn/client/client.h"
#include "kvdn/common/chunk_key.h"
#include "loopback_util.h"

namespace kvdn::bench {
namespace {

struct Tail {
  double p50 = 0, p99 = 0, p999 = 0, max = 0;
  int over_50ms = 0;
};

Tail Measure(int calls, const std::function<bool()>& call) {
  std::vector<double> ms;
  ms.reserve(static_cast<size_t>(calls));
  for (int i = 0; i < calls; ++i) {
    const auto t0 = Clock::now();
    if (!call()) {
      std::fprintf(stderr, "call %d failed\n", i);
      std::exit(1);
    }
    ms.push_back(Seconds(t0, Clock::now()) * 1e3);
  }
  Tail t;
  for (double x : ms) t.over_50ms += x > 50 ? 1 : 0;
  std::sort(ms.begin(), ms.end());
  t.p50 = ms[ms.size() / 2];
  t.p99 = ms[ms.size() * 99 / 100];
  t.p999 = ms[ms.size() * 999 / 1000];
  t.max = ms.back();
  return t;
}

int Main(int argc, char** argv) {
  int calls = 10000, rounds = 2;
  bool auth = false;
  Servers::Options so;
  so.kvdnd = KVDN_KVDND_PATH;
  so.host_tier_bytes = 1ull << 30;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--calls") {
      calls = std::max(100, std::atoi(argv[i + 1]));
    } else if (a == "--rounds") {
      rounds = std::max(1, std::atoi(argv[i + 1]));
    } else if (a == "--auth") {
      auth = std::atoi(argv[i + 1]) != 0;
    } else if (a == "--kvdnd") {
      so.kvdnd = argv[i + 1];
    } else if (a == "--redis") {
      so.redis = argv[i + 1];
    } else {
      std::fprintf(stderr,
                   "usage: rpc_latency_bench [--calls N] [--rounds N] [--auth 0|1] [--kvdnd PATH] "
                   "[--redis PATH]\n");
      return 2;
    }
  }
  Servers servers(so);
  if (!servers.error().empty()) {
    std::fprintf(stderr, "%s\n", servers.error().c_str());
    return 1;
  }
  // The second kvdnd, with tenant tokens: the same calls, each carrying a token.
  constexpr char kToken[] = "rpc-bench-token-0123456789abcdef";
  constexpr char kAdminToken[] = "rpc-bench-admin-0123456789abcdef";
  std::unique_ptr<Servers> with_tokens;
  if (auth) {
    const std::string dir = servers.dir();
    std::ofstream(dir + "/tokens") << kToken << " rpc-bench\n" << kAdminToken << " kvdn:admin\n";
    std::ofstream(dir + "/auth.json") << R"({"auth_tokens_file": ")" << dir << R"(/tokens"})";
    Servers::Options ao = so;
    ao.kvdnd_args.insert(ao.kvdnd_args.end(), {"--config", dir + "/auth.json"});
    ao.admin_token = kAdminToken;
    with_tokens = std::make_unique<Servers>(ao);
    if (!with_tokens->error().empty()) {
      std::fprintf(stderr, "%s\n", with_tokens->error().c_str());
      return 1;
    }
  }
  // A client of each kvdnd, with a request of 8 chunks and a small chunk stored.
  struct Kvdn {
    std::string name;
    std::unique_ptr<client::Client> c;
  };
  std::vector<Kvdn> kvdns;
  client::ClientOptions o;
  o.ns = "rpc-bench";
  o.model = {"rpc-bench-model", 4, 2, 64, Dtype::kBFloat16, 256};
  o.data_plane = client::ClientOptions::DataPlane::kGrpc;  // the calls under test are gRPC anyway
  std::vector<int32_t> tokens(8 * 256);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i * 7 + 3);
  const std::vector<uint8_t> small = testing::RandomChunk(testing::InfoForBytes(64 << 10), 11);
  const ChunkKey small_key = testing::KeyFor(1, o.ns);
  for (Servers* s : {&servers, with_tokens.get()}) {
    if (s == nullptr) continue;
    o.target = s->kvdn_unix();
    o.token = s == &servers ? "" : kToken;
    auto c = client::Client::Connect(o);
    if (!c.ok()) {
      std::fprintf(stderr, "%s\n", c.status().ToString().c_str());
      return 1;
    }
    std::vector<std::vector<uint8_t>> payloads;
    for (uint64_t n : (*c)->ChunkPayloadSizes(tokens.size())) payloads.emplace_back(n, 0x5a);
    std::vector<ByteSpan> spans(payloads.begin(), payloads.end());
    if (auto saved = (*c)->Save(tokens, spans); !saved.ok()) {
      std::fprintf(stderr, "Save: %s\n", saved.status().ToString().c_str());
      return 1;
    }
    if (auto put = (*c)->PutEncoded(small_key, small); !put.ok()) {
      std::fprintf(stderr, "PutEncoded: %s\n", put.status().ToString().c_str());
      return 1;
    }
    kvdns.push_back({s == &servers ? "kvdn" : "kvdn+token", *std::move(c)});
  }
  auto keys = ChunkKeysForTokens(o.ns, o.model, tokens, /*include_tail=*/true);
  if (!keys.ok()) return 1;
  redisContext* redis = redisConnectUnix(servers.redis_sock().c_str());
  if (redis == nullptr || redis->err != 0) {
    std::fprintf(stderr, "cannot connect to redis-server\n");
    return 1;
  }
  if (void* r = redisCommand(redis, "SET k %b", "0123456789abcdef", size_t{16})) {
    freeReplyObject(r);
  }
  auto redis_call = [&](const char* cmd) {
    auto* r = static_cast<redisReply*>(redisCommand(redis, cmd));
    const bool ok = r != nullptr && r->type != REDIS_REPLY_ERROR;
    if (r != nullptr) freeReplyObject(r);
    return ok;
  };

  std::printf("# rpc_latency_bench: %d calls a row, one at a time, over unix sockets\n", calls);
  std::printf("# cpu: %s (%u cores); kvdnd: %s\n# redis: %s\n# date: %s\n", CpuModel().c_str(),
              std::thread::hardware_concurrency(), so.kvdnd.c_str(),
              CommandOutput((so.redis + " --version").c_str()).c_str(),
              CommandOutput("date -u +%FT%TZ").c_str());
  std::printf(
      "\n| round | call | p50 ms | p99 ms | p99.9 ms | max ms | calls over 50 ms "
      "|\n|---|---|---|---|---|---|---|\n");
  auto row = [&](int round, const char* name, const Tail& t) {
    std::printf("| %d | %s | %.3f | %.3f | %.3f | %.2f | %d |\n", round, name, t.p50, t.p99, t.p999,
                t.max, t.over_50ms);
    std::fflush(stdout);
  };
  std::vector<client::TransferDescriptor> held;
  for (int r = 1; r <= rounds; ++r) {
    for (Kvdn& k : kvdns) {
      client::Client* c = k.c.get();
      auto name = [&](const char* call) { return absl::StrFormat("%s %s", k.name, call); };
      row(r, name("Lookup (8 chunks)").c_str(),
          Measure(calls, [&] { return c->Lookup(tokens).ok(); }));
      // A load's leasing and its end: GetDescriptors of the 8 chunks, then one Release of them.
      row(r, name("GetDescriptors (8) + Release (8)").c_str(), Measure(calls, [&] {
            auto ds = c->AcquireDescriptors(*keys, absl::ZeroDuration());
            if (!ds.ok() || ds->size() != keys->size()) return false;
            held = *std::move(ds);
            return c->ReleaseDescriptors(held).ok();
          }));
      row(r, name("Release alone (8, NOT_FOUND)").c_str(),
          Measure(calls, [&] { return absl::IsNotFound(c->ReleaseDescriptors(held)); }));
      row(r, name("GetDescriptor (1) + Release (1)").c_str(), Measure(calls, [&] {
            auto d = c->AcquireDescriptor((*keys)[0], absl::ZeroDuration());
            return d.ok() && c->ReleaseDescriptor(*d).ok();
          }));
      // A Put stream whose chunk is stored already: kvdnd answers after the header.
      row(r, name("Put of a stored chunk (64 KiB)").c_str(),
          Measure(calls, [&] { return c->PutEncoded(small_key, small).ok(); }));
      // Reserve, frames, commit of new chunks; then Delete of each (on kvdnd's blocking pool: it
      // reaches the disk tier).
      int next = 0;
      row(r, name("Put of a new chunk (64 KiB)").c_str(), Measure(calls, [&] {
            auto put = c->PutEncoded(testing::KeyFor(1000 + next++, o.ns), small);
            return put.ok() && *put;
          }));
      next = 0;
      row(r, name("Delete (64 KiB chunk)").c_str(),
          Measure(calls, [&] { return c->Delete(testing::KeyFor(1000 + next++, o.ns)).ok(); }));
    }
    row(r, "Redis PING", Measure(calls, [&] { return redis_call("PING"); }));
    row(r, "Redis GET (16 B)", Measure(calls, [&] { return redis_call("GET k"); }));
  }
  redisFree(redis);
  return 0;
}

}  // namespace
}  // namespace kvdn::bench

int main(int argc, char** argv) { return kvdn::bench::Main(argc, argv); }
