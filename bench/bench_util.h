// Shared by the benchmark programs: timing, percentiles, machine description.
#ifndef KVDN_BENCH_BENCH_UTIL_H_
#define KVDN_BENCH_BENCH_UTIL_H_

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace kvdn::bench {

using Clock = std::chrono::steady_clock;

inline double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Latencies in seconds; Percentile(0.5) is the median.
struct Latencies {
  std::vector<double> s;
  void Add(double v) { s.push_back(v); }
  double Percentile(double p) {
    if (s.empty()) return 0;
    std::sort(s.begin(), s.end());
    const size_t i = std::min(s.size() - 1, static_cast<size_t>(p * static_cast<double>(s.size())));
    return s[i];
  }
  double Sum() const {
    double t = 0;
    for (double v : s) t += v;
    return t;
  }
};

inline std::string CpuModel() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

inline std::string CommandOutput(const char* cmd) {
  std::string out;
  if (FILE* p = popen(cmd, "r")) {
    char buf[256];
    while (fgets(buf, sizeof(buf), p)) out += buf;
    pclose(p);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

}  // namespace kvdn::bench

#endif  // KVDN_BENCH_BENCH_UTIL_H_
