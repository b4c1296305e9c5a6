// Latency statistics over repeated runs: min, median, p90, mean (milliseconds).
//
// Percentiles interpolate linearly between order statistics, as numpy.percentile does by
// default, so numbers from the C++ app and from Python benchmarks mean the same thing.
#ifndef ONNX2DEPLOY_TIMING_H_
#define ONNX2DEPLOY_TIMING_H_

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace timing {

struct Stats {
  size_t count = 0;
  double min_ms = 0, median_ms = 0, p90_ms = 0, mean_ms = 0;
};

/*! \brief The q-th percentile (0..100) of sorted samples, numpy's "linear" method. */
inline double percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) throw std::invalid_argument("percentile of no samples");
  const double rank = q / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - static_cast<double>(lo));
}

/*! \brief Summarize samples in milliseconds; throws std::invalid_argument if there are none. */
inline Stats summarize(std::vector<double> samples_ms) {
  if (samples_ms.empty()) throw std::invalid_argument("no timing samples");
  std::sort(samples_ms.begin(), samples_ms.end());
  Stats s;
  s.count = samples_ms.size();
  s.min_ms = samples_ms.front();
  s.median_ms = percentile(samples_ms, 50);
  s.p90_ms = percentile(samples_ms, 90);
  s.mean_ms = std::accumulate(samples_ms.begin(), samples_ms.end(), 0.0) / static_cast<double>(s.count);
  return s;
}

/*! \brief One line for humans: "median 1.234 ms, p90 ..., min ..., mean ...". */
inline std::string format(const Stats& s) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "median %.4f ms, p90 %.4f ms, min %.4f ms, mean %.4f ms",
                s.median_ms, s.p90_ms, s.min_ms, s.mean_ms);
  return buf;
}

/*! \brief A JSON object; fixed precision keeps it valid JSON and diff-friendly. */
inline std::string to_json(const Stats& s) {
  char buf[200];
  std::snprintf(buf, sizeof(buf),
                "{\"count\": %zu, \"min\": %.6f, \"median\": %.6f, \"p90\": %.6f, \"mean\": %.6f}",
                s.count, s.min_ms, s.median_ms, s.p90_ms, s.mean_ms);
  return buf;
}

/*! \brief Samples as a JSON array of milliseconds, in the order given. */
inline std::string to_json(const std::vector<double>& samples_ms) {
  std::string out = "[";
  char buf[32];
  for (size_t i = 0; i < samples_ms.size(); ++i) {
    std::snprintf(buf, sizeof(buf), "%s%.6f", i ? ", " : "", samples_ms[i]);
    out += buf;
  }
  return out + "]";
}

/*! \brief Monotonic stopwatch (steady_clock: immune to wall-clock adjustments). */
class Stopwatch {
 public:
  Stopwatch() : start_(std::chrono::steady_clock::now()) {}
  void restart() { start_ = std::chrono::steady_clock::now(); }
  double elapsed_ms() const {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

}  // namespace timing

#endif  // ONNX2DEPLOY_TIMING_H_
