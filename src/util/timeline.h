// Where a profiled GPU timeline sat idle: the longest gaps between kernels, each with the kernels on
// either side and the host operation that was running in its middle (what the GPU waited for: a
// host sync and the launches after it, host-side data work, a pageable copy). Pure interval
// arithmetic on profiler events, so it is tested on the CPU; qlora bench train feeds it Kineto's
// CUDA kernel and CPU op events.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qlora {

struct TimedEvent {
  int64_t start_ns = 0, end_ns = 0;
  std::string name;
};

struct IdleGap {
  double ms = 0;
  std::string before, after;  // the kernel that ended last before the gap / the one that started it
  std::string host;           // the innermost host event spanning the gap's middle ("" when none)
};

struct IdleSummary {
  double total_ms = 0;             // the sum of every gap between the first kernel's start and the last one's end
  std::vector<IdleGap> longest;    // the longest gaps, longest first
};

// kernels: device events on any stream (overlapping ones merge into one busy interval); host:
// host-side events, nested or not. Gaps shorter than min_gap_ns are summed but not listed.
IdleSummary idle_gaps(std::vector<TimedEvent> kernels, const std::vector<TimedEvent>& host, size_t n_longest,
                      int64_t min_gap_ns = 0);

}  // namespace qlora
