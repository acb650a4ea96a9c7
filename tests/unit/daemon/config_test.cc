#include "kvdn/daemon/config.h"

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
  EXPECT_GE(c.host_tier_bytes(), 64u << 20);
  EXPECT_LE(c.host_tier_bytes(), 64ull << 30);
  EXPECT_FALSE(c.node_name().empty());
  EXPECT_GE(c.data_plane_threads(), 2u);
  EXPECT_LE(c.data_plane_threads(), 8u);
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
