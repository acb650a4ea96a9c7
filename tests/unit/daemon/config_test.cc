#include "kvdn/daemon/config.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvdn/testing/status_matchers.h"

namespace kvdn::daemon {
namespace {

using ::kvdn::testing::StatusIs;
using ::testing::HasSubstr;

v1::DaemonConfig Defaulted(const std::string& json = "{}") {
  v1::DaemonConfig c = ParseConfigJson(json).value();
  if (c.data_dir().empty()) c.set_data_dir("/tmp/kvdn-config-test");
  ApplyDefaults(&c);
  return c;
}

TEST(ConfigTest, EmbeddedDefaultsAreValid) {
  v1::DaemonConfig c = Defaulted();
  ASSERT_OK(ValidateConfig(c));
  EXPECT_EQ(c.unix_socket(), "/tmp/kvdn-config-test/kvdnd.sock");
  EXPECT_EQ(c.grpc_address(), "127.0.0.1:7070");
  EXPECT_EQ(c.max_frame_bytes(), 1u << 20);
  EXPECT_EQ(c.get_frame_bytes(), 512u << 10);
  EXPECT_EQ(c.unix_socket_send_buffer_bytes(), 4u << 20);
  EXPECT_GE(c.host_tier_bytes(), 64u << 20);
  EXPECT_LE(c.host_tier_bytes(), 64ull << 30);
  EXPECT_FALSE(c.node_name().empty());
  EXPECT_GE(c.data_plane_threads(), 2u);
  EXPECT_LE(c.data_plane_threads(), 8u);
}

// A fake machine under a temp root: /proc/meminfo, /proc/self/cgroup and cgroup files.
class FakeRoot {
 public:
  FakeRoot() {
    root_ = std::filesystem::temp_directory_path() /
            ("kvdn-memroot-" + std::to_string(::getpid()) + "-" + std::to_string(next_++));
    std::filesystem::remove_all(root_);
  }
  ~FakeRoot() { std::filesystem::remove_all(root_); }
  void Write(const std::string& rel, const std::string& text) {
    const std::filesystem::path p = root_ / rel;
    std::filesystem::create_directories(p.parent_path());
    std::ofstream(p) << text;
  }
  std::string path() const { return root_.string(); }
  // A cgroup v2 level under /sys/fs/cgroup (dir "" for the mount itself): memory.max, .current.
  void V2Level(const std::string& dir, const std::string& max, uint64_t current) {
    const std::string base = "sys/fs/cgroup/" + (dir.empty() ? "" : dir + "/");
    Write(base + "memory.max", max);
    Write(base + "memory.current", std::to_string(current));
  }

 private:
  static inline int next_ = 0;
  std::filesystem::path root_;
};

constexpr uint64_t kGiB = uint64_t{1} << 30;

TEST(ConfigTest, MemoryAvailableIsMemAvailableWithoutALimit) {
  FakeRoot r;
  r.Write("proc/meminfo", "MemTotal:       65536000 kB\nMemAvailable:   33554432 kB\n");
  r.Write("proc/self/cgroup", "0::/\n");
  r.V2Level("", "max\n", 123456);
  EXPECT_EQ(MemoryAvailableToProcess(r.path()), 32 * kGiB);
}

TEST(ConfigTest, MemoryAvailableIsCappedByTheCgroupV2Limit) {
  // A pod limited to 8 GiB using 1 GiB on a node with 32 GiB available: 7 GiB.
  FakeRoot r;
  r.Write("proc/meminfo", "MemAvailable:   33554432 kB\n");
  r.Write("proc/self/cgroup", "0::/\n");  // its own cgroup namespace
  r.V2Level("", std::to_string(8 * kGiB) + "\n", 1 * kGiB);
  EXPECT_EQ(MemoryAvailableToProcess(r.path()), 7 * kGiB);
}

TEST(ConfigTest, MemoryAvailableTakesTheTightestLevelOfTheHierarchy) {
  // No cgroup namespace: the pod's cgroup (12 GiB limit, 10 used) sits under the container's
  // (unlimited) and a QoS level (100 GiB).
  FakeRoot r;
  r.Write("proc/meminfo", "MemAvailable:   33554432 kB\n");
  r.Write("proc/self/cgroup", "0::/kubepods/pod1/ctr\n");
  r.V2Level("kubepods", std::to_string(100 * kGiB), 50 * kGiB);
  r.V2Level("kubepods/pod1", std::to_string(12 * kGiB), 10 * kGiB);
  r.V2Level("kubepods/pod1/ctr", "max", 10 * kGiB);
  EXPECT_EQ(MemoryAvailableToProcess(r.path()), 2 * kGiB);
}

TEST(ConfigTest, MemoryAvailableReadsCgroupV1) {
  FakeRoot r;
  r.Write("proc/meminfo", "MemAvailable:   33554432 kB\n");
  r.Write("proc/self/cgroup", "12:pids:/x\n4:cpu,cpuacct:/x\n7:memory:/docker/abc\n");
  // The runtime mounted only the container's own cgroup: /docker/abc is not under the mount.
  r.Write("sys/fs/cgroup/memory/memory.limit_in_bytes", std::to_string(4 * kGiB));
  r.Write("sys/fs/cgroup/memory/memory.usage_in_bytes", std::to_string(kGiB / 2));
  EXPECT_EQ(MemoryAvailableToProcess(r.path()), 4 * kGiB - kGiB / 2);
  // v1's "no limit" is a huge number, not "max".
  r.Write("sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712");
  EXPECT_EQ(MemoryAvailableToProcess(r.path()), 32 * kGiB);
}

TEST(ConfigTest, MemoryAvailableWithALimitAlreadyExceededIsZero) {
  FakeRoot r;
  r.Write("proc/meminfo", "MemAvailable:   33554432 kB\n");
  r.Write("proc/self/cgroup", "0::/\n");
  r.V2Level("", std::to_string(kGiB), 2 * kGiB);
  EXPECT_EQ(MemoryAvailableToProcess(r.path()), 0u);
}

TEST(ConfigTest, JsonOverridesAndRoundTrips) {
  v1::DaemonConfig c = Defaulted(R"({"host_tier_bytes": "1073741824", "namespaces": ["a"]})");
  EXPECT_EQ(c.host_tier_bytes(), 1u << 30);
  v1::DaemonConfig again = ParseConfigJson(ConfigToJson(c)).value();
  EXPECT_EQ(again.SerializeAsString(), c.SerializeAsString());
}

TEST(ConfigTest, EachBadFieldIsNamed) {
  const struct {
    const char* json;
    const char* field;
  } cases[] = {
      {R"({"data_dir": "relative/dir"})", "data_dir"},
      {R"({"grpc_address": "no-port"})", "grpc_address"},
      {R"({"http_address": "host:99999"})", "http_address"},
      {R"({"grpc_address": "none", "unix_socket": "none"})", "nothing to serve on"},
      {R"({"host_tier_bytes": "1000"})", "host_tier_bytes"},
      {R"({"low_watermark": 0.96})", "low_watermark"},
      {R"({"max_frame_bytes": 10000000})", "max_frame_bytes"},
      {R"({"get_frame_bytes": 2048})", "get_frame_bytes"},
      {R"({"unix_socket_send_buffer_bytes": 1000})", "unix_socket_send_buffer_bytes"},
      {R"({"unix_socket_send_buffer_bytes": 536870912})", "unix_socket_send_buffer_bytes"},
      {R"({"max_frame_bytes": 262144, "get_frame_bytes": 524288})", "get_frame_bytes"},
      {R"({"max_threads": 1})", "max_threads"},
      {R"({"data_plane_threads": 65})", "data_plane_threads"},
      {R"({"etcd_endpoints": ["10.0.0.1:2379", "no-port"]})", "etcd_endpoints[1]"},
      {R"({"cluster_name": "a/b"})", "cluster_name"},
      {R"({"advertise_address": "10.0.0.1"})", "advertise_address"},
      {R"({"membership_ttl_ms": 1000})", "membership_ttl_ms"},
      {R"({"replicas": 9})", "replicas"},
      {R"({"peer_timeout_ms": 10})", "peer_timeout_ms"},
      {R"({"peer_timeout_ms": 60001})", "peer_timeout_ms"},
      {R"({"replication_queue_limit": 2000000})", "replication_queue_limit"},
      {R"({"etcd_tls": {"ca_file": "/etc/hostname"}})", "etcd_tls: is set without etcd_endpoints"},
      {R"({"etcd_endpoints": ["e:2379"], "etcd_tls": {"cert_file": "/etc/hostname"}})",
       "etcd_tls.ca_file: is empty"},
      {R"({"etcd_endpoints": ["e:2379"],
           "etcd_tls": {"ca_file": "/etc/hostname", "cert_file": "/etc/hostname"}})",
       "etcd_tls.key_file: is empty while etcd_tls.cert_file is set"},
      {R"({"etcd_endpoints": ["e:2379"], "etcd_tls": {"ca_file": "/no/such/ca.pem"}})",
       "etcd_tls.ca_file: \"/no/such/ca.pem\" cannot be read"},
      {R"({"etcd_endpoints": ["e:2379"],
           "etcd_tls": {"ca_file": "/etc/hostname", "refresh_seconds": 90000}})",
       "etcd_tls.refresh_seconds"},
      {R"({"namespaces": ["bad/ns"]})", "namespaces[0]"},
      {R"({"log_level": "verbose"})", "log_level"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.json);
    v1::DaemonConfig cfg = Defaulted(c.json);
    EXPECT_THAT(ValidateConfig(cfg),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.field)));
  }
}

TEST(ConfigTest, MalformedJsonAndUnknownFieldsAreRefused) {
  EXPECT_THAT(ParseConfigJson("{"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseConfigJson(R"({"hots_tier_bytes": 1})"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("hots_tier_bytes")));
  EXPECT_THAT(LoadConfigFile("/nonexistent/kvdn.json"), StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace kvdn::daemon
