#include "kvdn/common/malloc_tuning.h"

#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace kvdn {

bool TuneMalloc() {
#if defined(__GLIBC__)
  static const bool tuned = [] {
    const char* t = std::getenv("GLIBC_TUNABLES");
    if (t != nullptr && std::strstr(t, "glibc.malloc.") != nullptr) return false;
    // Both: setting either turns glibc's dynamic thresholds off, so the other must be set too
    // (M_MMAP_THRESHOLD left at its 128 KiB default would mmap every read buffer anew). A
    // sanitizer's malloc answers 0 (not applied).
    return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 64 << 20) == 1;
  }();
  return tuned;
#else
  return false;
#endif
}

}  // namespace kvdn
