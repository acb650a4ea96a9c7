// glibc malloc thresholds for processes that move multi-MiB buffers through gRPC.
#ifndef KVDN_COMMON_MALLOC_TUNING_H_
#define KVDN_COMMON_MALLOC_TUNING_H_

namespace kvdn {

// Sets glibc malloc's M_MMAP_THRESHOLD to 32 MiB and M_TRIM_THRESHOLD to 64 MiB, once per
// process (process-wide: the largest values glibc's own dynamic thresholds reach). With glibc's
// defaults a thread's arena hands a freed buffer of 1-8 MiB back to the kernel, and the next
// one of that size is faulted in again, zeroed, page by page: gRPC allocates its read buffers
// (256 KiB-1 MiB) and message copies anew for every message, so each streamed 1 MiB frame cost
// a round of page faults (bench/results/e2e-2026-12-02.md). Cost: each arena may keep up to 64
// MiB of freed memory. Returns true if the thresholds are set (now or by an earlier call);
// false where they are left alone: GLIBC_TUNABLES names a glibc.malloc tunable (the process
// chose), or malloc is not glibc's (a sanitizer's, musl).
bool TuneMalloc();

}  // namespace kvdn

#endif  // KVDN_COMMON_MALLOC_TUNING_H_
