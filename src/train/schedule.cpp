// Learning-rate schedules: transformers' get_constant_schedule, get_constant_schedule_with_warmup,
// get_linear_schedule_with_warmup and get_cosine_schedule_with_warmup, the lr_lambda of each in the
// same double arithmetic and operation order (so the lr matches HF Trainer's to the last bit), and
// TrainingArguments.get_warmup_steps for warmup_ratio.
#include <cmath>

#include "qlora/error.h"
#include "qlora/optim.h"

namespace qlora {

LrScheduleKind lr_schedule_kind_from_string(const std::string& s) {
  if (s == "constant") return LrScheduleKind::constant;
  if (s == "constant_with_warmup") return LrScheduleKind::constant_with_warmup;
  if (s == "linear") return LrScheduleKind::linear;
  if (s == "cosine") return LrScheduleKind::cosine;
  throw UserError("lr_scheduler: unknown schedule '" + s + "' (expected one of constant, constant_with_warmup, linear, cosine)");
}

std::string to_string(LrScheduleKind kind) {
  switch (kind) {
    case LrScheduleKind::constant: return "constant";
    case LrScheduleKind::constant_with_warmup: return "constant_with_warmup";
    case LrScheduleKind::linear: return "linear";
    case LrScheduleKind::cosine: return "cosine";
  }
  return "?";
}

int64_t resolve_warmup_steps(int64_t warmup_steps, double warmup_ratio, int64_t total_steps) {
  if (warmup_steps < 0) throw UserError("warmup_steps: " + std::to_string(warmup_steps) + " (expected >= 0)");
  if (!(warmup_ratio >= 0.0 && warmup_ratio <= 1.0))
    throw UserError("warmup_ratio: " + std::to_string(warmup_ratio) + " (expected a fraction in [0, 1])");
  if (warmup_steps > 0) return warmup_steps;
  return static_cast<int64_t>(std::ceil(static_cast<double>(total_steps) * warmup_ratio));
}

double lr_multiplier(const LrSchedule& s, int64_t step) {
  const int64_t warmup = s.warmup_steps;
  const auto d = [](int64_t v) { return static_cast<double>(v); };
  switch (s.kind) {
    case LrScheduleKind::constant:
      return 1.0;
    case LrScheduleKind::constant_with_warmup:
      if (step < warmup) return d(step) / std::max(1.0, d(warmup));
      return 1.0;
    case LrScheduleKind::linear:
      if (step < warmup) return d(step) / d(std::max<int64_t>(1, warmup));
      return std::max(0.0, d(s.total_steps - step) / d(std::max<int64_t>(1, s.total_steps - warmup)));
    case LrScheduleKind::cosine: {
      if (step < warmup) return d(step) / d(std::max<int64_t>(1, warmup));
      const double progress = d(step - warmup) / d(std::max<int64_t>(1, s.total_steps - warmup));
      // math.pi * float(num_cycles) * 2.0 * progress, evaluated left to right
      return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * s.num_cycles * 2.0 * progress)));
    }
  }
  return 1.0;
}

double lr_at(const LrSchedule& s, int64_t step) { return s.base_lr * lr_multiplier(s, step); }

}  // namespace qlora
