// Host memory available to the process and the activation-offloading fit check (qlora/host_memory.h).
#include "qlora/host_memory.h"

#include <cctype>
#include <fstream>
#include <limits>
#include <sstream>

#include "qlora/error.h"
#include "qlora/log.h"

namespace qlora {
namespace {

// Leading decimal digits of s from pos (spaces skipped first); nullopt for none or on overflow.
std::optional<int64_t> read_count(const std::string& s, size_t& pos) {
  while (pos < s.size() && (s[pos] == ' ' || s[pos] == '\t')) ++pos;
  if (pos >= s.size() || !std::isdigit(static_cast<unsigned char>(s[pos]))) return std::nullopt;
  int64_t v = 0;
  for (; pos < s.size() && std::isdigit(static_cast<unsigned char>(s[pos])); ++pos) {
    const int d = s[pos] - '0';
    if (v > (std::numeric_limits<int64_t>::max() - d) / 10) return std::nullopt;
    v = v * 10 + d;
  }
  return v;
}

std::string read_small_file(const char* path) {
  std::ifstream in(path);
  if (!in) return {};
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

double gib(int64_t b) { return static_cast<double>(b) / double(int64_t{1} << 30); }

}  // namespace

std::optional<int64_t> parse_meminfo_available(const std::string& meminfo) {
  const std::string key = "MemAvailable:";
  size_t line = 0;
  while (line < meminfo.size()) {
    const size_t end = std::min(meminfo.find('\n', line), meminfo.size());
    if (meminfo.compare(line, key.size(), key) == 0) {
      size_t pos = line + key.size();
      const auto kb = read_count(meminfo, pos);
      if (!kb) return std::nullopt;
      while (pos < end && meminfo[pos] == ' ') ++pos;
      if (meminfo.compare(pos, end - pos, "kB") != 0) return std::nullopt;
      if (*kb > std::numeric_limits<int64_t>::max() / 1024) return std::nullopt;
      return *kb * 1024;
    }
    line = end + 1;
  }
  return std::nullopt;
}

std::optional<int64_t> parse_cgroup_bytes(const std::string& text) {
  size_t pos = 0;
  const auto v = read_count(text, pos);
  if (!v) return std::nullopt;  // "max", empty, garbage
  while (pos < text.size() && std::isspace(static_cast<unsigned char>(text[pos]))) ++pos;
  if (pos != text.size()) return std::nullopt;
  return v;
}

HostMemory host_memory_available() {
  HostMemory h;
  if (const auto avail = parse_meminfo_available(read_small_file("/proc/meminfo"))) {
    h.available = *avail;
    h.source = "MemAvailable";
  }
  // cgroup v2, then v1 (v1 reports "no limit" as a huge number, which the min below ignores).
  const std::pair<const char*, const char*> cgroups[] = {
      {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"},
      {"/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"}};
  for (const auto& [limit_path, usage_path] : cgroups) {
    const auto limit = parse_cgroup_bytes(read_small_file(limit_path));
    const auto usage = parse_cgroup_bytes(read_small_file(usage_path));
    if (!limit || !usage) continue;
    const int64_t left = std::max<int64_t>(0, *limit - *usage);
    if (h.available < 0 || left < h.available) {
      h.available = left;
      h.source = "cgroup limit";
    }
    break;
  }
  return h;
}

int64_t offload_pinned_bytes(int64_t layers, int64_t tokens, int64_t hidden, int64_t element_size) {
  if (layers <= 0 || tokens <= 0 || hidden <= 0 || element_size <= 0) return 0;
  const int64_t one = tokens * hidden * element_size;
  int64_t rounded = 1;
  while (rounded < one) rounded <<= 1;
  return layers * rounded;
}

bool host_memory_fits(int64_t needed, int local_ranks, const HostMemory& host) {
  if (host.available < 0 || needed <= 0) return true;
  const int64_t total = needed * std::max(1, local_ranks);
  return static_cast<double>(total) <= 0.9 * static_cast<double>(host.available);
}

void check_host_memory_fits(int64_t needed, int local_ranks, const HostMemory& host, const std::string& what,
                            const std::string& detail) {
  if (host_memory_fits(needed, local_ranks, host)) return;
  const int64_t total = needed * std::max(1, local_ranks);
  throw UserError(cat(what, ": needs ", fixed(gib(total), 1), " GiB of pinned host memory (", detail,
                      local_ranks > 1 ? cat(", x ", local_ranks, " ranks on this host") : std::string(),
                      "), more than 90 % of the ", fixed(gib(host.available), 1), " GiB the host has available (",
                      host.source, "); lower sequence_len or micro_batch_size, or turn ", what, " off"));
}

}  // namespace qlora
