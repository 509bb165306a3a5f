// Logging: one process-wide logger (spdlog underneath), every line prefixed with the rank ("[r0]")
// so that the output of several processes stays readable. Messages are plain strings built with
// qlora::cat(...): spdlog's fmt and libtorch's bundled fmt are different versions and must never
// meet in one translation unit, so only src/util/log.cpp (library qlora_log, no torch) includes
// spdlog.
#pragma once
#include <sstream>
#include <string>

namespace qlora {

enum class LogLevel { trace, debug, info, warn, error, critical, off };

// Installs the process logger. `level` is one of trace, debug, info, warn, error, critical, off;
// anything else is a UserError naming the accepted levels. `rank` comes from RANK when < 0.
void init_logging(const std::string& level = "info", int rank = -1);

// The rank this process was launched as (RANK, else 0).
int env_rank();

void log_message(LogLevel level, const std::string& message);
bool log_enabled(LogLevel level);

inline void log_debug(const std::string& m) { log_message(LogLevel::debug, m); }
inline void log_info(const std::string& m) { log_message(LogLevel::info, m); }
inline void log_warn(const std::string& m) { log_message(LogLevel::warn, m); }
inline void log_error(const std::string& m) { log_message(LogLevel::error, m); }

// fixed(3.14159, 2) -> "3.14": the one fixed-point number format of log lines and reports.
inline std::string fixed(double v, int digits) {
  std::ostringstream s;
  s.setf(std::ios::fixed, std::ios::floatfield);
  s.precision(digits);
  s << v;
  return s.str();
}

// cat("step ", 3, " loss ", 1.25) -> "step 3 loss 1.25"
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}

}  // namespace qlora
