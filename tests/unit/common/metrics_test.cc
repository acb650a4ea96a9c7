#include "kvdn/common/metrics.h"

#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvdn {
namespace {

using ::testing::HasSubstr;

TEST(MetricsTest, RendersCountersGaugesAndHistogramsInTextFormat) {
  MetricsRegistry r;
  r.AddCounter("kvdn_x_total", "Things.", {{"kind", "a"}})->Inc(3);
  r.AddCounter("kvdn_x_total", "Things.", {{"kind", "b"}})->Inc();
  r.AddGauge("kvdn_g", "A gauge.")->Set(2.5);
  Histogram* h = r.AddHistogram("kvdn_h_seconds", "Latency.", {}, {0.1, 1});
  h->Observe(0.05);
  h->Observe(0.5);
  h->Observe(5);
  const std::string out = r.Render();
  EXPECT_THAT(out, HasSubstr("# HELP kvdn_x_total Things.\n# TYPE kvdn_x_total counter\n"
                             "kvdn_x_total{kind=\"a\"} 3\nkvdn_x_total{kind=\"b\"} 1\n"));
  EXPECT_THAT(out, HasSubstr("kvdn_g 2.5\n"));
  EXPECT_THAT(out, HasSubstr("kvdn_h_seconds_bucket{le=\"0.1\"} 1\n"
                             "kvdn_h_seconds_bucket{le=\"1\"} 2\n"
                             "kvdn_h_seconds_bucket{le=\"+Inf\"} 3\n"
                             "kvdn_h_seconds_sum 5.55\nkvdn_h_seconds_count 3\n"));
  // The same (name, labels) returns the same instrument.
  EXPECT_EQ(r.AddCounter("kvdn_x_total", "Things.", {{"kind", "a"}})->value(), 3u);
}

TEST(MetricsTest, CollectorsReportAtScrapeTimeAndLabelValuesAreEscaped) {
  MetricsRegistry r;
  int calls = 0;
  r.AddCollector([&](MetricsWriter& w) {
    ++calls;
    w.Gauge("kvdn_c", "Collected.", {{"path", "a\"b\\c\nd"}}, calls);
  });
  EXPECT_THAT(r.Render(), HasSubstr("kvdn_c{path=\"a\\\"b\\\\c\\nd\"} 1\n"));
  EXPECT_THAT(r.Render(), HasSubstr("} 2\n"));
}

TEST(MetricsTest, ConcurrentUpdatesAreAllCounted) {
  MetricsRegistry r;
  Counter* c = r.AddCounter("kvdn_n_total", "N.");
  Histogram* h = r.AddHistogram("kvdn_l", "L.", {}, LatencyBuckets());
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t) {
    ts.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        c->Inc();
        h->Observe(0.001);
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(c->value(), 40000u);
  EXPECT_EQ(h->CumulativeCounts().back(), 40000u);
  EXPECT_NEAR(h->sum(), 40.0, 1e-6);
}

}  // namespace
}  // namespace kvdn
