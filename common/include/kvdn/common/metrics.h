// Metrics: counters, gauges and histograms with labels, rendered in the Prometheus text exposition
// format (version 0.0.4). prometheus-cpp is not packaged for Debian 12, so kvdn writes the format
// itself; a test checks the output with `promtool check metrics`.
//
// Two kinds of metric: instruments updated on the hot path (Counter, Gauge, Histogram: lock-free
// atomics, created once and kept by pointer), and collectors, callbacks that report values read
// at scrape time (e.g. the tiered store's statistics), so nothing is copied between scrapes.
//
// Thread-safety: instruments may be updated from any thread; registering and rendering take an
// internal mutex. Instruments live as long as the registry.
#ifndef KVDN_COMMON_METRICS_H_
#define KVDN_COMMON_METRICS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"
#include "kvdn/common/mutex.h"

namespace kvdn {

// Label pairs, in the order they are printed.
using MetricLabels = std::vector<std::pair<std::string, std::string>>;

class Counter {
 public:
  void Inc(uint64_t n = 1) { value_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> value_{0};
};

class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Add(double d);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

class Histogram {
 public:
  // `bounds`: strictly increasing upper bounds of the buckets; +Inf is implied.
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);
  const std::vector<double>& bounds() const { return bounds_; }
  // Cumulative counts per bound, then the +Inf count (= total).
  std::vector<uint64_t> CumulativeCounts() const;
  double sum() const { return sum_.load(std::memory_order_relaxed); }

 private:
  const std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;  // bounds_.size() + 1
  std::atomic<double> sum_{0};
};

// Default latency buckets, in seconds: 50 us .. 30 s.
std::vector<double> LatencyBuckets();

// What a collector writes at scrape time.
class MetricsWriter {
 public:
  virtual ~MetricsWriter() = default;
  virtual void Counter(absl::string_view name, absl::string_view help, const MetricLabels& labels,
                       double value) = 0;
  virtual void Gauge(absl::string_view name, absl::string_view help, const MetricLabels& labels,
                     double value) = 0;
};

class MetricsRegistry {
 public:
  MetricsRegistry();
  ~MetricsRegistry();
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  // Each returns the instrument for (name, labels), creating it on first use. Names follow
  // Prometheus conventions ([a-zA-Z_:][a-zA-Z0-9_:]*; counters end in _total); a name or label that
  // breaks them, or a name reused with another type, is a bug of ours: CHECK-fails.
  kvdn::Counter* AddCounter(absl::string_view name, absl::string_view help,
                            const MetricLabels& labels = {});
  kvdn::Gauge* AddGauge(absl::string_view name, absl::string_view help,
                        const MetricLabels& labels = {});
  Histogram* AddHistogram(absl::string_view name, absl::string_view help,
                          const MetricLabels& labels, std::vector<double> bounds);
  void AddCollector(std::function<void(MetricsWriter&)> collector);

  // The whole registry in the text exposition format; every family once, with HELP and TYPE.
  std::string Render() const;

 private:
  struct Family;
  Family* FamilyLocked(absl::string_view name, absl::string_view help, int type)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable Mutex mu_;
  std::vector<std::unique_ptr<Family>> families_ ABSL_GUARDED_BY(mu_);
  std::vector<std::function<void(MetricsWriter&)>> collectors_ ABSL_GUARDED_BY(mu_);
};

// "a\"b" style escaping of a label value for the text format.
std::string EscapeLabelValue(absl::string_view v);

}  // namespace kvdn

#endif  // KVDN_COMMON_METRICS_H_
