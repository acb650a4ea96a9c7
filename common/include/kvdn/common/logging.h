// Logging for kvdn: spdlog behind one initialisation call. Library code logs through spdlog's
// default logger (spdlog::info(...), spdlog::warn(...)); the daemon and tools call InitLogging once
// at start.
#ifndef KVDN_COMMON_LOGGING_H_
#define KVDN_COMMON_LOGGING_H_

#include "absl/strings/string_view.h"
#include "kvdn/common/status.h"
#include "spdlog/spdlog.h"  // IWYU pragma: export

// Lets spdlog/fmt format absl::string_view (Debian's Abseil has its own string_view type), e.g.
// spdlog::warn("...: {}", status.message()).
template <>
struct fmt::formatter<absl::string_view> : fmt::formatter<fmt::string_view> {
  template <typename FormatContext>
  auto format(absl::string_view s, FormatContext& ctx) const {
    return fmt::formatter<fmt::string_view>::format(fmt::string_view(s.data(), s.size()), ctx);
  }
};

namespace kvdn {

// Sets the default spdlog logger's level ("trace", "debug", "info", "warn", "error", "off") and the
// kvdn log pattern. Returns INVALID_ARGUMENT naming the level if it is not one of those.
absl::Status InitLogging(absl::string_view level);

namespace internal {
[[noreturn]] void CheckFailed(const char* file, int line, const char* cond, absl::string_view msg);
}  // namespace internal

}  // namespace kvdn

// For broken invariants that are kvdn's own bugs only (STYLE.md 3): logs and aborts.
#define KVDN_CHECK(cond, msg)                                                   \
  do {                                                                          \
    if (!(cond)) ::kvdn::internal::CheckFailed(__FILE__, __LINE__, #cond, msg); \
  } while (0)

namespace kvdn {}  // namespace kvdn

#endif  // KVDN_COMMON_LOGGING_H_
