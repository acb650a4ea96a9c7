// kvdnctl: inspect and manage a kvdnd. Human tables by default, --json for scripts; errors go to
// stderr with a non-zero exit code (1: the daemon refused or failed the call, 2: bad usage,
// 3: the daemon is unreachable or unhealthy).
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "cli/output.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "kvdn/client/client.h"
#include "kvdn/v1/admin_service.grpc.pb.h"

namespace kvdn::cli {
namespace {

struct Globals {
  std::string target;
  bool json = false;
  double timeout_s = 10;
};

const char* TierName(v1::Tier t) {
  switch (t) {
    case v1::TIER_GPU:
      return "gpu";
    case v1::TIER_HOST:
      return "host";
    case v1::TIER_DISK:
      return "disk";
    case v1::TIER_REMOTE:
      return "remote";
    default:
      return "-";
  }
}

int Fail(const grpc::Status& st, const char* what) {
  std::fprintf(stderr, "kvdnctl %s: %s: %s\n", what,
               absl::StatusCodeToString(static_cast<absl::StatusCode>(st.error_code())).c_str(),
               st.error_message().c_str());
  return st.error_code() == grpc::StatusCode::UNAVAILABLE ||
                 st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED
             ? 3
             : 1;
}

void SetDeadline(grpc::ClientContext* ctx, const Globals& g) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(g.timeout_s * 1000)));
}

int Stats(v1::AdminService::Stub& stub, const Globals& g) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, g);
  v1::GetStatsResponse r;
  if (auto st = stub.GetStats(&ctx, {}, &r); !st.ok()) return Fail(st, "stats");
  if (g.json) {
    std::printf("%s", ToJson(r).c_str());
    return 0;
  }
  std::string transports;
  for (const auto& t : r.transports())
    absl::StrAppend(&transports, transports.empty() ? "" : ",", t);
  std::printf("node %s  version %s  uptime %llds  transports %s%s\n", r.node().c_str(),
              r.version().c_str(), static_cast<long long>(r.uptime_seconds()), transports.c_str(),
              r.draining() ? "  DRAINING" : "");
  Table t({"TIER", "CHUNKS", "BYTES", "USED", "CAPACITY", "HITS", "MISSES", "EVICTIONS",
           "PROMOTIONS", "CHECKSUM_FAILURES"});
  for (const auto& ts : r.tiers()) {
    if (!ts.present()) continue;
    t.Add({TierName(ts.tier()), absl::StrCat(ts.chunks()), HumanBytes(ts.bytes()),
           HumanBytes(ts.used_bytes()), HumanBytes(ts.capacity_bytes()), absl::StrCat(ts.hits()),
           absl::StrCat(ts.misses()), absl::StrCat(ts.evictions()), absl::StrCat(ts.promotions()),
           absl::StrCat(ts.checksum_failures())});
  }
  std::printf("%s", t.Render().c_str());
  for (const auto& ts : r.tiers()) {
    if (ts.present() && ts.prefaulted_bytes() < ts.capacity_bytes()) {
      std::printf("%s tier: %s of %s faulted in (writes into the rest take page faults)\n",
                  TierName(ts.tier()), HumanBytes(ts.prefaulted_bytes()).c_str(),
                  HumanBytes(ts.capacity_bytes()).c_str());
    }
  }
  if (r.namespaces_size() > 0) {
    Table n({"NAMESPACE", "TIER", "BYTES", "SHARE", "OF_SHARE"});
    for (const auto& u : r.namespaces()) {
      n.Add({u.namespace_(), TierName(u.tier()), HumanBytes(u.bytes()), HumanBytes(u.share_bytes()),
             u.share_bytes() == 0
                 ? "-"
                 : absl::StrFormat("%.0f%%", 100.0 * static_cast<double>(u.bytes()) /
                                                 static_cast<double>(u.share_bytes()))});
    }
    std::printf("%s", n.Render().c_str());
  }
  std::printf(
      "commits %llu (refused %llu)  reservations %llu active, %llu expired  leases %llu "
      "active, %llu expired  in %s  out %s\n",
      static_cast<unsigned long long>(r.commits()),
      static_cast<unsigned long long>(r.commit_failures()),
      static_cast<unsigned long long>(r.reservations_active()),
      static_cast<unsigned long long>(r.reservations_expired()),
      static_cast<unsigned long long>(r.leases_active()),
      static_cast<unsigned long long>(r.leases_expired()), HumanBytes(r.bytes_in()).c_str(),
      HumanBytes(r.bytes_out()).c_str());
  return 0;
}

int List(v1::AdminService::Stub& stub, const Globals& g, const std::string& ns,
         const std::string& tier, uint32_t page_size, const std::string& page_token, bool all) {
  v1::ListChunksRequest req;
  req.set_namespace_(ns);
  if (tier == "gpu") {
    req.set_tier(v1::TIER_GPU);
  } else if (tier == "host") {
    req.set_tier(v1::TIER_HOST);
  } else if (tier == "disk") {
    req.set_tier(v1::TIER_DISK);
  } else if (!tier.empty()) {
    std::fprintf(stderr, "kvdnctl ls: --tier must be gpu, host or disk, not \"%s\"\n",
                 tier.c_str());
    return 2;
  }
  req.set_page_size(page_size);
  req.set_page_token(page_token);
  v1::ListChunksResponse merged;
  for (;;) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, g);
    v1::ListChunksResponse r;
    if (auto st = stub.ListChunks(&ctx, req, &r); !st.ok()) return Fail(st, "ls");
    for (auto& c : *r.mutable_chunks()) *merged.add_chunks() = std::move(c);
    merged.set_total(r.total());
    merged.set_next_page_token(r.next_page_token());
    if (!all || r.next_page_token().empty()) break;
    req.set_page_token(r.next_page_token());
  }
  if (g.json) {
    std::printf("%s", ToJson(merged).c_str());
    return 0;
  }
  Table t({"KEY", "TIER", "ON_DISK", "SIZE", "LEASES"});
  for (const auto& c : merged.chunks()) {
    t.Add({c.key_text(), TierName(c.tier()), c.on_disk() ? "yes" : "no", HumanBytes(c.size()),
           absl::StrCat(c.leases())});
  }
  std::printf("%s", t.Render().c_str());
  std::printf("%d of %llu chunk(s)%s\n", merged.chunks_size(),
              static_cast<unsigned long long>(merged.total()),
              merged.next_page_token().empty()
                  ? ""
                  : absl::StrCat("; next page: --page-token ", merged.next_page_token()).c_str());
  return 0;
}

int Inspect(v1::AdminService::Stub& stub, const Globals& g, const std::string& key) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, g);
  v1::InspectChunkRequest req;
  req.set_key_text(key);
  v1::InspectChunkResponse r;
  if (auto st = stub.InspectChunk(&ctx, req, &r); !st.ok()) return Fail(st, "inspect");
  if (g.json) {
    std::printf("%s", ToJson(r).c_str());
  } else {
    const auto& c = r.chunk();
    std::printf(
        "key          %s\ntier         %s%s\nsize         %s (%llu bytes)\nleases       %u\n"
        "dtype        %s\nlayers       %u\nkv_heads     %u\nhead_dim     %u\ntokens       %u\n"
        "payload      %llu bytes\nchecksum     %016llx (XXH3-64)\nchecksum_ok  %s%s\n",
        c.key_text().c_str(), TierName(c.tier()), c.on_disk() ? " (+ disk copy)" : "",
        HumanBytes(c.size()).c_str(), static_cast<unsigned long long>(c.size()), c.leases(),
        r.dtype().c_str(), r.num_layers(), r.num_kv_heads(), r.head_dim(), r.num_tokens(),
        static_cast<unsigned long long>(r.payload_bytes()),
        static_cast<unsigned long long>(r.payload_checksum()), r.checksum_ok() ? "yes" : "NO",
        r.checksum_ok() ? "" : absl::StrCat(" (", r.checksum_error(), ")").c_str());
  }
  return r.checksum_ok() ? 0 : 1;
}

int Evict(v1::AdminService::Stub& stub, const Globals& g, const std::string& key,
          const std::string& ns) {
  if (key.empty() == ns.empty()) {
    std::fprintf(stderr, "kvdnctl evict: give a KEY or --namespace NS (one of the two)\n");
    return 2;
  }
  grpc::ClientContext ctx;
  SetDeadline(&ctx, g);
  v1::EvictRequest req;
  if (!key.empty()) {
    req.set_key_text(key);
  } else {
    req.set_namespace_(ns);
  }
  v1::EvictResponse r;
  if (auto st = stub.Evict(&ctx, req, &r); !st.ok()) return Fail(st, "evict");
  if (g.json) {
    std::printf("%s", ToJson(r).c_str());
  } else {
    std::printf("evicted %llu chunk(s)\n", static_cast<unsigned long long>(r.evicted()));
  }
  return 0;
}

int Config(v1::AdminService::Stub& stub, const Globals& g) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, g);
  v1::GetConfigResponse r;
  if (auto st = stub.GetConfig(&ctx, {}, &r); !st.ok()) return Fail(st, "config");
  std::printf("%s", r.json().c_str());  // a config file's JSON in both modes
  if (!r.json().empty() && r.json().back() != '\n') std::printf("\n");
  return 0;
}

int Members(v1::AdminService::Stub& stub, const Globals& g) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, g);
  v1::ListMembersResponse r;
  if (auto st = stub.ListMembers(&ctx, {}, &r); !st.ok()) return Fail(st, "members");
  if (g.json) {
    std::printf("%s", ToJson(r).c_str());
    return 0;
  }
  Table t({"NODE", "GRPC", "HTTP", "LEASE_AGE", "CHUNKS", "SELF"});
  for (const auto& m : r.members()) {
    t.Add({m.node(), m.grpc_address(), m.http_address(), absl::StrCat(m.lease_age_seconds(), "s"),
           m.has_chunks() ? absl::StrCat(m.chunks()) : "-", m.self() ? "*" : ""});
  }
  std::printf("cluster %s\n%s", r.cluster().empty() ? "(single node)" : r.cluster().c_str(),
              t.Render().c_str());
  return 0;
}

int Health(const std::shared_ptr<grpc::Channel>& channel, const Globals& g) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, g);
  grpc::health::v1::HealthCheckResponse r;
  grpc::Status st = stub->Check(&ctx, {}, &r);
  if (!st.ok()) return Fail(st, "health");
  const bool serving = r.status() == grpc::health::v1::HealthCheckResponse::SERVING;
  if (g.json) {
    std::printf("%s", ToJson(r).c_str());
  } else {
    std::printf("%s\n",
                grpc::health::v1::HealthCheckResponse::ServingStatus_Name(r.status()).c_str());
  }
  return serving ? 0 : 3;
}

}  // namespace
}  // namespace kvdn::cli

int main(int argc, char** argv) {
  using namespace kvdn::cli;  // NOLINT: main of the tool
  CLI::App app{"kvdnctl: inspect and manage a kvdnd"};
  app.require_subcommand(1);
  Globals g;
  app.add_option(
      "-t,--target", g.target,
      "kvdnd address: unix:/path or host:port (default: $KVDN_TARGET, else the local unix "
      "socket)");
  kvdn::client::TlsOptions tls;
  app.add_option("--tls-ca-file", tls.ca_file,
                 "CA bundle that signs kvdnd's certificate: TLS to a kvdnd whose TCP listener has "
                 "it (not for unix sockets)");
  app.add_option("--tls-cert-file", tls.cert_file,
                 "this client's certificate, for a kvdnd with tls.require_client_cert");
  app.add_option("--tls-key-file", tls.key_file, "the key of --tls-cert-file");
  app.add_option("--tls-server-name", tls.server_name,
                 "the name in kvdnd's certificate, when it is not the target's host");
  std::string token_file;
  app.add_option("--token-file", token_file,
                 "file holding a token with the kvdn:admin grant, for a kvdnd with "
                 "auth_tokens_file (default: $KVDN_TOKEN, else the file $KVDN_TOKEN_FILE names)");
  app.add_flag("--json", g.json, "print JSON instead of tables");
  app.add_option("--timeout", g.timeout_s, "seconds to wait for the daemon")
      ->check(CLI::PositiveNumber);
  auto* stats = app.add_subcommand("stats", "tier and store statistics");
  std::string ns, tier, page_token, key;
  uint32_t page_size = 100;
  bool all = false;
  auto* ls = app.add_subcommand("ls", "list chunks (key order, paged)");
  ls->add_option("-n,--namespace", ns, "only this namespace");
  ls->add_option("--tier", tier, "only chunks with a copy in this tier: gpu, host, disk");
  ls->add_option("--page-size", page_size, "chunks per page (1..10000)")
      ->check(CLI::Range(1, 10000));
  ls->add_option("--page-token", page_token, "continue after this key");
  ls->add_flag("--all", all, "fetch every page");
  auto* inspect = app.add_subcommand("inspect", "one chunk: header, tier, size, checksum");
  inspect->add_option("KEY", key, "ns/fp16hex/hash32hex")->required();
  std::string evict_key;
  auto* evict = app.add_subcommand("evict", "remove one chunk, or every chunk of a namespace");
  evict->add_option("KEY", evict_key, "ns/fp16hex/hash32hex");
  evict->add_option("-n,--namespace", ns, "every chunk of this namespace");
  auto* config = app.add_subcommand("config", "the daemon's effective config (JSON)");
  auto* health = app.add_subcommand("health", "grpc.health.v1 status; exit 0 when SERVING");
  auto* members = app.add_subcommand("members", "cluster members");
  CLI11_PARSE(app, argc, argv);

  std::string token;
  if (!token_file.empty()) {
    std::ifstream in(token_file);
    if (!in) {
      std::cerr << "kvdnctl: --token-file: cannot read " << token_file << "\n";
      return 2;
    }
    std::stringstream ss;
    ss << in.rdbuf();
    token = std::string(absl::StripAsciiWhitespace(ss.str()));
    if (token.empty()) {
      std::cerr << "kvdnctl: --token-file: " << token_file << " is empty\n";
      return 2;
    }
  }
  absl::StatusOr<std::string> resolved = kvdn::client::ResolveToken(token);
  if (!resolved.ok()) {
    std::cerr << "kvdnctl: " << resolved.status().message() << "\n";
    return 2;
  }
  if (absl::Status st = kvdn::client::ValidateTlsOptions(tls, "--tls-"); !st.ok()) {
    std::string message(st.message());
    absl::StrReplaceAll({{"--tls-ca_file", "--tls-ca-file"},
                         {"--tls-cert_file", "--tls-cert-file"},
                         {"--tls-key_file", "--tls-key-file"},
                         {"--tls-server_name", "--tls-server-name"}},
                        &message);
    std::cerr << "kvdnctl: " << message << "\n";
    return 2;
  }
  auto channel = kvdn::client::MakeChannel(g.target, *resolved, tls);
  auto stub = kvdn::v1::AdminService::NewStub(channel);
  if (*stats) return Stats(*stub, g);
  if (*ls) return List(*stub, g, ns, tier, page_size, page_token, all);
  if (*inspect) return Inspect(*stub, g, key);
  if (*evict) return Evict(*stub, g, evict_key, ns);
  if (*config) return Config(*stub, g);
  if (*health) return Health(channel, g);
  if (*members) return Members(*stub, g);
  return 2;
}
