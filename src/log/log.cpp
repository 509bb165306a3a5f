// Process-wide logger (see include/qlora/log.h). Built as its own library without torch include
// paths, so that spdlog sees the system fmt and not libtorch's bundled copy.
#include "qlora/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdlib>

#include "qlora/error.h"

namespace qlora {
namespace {

spdlog::level::level_enum to_spdlog(LogLevel level) {
  switch (level) {
    case LogLevel::trace: return spdlog::level::trace;
    case LogLevel::debug: return spdlog::level::debug;
    case LogLevel::info: return spdlog::level::info;
    case LogLevel::warn: return spdlog::level::warn;
    case LogLevel::error: return spdlog::level::err;
    case LogLevel::critical: return spdlog::level::critical;
    case LogLevel::off: return spdlog::level::off;
  }
  return spdlog::level::info;
}

// Made once, thread-safely (a function-local static): ranks run as threads in one process (the
// in-process collective) log from their first lines, and a check-then-create on spdlog's registry
// let two of them race ("logger with name 'qlora' already exists").
std::shared_ptr<spdlog::logger> logger() {
  static const std::shared_ptr<spdlog::logger> l = [] {
    if (auto existing = spdlog::get("qlora")) return existing;
    auto made = spdlog::stderr_color_mt("qlora");
    made->set_pattern("[r" + std::to_string(env_rank()) + "] %^%l%$: %v");
    return made;
  }();
  return l;
}

}  // namespace

int env_rank() {
  const char* r = std::getenv("RANK");
  if (r == nullptr || *r == '\0') return 0;
  char* end = nullptr;
  long v = std::strtol(r, &end, 10);
  return (end && *end == '\0' && v >= 0) ? static_cast<int>(v) : 0;
}

void init_logging(const std::string& level, int rank) {
  auto lvl = spdlog::level::from_str(level);
  // from_str maps unknown names to "off"; only the literal "off" may mean off.
  if (lvl == spdlog::level::off && level != "off")
    throw UserError("--log-level '" + level + "': expected one of trace, debug, info, warn, error, critical, off");
  if (rank < 0) rank = env_rank();
  auto l = logger();
  l->set_pattern("[r" + std::to_string(rank) + "] %^%l%$: %v");
  l->set_level(lvl);
}

void log_message(LogLevel level, const std::string& message) { logger()->log(to_spdlog(level), message); }

bool log_enabled(LogLevel level) { return logger()->should_log(to_spdlog(level)); }

}  // namespace qlora
