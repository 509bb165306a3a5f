// User-facing errors. A UserError is bad input (a missing file, a config typo, a corrupt header, a
// shape that does not match): the CLI prints its one-line message and exits with status 2.
// Everything else (a bug, an out-of-memory) is an internal error: exit status 1.
#pragma once
#include <stdexcept>
#include <string>

namespace qlora {

struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Exit statuses of the qlora binary.
inline constexpr int kExitOk = 0;
inline constexpr int kExitInternal = 1;
inline constexpr int kExitUserError = 2;

}  // namespace qlora
