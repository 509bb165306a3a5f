// idle_gaps: see timeline.h.
#include "util/timeline.h"

#include <algorithm>

namespace qlora {

IdleSummary idle_gaps(std::vector<TimedEvent> kernels, const std::vector<TimedEvent>& host, size_t n_longest,
                      int64_t min_gap_ns) {
  IdleSummary s;
  if (kernels.empty()) return s;
  std::sort(kernels.begin(), kernels.end(),
            [](const TimedEvent& a, const TimedEvent& b) { return a.start_ns < b.start_ns; });
  std::vector<IdleGap> gaps;
  // Walk the kernels in start order, keeping the end of the busy interval so far and the kernel that
  // reaches it (a kernel on a second stream may end before an earlier-started long one does).
  int64_t busy_end = kernels[0].end_ns;
  const TimedEvent* last = &kernels[0];
  for (size_t i = 1; i < kernels.size(); ++i) {
    const TimedEvent& k = kernels[i];
    if (k.start_ns > busy_end) {
      const int64_t gap = k.start_ns - busy_end;
      s.total_ms += static_cast<double>(gap) / 1e6;
      if (gap >= min_gap_ns) {
        IdleGap g;
        g.ms = static_cast<double>(gap) / 1e6;
        g.before = last->name;
        g.after = k.name;
        const int64_t mid = busy_end + gap / 2;
        int64_t shortest = -1;
        for (const TimedEvent& h : host)
          if (h.start_ns <= mid && mid < h.end_ns && (shortest < 0 || h.end_ns - h.start_ns < shortest)) {
            shortest = h.end_ns - h.start_ns;
            g.host = h.name;
          }
        gaps.push_back(std::move(g));
      }
    }
    if (k.end_ns > busy_end) {
      busy_end = k.end_ns;
      last = &k;
    }
  }
  std::stable_sort(gaps.begin(), gaps.end(), [](const IdleGap& a, const IdleGap& b) { return a.ms > b.ms; });
  if (gaps.size() > n_longest) gaps.resize(n_longest);
  s.longest = std::move(gaps);
  return s;
}

}  // namespace qlora
