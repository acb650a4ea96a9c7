// The daemon's configuration (proto kvdn.v1.DaemonConfig): loaded from a JSON file, overridden by
// flags, completed with the embedded defaults and validated once at startup.
#ifndef KVDN_DAEMON_CONFIG_H_
#define KVDN_DAEMON_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "kvdn/common/status.h"
#include "kvdn/v1/config.pb.h"

namespace kvdn::daemon {

// Parses a JSON config file (proto3 JSON mapping). Unknown fields are errors.
// NOT_FOUND: no such file. INVALID_ARGUMENT: not valid JSON for DaemonConfig, naming where.
absl::StatusOr<v1::DaemonConfig> LoadConfigFile(const std::string& path);
absl::StatusOr<v1::DaemonConfig> ParseConfigJson(absl::string_view json);

// Fills every zero/empty field with its embedded default (config.proto documents each), reading
// the machine where a default depends on it (available memory, free disk space, host name).
void ApplyDefaults(v1::DaemonConfig* config);

// Memory this process may still take, in bytes: MemAvailable (/proc/meminfo), capped by the
// headroom (limit - usage) of every memory cgroup level it runs under, v1 or v2 — in a container
// the pod's limit, not the node's memory. 0 when nothing is readable. `root` prefixes every path
// read (tests).
uint64_t MemoryAvailableToProcess(const std::string& root = "");

// INVALID_ARGUMENT naming the first field that is out of range. REQUIRES: ApplyDefaults ran.
absl::Status ValidateConfig(const v1::DaemonConfig& config);

// The config as the JSON a file would hold (all fields, proto names).
std::string ConfigToJson(const v1::DaemonConfig& config);

// "host:port" with a port in [0, 65535] (host not resolved).
bool ValidHostPort(absl::string_view address);

}  // namespace kvdn::daemon

#endif  // KVDN_DAEMON_CONFIG_H_
