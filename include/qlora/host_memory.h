// Host (CPU) memory available to this process, and the check that activation offloading fits in
// it: the offloaded layer inputs live in pinned memory, which the kernel cannot swap out, so a run
// that needs more than the host has is ended by the OOM killer mid-step (measured: an 8B run at
// 262,144 tokens wanted 64 GiB pinned on a 125 GiB box that still cached 32 GiB from an earlier
// size). Checking before the first step turns that into a one-line error.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace qlora {

// "MemAvailable:  123456 kB" from /proc/meminfo text, in bytes; nullopt when the line is missing
// or malformed (no number, a unit other than kB, a value that overflows).
std::optional<int64_t> parse_meminfo_available(const std::string& meminfo);

// A cgroup v2 memory.max / memory.current (or v1 memory.limit_in_bytes / usage_in_bytes) file:
// a byte count; "max" (no limit) and anything malformed give nullopt.
std::optional<int64_t> parse_cgroup_bytes(const std::string& text);

struct HostMemory {
  int64_t available = -1;  // bytes; -1 when nothing could be read (the check is then skipped)
  std::string source;      // "MemAvailable" or "cgroup limit"
};
// The smaller of MemAvailable and the cgroup's limit minus its usage.
HostMemory host_memory_available();

// The pinned host bytes activation offloading holds at its peak: one input [tokens, hidden] per
// offloaded layer, each rounded up to a power of two as PyTorch's caching host allocator does.
int64_t offload_pinned_bytes(int64_t layers, int64_t tokens, int64_t hidden, int64_t element_size);

// Whether `needed` bytes (times the ranks sharing this host) fit in 90 % of what `host` says is
// available (true when nothing could be read).
bool host_memory_fits(int64_t needed, int local_ranks, const HostMemory& host);
// Throws UserError when `needed` bytes (times the ranks sharing this host) do not fit in 90 % of
// what `host` says is available; `what` names the setting, e.g. "activation_offloading".
void check_host_memory_fits(int64_t needed, int local_ranks, const HostMemory& host, const std::string& what,
                            const std::string& detail);

}  // namespace qlora
