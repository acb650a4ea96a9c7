#include "kvdn/daemon/config.h"

#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/algorithm/container.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "google/protobuf/util/json_util.h"
#include "kvdn/common/chunk_key.h"
#include "kvdn/common/defaults.h"

namespace kvdn::daemon {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;

// Free bytes on the filesystem holding `path` (or its nearest existing parent).
uint64_t FreeDiskBytes(std::string path) {
  while (!path.empty()) {
    struct statvfs st;
    if (statvfs(path.c_str(), &st) == 0) return uint64_t{st.f_bavail} * st.f_frsize;
    const size_t slash = path.find_last_of('/');
    if (slash == std::string::npos || slash == 0) {
      path = slash == 0 ? "/" : "";
      if (path == "/") {
        if (statvfs("/", &st) == 0) return uint64_t{st.f_bavail} * st.f_frsize;
        return 0;
      }
    } else {
      path.resize(slash);
    }
  }
  return 0;
}

absl::Status Bad(absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("config field ", field, ": ", why));
}

// The whole file, trimmed; nullopt when it cannot be read.
std::optional<std::string> ReadTrimmed(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::stringstream ss;
  ss << in.rdbuf();
  return std::string(absl::StripAsciiWhitespace(ss.str()));
}

// A byte count from a cgroup file; nullopt for "max", a v1 "no limit" (>= 2^62), or junk.
std::optional<uint64_t> ReadLimit(const std::string& path) {
  std::optional<std::string> text = ReadTrimmed(path);
  uint64_t v = 0;
  if (!text || *text == "max" || !absl::SimpleAtoi(*text, &v) || v >= (uint64_t{1} << 62)) {
    return std::nullopt;
  }
  return v;
}

// limit - usage for a cgroup directory holding both files, or nullopt if it has no limit.
std::optional<uint64_t> Headroom(const std::string& dir, const char* limit_file,
                                 const char* usage_file) {
  std::optional<uint64_t> limit = ReadLimit(absl::StrCat(dir, "/", limit_file));
  if (!limit) return std::nullopt;
  uint64_t usage = 0;
  if (std::optional<std::string> u = ReadTrimmed(absl::StrCat(dir, "/", usage_file))) {
    (void)absl::SimpleAtoi(*u, &usage);
  }
  return *limit > usage ? *limit - usage : 0;
}

}  // namespace

uint64_t MemoryAvailableToProcess(const std::string& root) {
  std::optional<uint64_t> avail;
  {
    std::ifstream in(absl::StrCat(root, "/proc/meminfo"));
    std::string line;
    while (std::getline(in, line)) {
      if (!absl::StartsWith(line, "MemAvailable:")) continue;
      std::vector<absl::string_view> parts = absl::StrSplit(line, ' ', absl::SkipEmpty());
      uint64_t kib = 0;
      if (parts.size() >= 2 && absl::SimpleAtoi(parts[1], &kib)) avail = kib * 1024;
    }
  }
  // The cgroups this process is in (/proc/self/cgroup): "0::/path" (v2) or
  // "N:memory[,...]:/path" (v1). Every level from there up to the mount may carry a limit.
  std::ifstream in(absl::StrCat(root, "/proc/self/cgroup"));
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> f = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (f.size() != 3) continue;
    const bool v2 = f[0] == "0" && f[1].empty();
    const bool v1 = absl::c_linear_search(absl::StrSplit(f[1], ','), "memory");
    if (!v2 && !v1) continue;
    const std::string mount = absl::StrCat(root, v2 ? "/sys/fs/cgroup" : "/sys/fs/cgroup/memory");
    const char* limit_file = v2 ? "memory.max" : "memory.limit_in_bytes";
    const char* usage_file = v2 ? "memory.current" : "memory.usage_in_bytes";
    // In a container with its own cgroup namespace the path is "/" and the mount is the
    // container's cgroup; without one the path names the cgroup below the host's mount (or,
    // where the runtime mounted only the container's own cgroup there, nothing: then the
    // mount itself is it).
    std::string rel(absl::StripSuffix(f[2], "/"));
    std::string dir = absl::StrCat(mount, rel);
    if (!ReadTrimmed(absl::StrCat(dir, "/", limit_file))) {
      rel.clear();
      dir = mount;
    }
    for (;;) {
      if (std::optional<uint64_t> h = Headroom(dir, limit_file, usage_file)) {
        avail = avail ? std::min(*avail, *h) : *h;
      }
      if (rel.empty()) break;
      const size_t slash = rel.find_last_of('/');
      rel.resize(slash == std::string::npos ? 0 : slash);
      dir = absl::StrCat(mount, rel);
    }
  }
  return avail.value_or(0);
}

absl::StatusOr<v1::DaemonConfig> ParseConfigJson(absl::string_view json) {
  v1::DaemonConfig config;
  google::protobuf::util::JsonParseOptions opts;
  opts.ignore_unknown_fields = false;
  auto st = google::protobuf::util::JsonStringToMessage(
      google::protobuf::StringPiece(json.data(), json.size()), &config, opts);
  if (!st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config is not valid JSON for kvdn.v1.DaemonConfig: ", st.message().ToString()));
  }
  return config;
}

absl::StatusOr<v1::DaemonConfig> LoadConfigFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open config file ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto config = ParseConfigJson(ss.str());
  if (!config.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

void ApplyDefaults(v1::DaemonConfig* c) {
  if (c->node_name().empty()) {
    char host[256] = {};
    gethostname(host, sizeof(host) - 1);
    c->set_node_name(host[0] ? host : "kvdn-node");
  }
  if (c->data_dir().empty()) c->set_data_dir(DefaultDataDir());
  if (c->unix_socket().empty())
    c->set_unix_socket(
        absl::StrCat(c->data_dir(), "/kvdnd.sock"));  // DefaultUnixSocket() by default
  if (c->grpc_address().empty()) c->set_grpc_address("127.0.0.1:7070");
  if (c->http_address().empty()) c->set_http_address("127.0.0.1:9470");
  if (c->host_tier_bytes() == 0) {
    const uint64_t avail = MemoryAvailableToProcess();
    c->set_host_tier_bytes(std::clamp<uint64_t>(avail / 4, 64 * kMiB, 64 * kGiB));
  }
  if (c->disk_tier_bytes() == 0 && !c->disk_tier_disabled()) {
    const uint64_t free_bytes = FreeDiskBytes(c->data_dir());
    c->set_disk_tier_bytes(std::clamp<uint64_t>(free_bytes / 2, 64 * kMiB, 1024 * kGiB));
  }
  if (c->high_watermark() == 0) c->set_high_watermark(0.95);
  if (c->low_watermark() == 0) c->set_low_watermark(0.90);
  if (c->namespace_host_share() == 0) c->set_namespace_host_share(1.0);
  if (c->namespace_disk_share() == 0) c->set_namespace_disk_share(1.0);
  if (c->namespace_gpu_share() == 0) c->set_namespace_gpu_share(1.0);
  if (c->max_frame_bytes() == 0) c->set_max_frame_bytes(1 << 20);
  if (c->get_frame_bytes() == 0) {
    c->set_get_frame_bytes(std::min<uint32_t>(512 << 10, c->max_frame_bytes()));
  }
  if (c->unix_socket_send_buffer_bytes() == 0) c->set_unix_socket_send_buffer_bytes(4 << 20);
  if (c->max_concurrent_streams() == 0) c->set_max_concurrent_streams(64);
  if (c->max_call_duration_ms() == 0) c->set_max_call_duration_ms(60000);
  if (c->reservation_ttl_ms() == 0) c->set_reservation_ttl_ms(30000);
  if (c->max_lease_ttl_ms() == 0) c->set_max_lease_ttl_ms(300000);
  if (c->max_message_bytes() == 0) c->set_max_message_bytes((4 << 20) + (64 << 10));
  if (c->max_threads() == 0) c->set_max_threads(64);
  if (c->drain_timeout_ms() == 0) c->set_drain_timeout_ms(10000);
  if (c->log_level().empty()) c->set_log_level("info");
  if (c->data_plane_transports().empty()) c->set_data_plane_transports("auto");
  if (c->max_data_plane_sessions() == 0) c->set_max_data_plane_sessions(1024);
  if (c->cluster_name().empty()) c->set_cluster_name("default");
  if (c->membership_ttl_ms() == 0) c->set_membership_ttl_ms(10000);
  if (c->replicas() == 0) c->set_replicas(1);
  if (c->peer_timeout_ms() == 0) c->set_peer_timeout_ms(1000);
  if (c->replication_queue_limit() == 0) c->set_replication_queue_limit(4096);
  if (c->data_plane_threads() == 0) {
    c->set_data_plane_threads(std::clamp(std::thread::hardware_concurrency(), 2u, 8u));
  }
  if (c->has_tls() && c->tls().refresh_seconds() == 0) c->mutable_tls()->set_refresh_seconds(60);
  if (c->has_etcd_tls() && c->etcd_tls().refresh_seconds() == 0) {
    c->mutable_etcd_tls()->set_refresh_seconds(60);
  }
}

namespace {

// The TLS fields: both of cert_file and key_file or neither, the files readable, a CA where it is
// needed.
absl::Status ValidateTls(const v1::DaemonConfig& c) {
  if (!c.has_tls()) return absl::OkStatus();
  const v1::TlsConfig& t = c.tls();
  const bool on = !t.cert_file().empty() || !t.key_file().empty();
  if (!on) {
    if (!t.ca_file().empty() || t.require_client_cert() || !t.server_name().empty() ||
        t.allow_clear_data_plane()) {
      return Bad("tls.cert_file", "is empty: set it and tls.key_file to turn TLS on");
    }
    return absl::OkStatus();
  }
  if (t.cert_file().empty()) return Bad("tls.cert_file", "is empty while tls.key_file is set");
  if (t.key_file().empty()) return Bad("tls.key_file", "is empty while tls.cert_file is set");
  for (const auto& [field, path] :
       {std::pair<const char*, const std::string&>{"tls.cert_file", t.cert_file()},
        {"tls.key_file", t.key_file()},
        {"tls.ca_file", t.ca_file()}}) {
    if (path.empty()) continue;
    if (::access(path.c_str(), R_OK) != 0) {
      return Bad(field, absl::StrCat("\"", path, "\" cannot be read: ", std::strerror(errno)));
    }
  }
  if (t.require_client_cert() && t.ca_file().empty()) {
    return Bad("tls.ca_file", "is empty: tls.require_client_cert needs the CA that signs clients");
  }
  if (c.etcd_endpoints_size() > 0 && t.ca_file().empty()) {
    return Bad("tls.ca_file",
               "is empty: in a cluster (etcd_endpoints) peers verify each other's certificates "
               "against it");
  }
  if (t.refresh_seconds() > 86400) {
    return Bad("tls.refresh_seconds", absl::StrCat(t.refresh_seconds(), " is above 86400"));
  }
  if (c.grpc_address() == "none" && c.etcd_endpoints_size() == 0) {
    return Bad("tls.cert_file", "is set but grpc_address is \"none\": no TCP listener to secure");
  }
  return absl::OkStatus();
}

// etcd_tls: only with etcd_endpoints, a CA, both of cert_file and key_file or neither, the
// files readable.
absl::Status ValidateEtcdTls(const v1::DaemonConfig& c) {
  if (!c.has_etcd_tls()) return absl::OkStatus();
  const v1::EtcdTlsConfig& t = c.etcd_tls();
  if (c.etcd_endpoints_size() == 0) return Bad("etcd_tls", "is set without etcd_endpoints");
  if (t.ca_file().empty()) {
    return Bad("etcd_tls.ca_file",
               "is empty: set it (the CA that signs etcd's certificates) to reach etcd over TLS");
  }
  if (t.cert_file().empty() != t.key_file().empty()) {
    return t.cert_file().empty()
               ? Bad("etcd_tls.cert_file", "is empty while etcd_tls.key_file is set")
               : Bad("etcd_tls.key_file", "is empty while etcd_tls.cert_file is set");
  }
  for (const auto& [field, path] :
       {std::pair<const char*, const std::string&>{"etcd_tls.ca_file", t.ca_file()},
        {"etcd_tls.cert_file", t.cert_file()},
        {"etcd_tls.key_file", t.key_file()}}) {
    if (!path.empty() && ::access(path.c_str(), R_OK) != 0) {
      return Bad(field, absl::StrCat("\"", path, "\" cannot be read: ", std::strerror(errno)));
    }
  }
  if (t.refresh_seconds() > 86400) {
    return Bad("etcd_tls.refresh_seconds", absl::StrCat(t.refresh_seconds(), " is above 86400"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateConfig(const v1::DaemonConfig& c) {
  if (c.node_name().size() > 253) return Bad("node_name", "longer than 253 characters");
  if (c.data_dir().empty() || c.data_dir()[0] != '/') {
    return Bad("data_dir", absl::StrCat("must be an absolute path, got \"", c.data_dir(), "\""));
  }
  if (c.unix_socket() != "none") {
    if (c.unix_socket()[0] != '/')
      return Bad("unix_socket", "must be an absolute path or \"none\"");
    if (c.unix_socket().size() > 107) {
      return Bad("unix_socket", "longer than the 107 bytes a socket path may have");
    }
  }
  if (c.grpc_address() != "none" && !ValidHostPort(c.grpc_address())) {
    return Bad("grpc_address", absl::StrCat("\"", c.grpc_address(), "\" is not host:port"));
  }
  if (c.http_address() != "none" && !ValidHostPort(c.http_address())) {
    return Bad("http_address", absl::StrCat("\"", c.http_address(), "\" is not host:port"));
  }
  if (c.unix_socket() == "none" && c.grpc_address() == "none") {
    return Bad("grpc_address", "and unix_socket are both \"none\": nothing to serve on");
  }
  if (c.host_tier_bytes() < 4 * kMiB) return Bad("host_tier_bytes", "below the 4 MiB minimum");
  if (!c.disk_tier_disabled() && c.disk_tier_bytes() < 4 * kMiB) {
    return Bad("disk_tier_bytes", "below the 4 MiB minimum");
  }
  if (c.gpu_tier_bytes() != 0 && c.gpu_tier_bytes() < 4 * kMiB) {
    return Bad("gpu_tier_bytes", "below the 4 MiB minimum (0 disables the GPU tier)");
  }
  if (c.gpu_device() < 0) return Bad("gpu_device", "negative");
  for (const auto& [name, share] : {std::pair{"namespace_host_share", c.namespace_host_share()},
                                    std::pair{"namespace_disk_share", c.namespace_disk_share()},
                                    std::pair{"namespace_gpu_share", c.namespace_gpu_share()}}) {
    if (!(share > 0 && share <= 1)) return Bad(name, absl::StrCat(share, " is outside (0, 1]"));
  }
  if (!(c.low_watermark() > 0 && c.low_watermark() < c.high_watermark() &&
        c.high_watermark() <= 1)) {
    return Bad("low_watermark", absl::StrCat("need 0 < low_watermark (", c.low_watermark(),
                                             ") < high_watermark (", c.high_watermark(), ") <= 1"));
  }
  if (c.max_frame_bytes() < 4096 || c.max_frame_bytes() > (4u << 20)) {
    return Bad("max_frame_bytes", absl::StrCat(c.max_frame_bytes(), " is outside [4096, 4 MiB]"));
  }
  if (c.get_frame_bytes() < 4096 || c.get_frame_bytes() > c.max_frame_bytes()) {
    return Bad("get_frame_bytes",
               absl::StrCat(c.get_frame_bytes(), " is outside [4096, max_frame_bytes ",
                            c.max_frame_bytes(), "]"));
  }
  if (c.unix_socket_send_buffer_bytes() < 4096 ||
      c.unix_socket_send_buffer_bytes() > (256u << 20)) {
    return Bad("unix_socket_send_buffer_bytes",
               absl::StrCat(c.unix_socket_send_buffer_bytes(), " is outside [4096, 256 MiB]"));
  }
  if (c.max_message_bytes() < c.max_frame_bytes() + 1024) {
    return Bad("max_message_bytes", "must exceed max_frame_bytes by at least 1024");
  }
  if (c.max_concurrent_streams() > 100000) return Bad("max_concurrent_streams", "above 100000");
  if (c.max_call_duration_ms() < 100) return Bad("max_call_duration_ms", "below 100 ms");
  if (c.reservation_ttl_ms() < 10) return Bad("reservation_ttl_ms", "below 10 ms");
  if (c.max_lease_ttl_ms() < 100) return Bad("max_lease_ttl_ms", "below 100 ms");
  for (int i = 0; i < c.etcd_endpoints_size(); ++i) {
    const std::string& e = c.etcd_endpoints(i);
    if (!ValidHostPort(e)) {
      return Bad(absl::StrCat("etcd_endpoints[", i, "]"),
                 absl::StrCat("\"", e, "\" is not host:port"));
    }
  }
  if (c.cluster_name().size() > 63 ||
      c.cluster_name().find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                         "0123456789._-") != std::string::npos) {
    return Bad("cluster_name", absl::StrCat("\"", c.cluster_name(),
                                            "\" must be 1-63 characters of [A-Za-z0-9._-]"));
  }
  if (!c.advertise_address().empty() && !ValidHostPort(c.advertise_address())) {
    return Bad("advertise_address",
               absl::StrCat("\"", c.advertise_address(), "\" is not host:port"));
  }
  if (c.membership_ttl_ms() < 2000) {
    return Bad("membership_ttl_ms", absl::StrCat(c.membership_ttl_ms(), " is below 2000"));
  }
  if (c.replicas() > 8) return Bad("replicas", absl::StrCat(c.replicas(), " is above 8"));
  if (c.peer_timeout_ms() < 50 || c.peer_timeout_ms() > 60000) {
    return Bad("peer_timeout_ms", absl::StrCat(c.peer_timeout_ms(), " is outside [50, 60000]"));
  }
  if (c.replication_queue_limit() > (1u << 20)) {
    return Bad("replication_queue_limit",
               absl::StrCat(c.replication_queue_limit(), " is above 1048576"));
  }
  if (c.data_plane_threads() > 64) {
    return Bad("data_plane_threads", absl::StrCat(c.data_plane_threads(), " is above 64"));
  }
  KVDN_RETURN_IF_ERROR(ValidateTls(c));
  KVDN_RETURN_IF_ERROR(ValidateEtcdTls(c));
  if (c.max_threads() < 4 || c.max_threads() > 4096) {
    return Bad("max_threads", absl::StrCat(c.max_threads(), " is outside [4, 4096]"));
  }
  for (int i = 0; i < c.namespaces_size(); ++i) {
    if (absl::Status st = ValidateNamespace(c.namespaces(i)); !st.ok()) {
      return Bad(absl::StrCat("namespaces[", i, "]"), st.message());
    }
  }
  static constexpr absl::string_view kLevels[] = {"trace", "debug", "info", "warn", "error", "off"};
  if (std::find(std::begin(kLevels), std::end(kLevels), c.log_level()) == std::end(kLevels)) {
    return Bad("log_level", absl::StrCat("\"", c.log_level(),
                                         "\" is not one of trace, debug, info, warn, error, off"));
  }
  return absl::OkStatus();
}

std::string ConfigToJson(const v1::DaemonConfig& config) {
  std::string out;
  google::protobuf::util::JsonPrintOptions opts;
  opts.add_whitespace = true;
  opts.preserve_proto_field_names = true;
  opts.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(config, &out, opts);
  return out;
}

bool ValidHostPort(absl::string_view a) {
  const size_t colon = a.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) return false;
  int port = 0;
  return absl::SimpleAtoi(a.substr(colon + 1), &port) && port >= 0 && port <= 65535;
}

}  // namespace kvdn::daemon
