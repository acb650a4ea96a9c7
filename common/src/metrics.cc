#include "kvdn/common/metrics.h"

#include <cmath>
#include <cstdio>
#include <map>

#include "absl/strings/str_cat.h"
#include "kvdn/common/logging.h"

namespace kvdn {
namespace {

enum Type { kCounter = 0, kGauge = 1, kHistogram = 2 };
constexpr const char* kTypeNames[] = {"counter", "gauge", "histogram"};

bool ValidName(absl::string_view n) {
  if (n.empty()) return false;
  for (size_t i = 0; i < n.size(); ++i) {
    const char c = n[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
                    (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == std::floor(v) && std::fabs(v) < 1e15) return absl::StrCat(static_cast<int64_t>(v));
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

std::string FormatLabels(const MetricLabels& labels, const char* extra_name = nullptr,
                         const std::string& extra_value = "") {
  if (labels.empty() && !extra_name) return "";
  std::string out = "{";
  bool first = true;
  for (const auto& [k, v] : labels) {
    absl::StrAppend(&out, first ? "" : ",", k, "=\"", EscapeLabelValue(v), "\"");
    first = false;
  }
  if (extra_name) absl::StrAppend(&out, first ? "" : ",", extra_name, "=\"", extra_value, "\"");
  out += "}";
  return out;
}

std::string EscapeHelp(absl::string_view h) {
  std::string out;
  for (char c : h) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

void CheckAtomicAdd(std::atomic<double>& a, double d) {
  double cur = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(cur, cur + d, std::memory_order_relaxed)) {
  }
}

}  // namespace

void Gauge::Add(double d) { CheckAtomicAdd(value_, d); }

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  for (size_t i = 0; i < bounds_.size(); ++i) {
    KVDN_CHECK(i == 0 || bounds_[i] > bounds_[i - 1],
               absl::StrCat("histogram bounds must increase"));
  }
  for (size_t i = 0; i <= bounds_.size(); ++i) counts_[i].store(0);
}

void Histogram::Observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  CheckAtomicAdd(sum_, v);
}

std::vector<uint64_t> Histogram::CumulativeCounts() const {
  std::vector<uint64_t> out(bounds_.size() + 1);
  uint64_t acc = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    acc += counts_[i].load(std::memory_order_relaxed);
    out[i] = acc;
  }
  return out;
}

std::vector<double> LatencyBuckets() {
  return {50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
          50e-3, 100e-3, 250e-3, 500e-3, 1,    2.5,    5,    10,    30};
}

std::string EscapeLabelValue(absl::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

struct MetricsRegistry::Family {
  std::string name;
  std::string help;
  int type;
  struct Series {
    MetricLabels labels;
    std::unique_ptr<kvdn::Counter> counter;
    std::unique_ptr<kvdn::Gauge> gauge;
    std::unique_ptr<Histogram> histogram;
  };
  std::vector<Series> series;
  Series* Find(const MetricLabels& labels) {
    for (Series& s : series) {
      if (s.labels == labels) return &s;
    }
    return nullptr;
  }
};

MetricsRegistry::MetricsRegistry() = default;
MetricsRegistry::~MetricsRegistry() = default;

MetricsRegistry::Family* MetricsRegistry::FamilyLocked(absl::string_view name,
                                                       absl::string_view help, int type) {
  KVDN_CHECK(ValidName(name), absl::StrCat("bad metric name ", name));
  for (auto& f : families_) {
    if (f->name == name) {
      KVDN_CHECK(f->type == type, absl::StrCat("metric ", name, " registered with two types"));
      return f.get();
    }
  }
  families_.push_back(
      std::make_unique<Family>(Family{std::string(name), std::string(help), type, {}}));
  return families_.back().get();
}

kvdn::Counter* MetricsRegistry::AddCounter(absl::string_view name, absl::string_view help,
                                           const MetricLabels& labels) {
  MutexLock lock(&mu_);
  Family* f = FamilyLocked(name, help, kCounter);
  if (Family::Series* s = f->Find(labels)) return s->counter.get();
  f->series.push_back({labels, std::make_unique<kvdn::Counter>(), nullptr, nullptr});
  return f->series.back().counter.get();
}

kvdn::Gauge* MetricsRegistry::AddGauge(absl::string_view name, absl::string_view help,
                                       const MetricLabels& labels) {
  MutexLock lock(&mu_);
  Family* f = FamilyLocked(name, help, kGauge);
  if (Family::Series* s = f->Find(labels)) return s->gauge.get();
  f->series.push_back({labels, nullptr, std::make_unique<kvdn::Gauge>(), nullptr});
  return f->series.back().gauge.get();
}

Histogram* MetricsRegistry::AddHistogram(absl::string_view name, absl::string_view help,
                                         const MetricLabels& labels, std::vector<double> bounds) {
  MutexLock lock(&mu_);
  Family* f = FamilyLocked(name, help, kHistogram);
  if (Family::Series* s = f->Find(labels)) return s->histogram.get();
  f->series.push_back({labels, nullptr, nullptr, std::make_unique<Histogram>(std::move(bounds))});
  return f->series.back().histogram.get();
}

void MetricsRegistry::AddCollector(std::function<void(MetricsWriter&)> collector) {
  MutexLock lock(&mu_);
  collectors_.push_back(std::move(collector));
}

namespace {

// Gathers collector samples grouped by family, in order of first appearance.
class CollectingWriter final : public MetricsWriter {
 public:
  struct Fam {
    std::string help;
    int type;
    std::vector<std::pair<MetricLabels, double>> samples;
  };
  void Counter(absl::string_view name, absl::string_view help, const MetricLabels& labels,
               double value) override {
    Add(name, help, kCounter, labels, value);
  }
  void Gauge(absl::string_view name, absl::string_view help, const MetricLabels& labels,
             double value) override {
    Add(name, help, kGauge, labels, value);
  }
  std::vector<std::string> order;
  std::map<std::string, Fam> fams;

 private:
  void Add(absl::string_view name, absl::string_view help, int type, const MetricLabels& labels,
           double value) {
    KVDN_CHECK(ValidName(name), absl::StrCat("bad metric name ", name));
    auto [it, inserted] = fams.try_emplace(std::string(name));
    if (inserted) {
      order.emplace_back(name);
      it->second.help = std::string(help);
      it->second.type = type;
    }
    KVDN_CHECK(it->second.type == type, absl::StrCat("metric ", name, " reported with two types"));
    it->second.samples.emplace_back(labels, value);
  }
};

void AppendHeader(std::string* out, const std::string& name, const std::string& help, int type) {
  absl::StrAppend(out, "# HELP ", name, " ", EscapeHelp(help), "\n# TYPE ", name, " ",
                  kTypeNames[type], "\n");
}

}  // namespace

std::string MetricsRegistry::Render() const {
  std::vector<std::function<void(MetricsWriter&)>> collectors;
  std::string out;
  {
    MutexLock lock(&mu_);
    collectors = collectors_;
    for (const auto& f : families_) {
      if (f->series.empty()) continue;
      AppendHeader(&out, f->name, f->help, f->type);
      for (const Family::Series& s : f->series) {
        if (f->type == kCounter) {
          absl::StrAppend(&out, f->name, FormatLabels(s.labels), " ", s.counter->value(), "\n");
        } else if (f->type == kGauge) {
          absl::StrAppend(&out, f->name, FormatLabels(s.labels), " ", FormatValue(s.gauge->value()),
                          "\n");
        } else {
          const std::vector<uint64_t> counts = s.histogram->CumulativeCounts();
          const std::vector<double>& bounds = s.histogram->bounds();
          for (size_t i = 0; i < counts.size(); ++i) {
            const std::string le = i < bounds.size() ? FormatValue(bounds[i]) : "+Inf";
            absl::StrAppend(&out, f->name, "_bucket", FormatLabels(s.labels, "le", le), " ",
                            counts[i], "\n");
          }
          absl::StrAppend(&out, f->name, "_sum", FormatLabels(s.labels), " ",
                          FormatValue(s.histogram->sum()), "\n");
          absl::StrAppend(&out, f->name, "_count", FormatLabels(s.labels), " ", counts.back(),
                          "\n");
        }
      }
    }
  }
  // Collectors run outside the registry's lock: they take their owners' locks.
  CollectingWriter w;
  for (const auto& c : collectors) c(w);
  for (const std::string& name : w.order) {
    const CollectingWriter::Fam& f = w.fams.at(name);
    AppendHeader(&out, name, f.help, f.type);
    for (const auto& [labels, value] : f.samples) {
      absl::StrAppend(&out, name, FormatLabels(labels), " ", FormatValue(value), "\n");
    }
  }
  return out;
}

}  // namespace kvdn
