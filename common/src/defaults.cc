#include "kvdn/common/defaults.h"

#include <unistd.h>

#include <cstdlib>

namespace kvdn {

std::string DefaultDataDir() {
  if (geteuid() == 0) return "/var/lib/kvdn";
  if (const char* x = std::getenv("XDG_DATA_HOME"); x && *x) return std::string(x) + "/kvdn";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.local/share/kvdn";
  return "/tmp/kvdn";
}

std::string DefaultUnixSocket() { return DefaultDataDir() + "/kvdnd.sock"; }

}  // namespace kvdn
