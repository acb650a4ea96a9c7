#include "kvdn/common/logging.h"

#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "kvdn/common/logging.h"

namespace kvdn {

absl::Status InitLogging(absl::string_view level) {
  const std::string name(level);
  const spdlog::level::level_enum parsed = spdlog::level::from_str(name);
  // spdlog maps unknown names to "off"; only accept "off" when it was asked for.
  if (parsed == spdlog::level::off && name != "off") {
    return absl::InvalidArgumentError(
        absl::StrCat("log level '", name, "' is not one of trace, debug, info, warn, error, off"));
  }
  spdlog::set_level(parsed);
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%L%$ %t %v");
  return absl::OkStatus();
}

namespace internal {
void CheckFailed(const char* file, int line, const char* cond, absl::string_view msg) {
  spdlog::critical("CHECK failed at {}:{}: {}: {}", file, line, cond, msg);
  spdlog::default_logger()->flush();
  std::abort();
}
}  // namespace internal

}  // namespace kvdn
