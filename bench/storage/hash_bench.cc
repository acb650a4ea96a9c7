// bench/storage hash_bench: verifying a chunk's payload (XXH3-64, the chunk format's checksum) in
// one pass, as Commit does, against Xxh3_64Blocks, as kvdnd verifies a Put that arrived in parts:
// each part's blocks summed on its own thread, then the sums folded in order. Same run, same
// bytes, same result (checked).
//
//   one pass      = Xxh3_64 (libxxhash, runtime-dispatched SIMD): the ceiling for one thread
//   blocks x1     = AddRange over the whole payload, then Finish, on one thread
//   blocks xN     = the payload cut into 1 MiB parts summed on N threads (ThreadPool::ParallelFor,
//                   threads kept up between calls), then Finish on the calling thread (what the
//                   Put's wall time sees, less the copy the sums follow in kvdnd)
//   fold          = Finish alone, every block summed before (the sequential part)
// Warm: one payload, hashed again and again (in the caches where it fits). Cold: payloads cycled
// over a pool of --pool-mib MiB (well past the last-level cache), as a store's arena is.
//
// Usage: hash_bench [--sizes-mib 4,32] [--threads N] [--pool-mib 1024] [--reps 50]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench_util.h"
#include "kvdn/common/hash.h"
#include "kvdn/common/thread_pool.h"

namespace kvdn::bench {
namespace {

constexpr uint64_t kMiB = 1 << 20;

[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "hash_bench: %s\n", what);
  std::exit(2);
}

// Median microseconds of `reps` calls of f(i) (i = 0, 1, ...), after two warm-up calls.
template <typename F>
double MedianUs(int reps, F f) {
  f(0);
  f(1);
  std::vector<double> us;
  for (int i = 0; i < reps; ++i) {
    const auto a = Clock::now();
    f(i + 2);
    us.push_back(Seconds(a, Clock::now()) * 1e6);
  }
  std::nth_element(us.begin(), us.begin() + us.size() / 2, us.end());
  return us[us.size() / 2];
}

// The payload's 1 MiB parts summed on `threads` threads of `pool` (the caller's among them; none
// of the pool's with a null pool), then folded on the caller.
uint64_t Blocks(ByteSpan payload, ThreadPool* pool, int threads) {
  Xxh3_64Blocks h(payload.size());
  const uint64_t parts = (payload.size() + kMiB - 1) / kMiB;
  auto part = [&](size_t p) {
    const uint64_t off = p * kMiB;
    h.AddRange(off, payload.subspan(off, std::min(kMiB, payload.size() - off)));
  };
  if (pool == nullptr) {
    for (size_t p = 0; p < parts; ++p) part(p);
  } else {
    pool->ParallelFor(parts, threads, part);
  }
  return h.Finish(payload);
}

}  // namespace
}  // namespace kvdn::bench

int main(int argc, char** argv) {
  using namespace kvdn;
  using namespace kvdn::bench;
  std::vector<uint64_t> sizes = {4, 32};
  int threads = std::min(8, static_cast<int>(std::thread::hardware_concurrency()));
  uint64_t pool_mib = 1024;
  int reps = 50;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] {
      if (i + 1 >= argc) Die("a flag needs a value");
      return std::string(argv[++i]);
    };
    if (a == "--sizes-mib") {
      sizes.clear();
      for (absl::string_view s : absl::StrSplit(next(), ',')) {
        uint64_t v = 0;
        if (!absl::SimpleAtoi(s, &v) || v == 0) Die("bad --sizes-mib");
        sizes.push_back(v);
      }
    } else if (a == "--threads") {
      if (!absl::SimpleAtoi(next(), &threads) || threads < 1) Die("bad --threads");
    } else if (a == "--pool-mib") {
      if (!absl::SimpleAtoi(next(), &pool_mib) || pool_mib == 0) Die("bad --pool-mib");
    } else if (a == "--reps") {
      if (!absl::SimpleAtoi(next(), &reps) || reps < 1) Die("bad --reps");
    } else {
      Die("usage: hash_bench [--sizes-mib 4,32] [--threads N] [--pool-mib 1024] [--reps 50]");
    }
  }
  std::printf("# hash_bench: payload verification, one XXH3 pass vs Xxh3_64Blocks\n");
  std::printf("# cpu: %s (%u cores)\n", CpuModel().c_str(), std::thread::hardware_concurrency());
  std::printf(
      "\n| payload | bytes | one pass us | blocks x1 us | blocks x%d us | fold us | "
      "x%d / one pass |\n|---|---|---|---|---|---|---|\n",
      threads, threads);
  ThreadPool pool_threads(threads - 1);  // kept up between calls, as kvdnd's progress threads
  for (uint64_t mib : sizes) {
    const uint64_t size = mib * kMiB;
    const uint64_t count = std::max<uint64_t>(1, pool_mib / mib);
    std::vector<uint8_t> pool(count * size);
    for (size_t i = 0; i < pool.size(); i += 8) {
      const uint64_t v = (i * 0x9E3779B97F4A7C15ULL) ^ (i >> 7);
      std::memcpy(&pool[i], &v, std::min<size_t>(8, pool.size() - i));
    }
    for (bool cold : {false, true}) {
      auto payload = [&](int i) {
        return ByteSpan(pool).subspan(cold ? (i % count) * size : 0, size);
      };
      for (uint64_t i = 0; i < std::min<uint64_t>(count, 4); ++i) {
        if (Blocks(payload(i), &pool_threads, threads) != Xxh3_64(payload(i))) {
          Die("Xxh3_64Blocks differs from Xxh3_64");
        }
      }
      volatile uint64_t sink = 0;
      const double one = MedianUs(reps, [&](int i) { sink = sink + Xxh3_64(payload(i)); });
      const double b1 =
          MedianUs(reps, [&](int i) { sink = sink + Blocks(payload(i), nullptr, 1); });
      const double bn =
          MedianUs(reps, [&](int i) { sink = sink + Blocks(payload(i), &pool_threads, threads); });
      Xxh3_64Blocks summed(size);
      summed.AddRange(0, payload(0));
      const double fold = MedianUs(reps, [&](int) { sink = sink + summed.Finish(payload(0)); });
      std::printf("| %s | %llu MiB | %.1f | %.1f | %.1f | %.1f | %.2f |\n", cold ? "cold" : "warm",
                  static_cast<unsigned long long>(mib), one, b1, bn, fold, one / bn);
    }
  }
  return 0;
}
