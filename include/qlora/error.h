// User-facing errors. A UserError is bad input (a missing file, a config typo, a corrupt header, a
// shape that does not match): the CLI prints its one-line message and exits with status 2.
// OutOfMemory (the GPU ran out during training; the message names the phase and what to lower):
// exit status 3. TrainingStopped (training cannot go on, e.g. non-finite losses in bf16/fp32; the
// message names the step and the last good checkpoint): exit status 4. WriteError (an output could
// not be written: disk full, a file size limit, an I/O error; the message names the file and the
// cause, and what was saved before is intact): exit status 5. Everything else (a
// bug) is an internal error: exit status 1.
#pragma once
#include <stdexcept>
#include <string>

namespace qlora {

struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct OutOfMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct TrainingStopped : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A UserError so that every caller that reports bad input as one clean line does the same for a
// failed write; qlora train tells the two apart by the exit status.
struct WriteError : UserError {
  using UserError::UserError;
};

// Exit statuses of the qlora binary.
inline constexpr int kExitOk = 0;
inline constexpr int kExitInternal = 1;
inline constexpr int kExitUserError = 2;
inline constexpr int kExitOutOfMemory = 3;
inline constexpr int kExitTrainingStopped = 4;
inline constexpr int kExitWriteFailed = 5;

}  // namespace qlora
