// Dynamic loss scaling for fp16 compute, with torch.amp.GradScaler's semantics: scale the loss,
// unscale the grads in place with one fused inf/NaN check per (device, dtype) group, skip the step
// when anything overflowed, back off or grow the scale. The scale never leaves the device except
// when the caller asks for its value; the skip decision is the one host sync per step.
#include <cmath>
#include <map>
#include <tuple>

#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/optim.h"

#include <ATen/core/grad_mode.h>

namespace qlora {

LossScaler make_loss_scaler(const LossScalerOptions& o, const at::Device& device) {
  if (!(o.init_scale > 0) || !std::isfinite(o.init_scale))
    throw UserError(cat("loss scaler: init_scale ", o.init_scale, " (expected a finite value > 0)"));
  if (!(o.growth_factor > 1.0)) throw UserError(cat("loss scaler: growth_factor ", o.growth_factor, " (expected > 1)"));
  if (!(o.backoff_factor > 0.0 && o.backoff_factor < 1.0))
    throw UserError(cat("loss scaler: backoff_factor ", o.backoff_factor, " (expected in (0, 1))"));
  if (o.growth_interval <= 0) throw UserError(cat("loss scaler: growth_interval ", o.growth_interval, " (expected > 0)"));
  LossScaler s;
  s.options = o;
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  s.scale = at::full({}, o.init_scale, f32);
  s.growth_tracker = at::zeros({}, at::TensorOptions().dtype(at::kInt).device(device));
  s.found_inf = at::zeros({}, f32);
  return s;
}

at::Tensor scale_loss(const LossScaler& scaler, const at::Tensor& loss) {
  return loss * scaler.scale.to(loss.device(), /*non_blocking=*/true);
}

bool unscale_grads(LossScaler& scaler, const std::vector<at::Tensor>& grads, const AllReduceFn& all_reduce_sum) {
  at::NoGradGuard no_grad;
  // inv_scale = scale.double().reciprocal().float(), as GradScaler.unscale_.
  const at::Tensor inv_scale = scaler.scale.to(at::kDouble).reciprocal().to(at::kFloat);
  // Group by (device, dtype): the fused check-and-unscale takes one of each per call; each device
  // gets its own found_inf and inv_scale, summed into the scaler's at the end.
  using Key = std::tuple<int, int, int>;
  std::map<Key, std::vector<at::Tensor>> groups;
  for (const auto& g : grads) {
    if (!g.defined()) continue;
    if (!at::isFloatingType(g.scalar_type()))
      throw UserError(std::string("loss scaler: a gradient is ") + c10::toString(g.scalar_type()) + " (expected a floating type)");
    groups[{static_cast<int>(g.device().type()), static_cast<int>(g.device().index()), static_cast<int>(g.scalar_type())}]
        .push_back(g);
  }
  std::map<std::pair<int, int>, std::pair<at::Tensor, at::Tensor>> per_device;  // found_inf, inv_scale
  for (auto& [key, gs] : groups) {
    const at::Device dev = gs.front().device();
    auto& fi = per_device[{static_cast<int>(dev.type()), static_cast<int>(dev.index())}];
    if (!fi.first.defined()) {
      fi.first = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(dev));
      fi.second = inv_scale.to(dev);
    }
    at::_amp_foreach_non_finite_check_and_unscale_(gs, fi.first, fi.second);
  }
  at::Tensor found = at::zeros({}, scaler.scale.options());
  for (auto& [dev, fi] : per_device) found.add_(fi.first.to(found.device()));
  if (all_reduce_sum) all_reduce_sum(found);
  scaler.found_inf = found;
  return found.item<float>() != 0.0f;
}

void update_loss_scale(LossScaler& scaler) {
  const LossScalerOptions& o = scaler.options;
  at::_amp_update_scale_(scaler.scale, scaler.growth_tracker, scaler.found_inf, o.growth_factor, o.backoff_factor,
                         o.growth_interval);
  scaler.found_inf.zero_();
}

double loss_scale_value(const LossScaler& scaler) { return scaler.scale.item<double>(); }

nlohmann::json loss_scaler_state(const LossScaler& scaler) {
  return {{"scale", scaler.scale.item<double>()},
          {"growth_factor", scaler.options.growth_factor},
          {"backoff_factor", scaler.options.backoff_factor},
          {"growth_interval", scaler.options.growth_interval},
          {"_growth_tracker", scaler.growth_tracker.item<int64_t>()}};
}

void load_loss_scaler_state(LossScaler& scaler, const nlohmann::json& state) {
  if (!state.is_object() || !state.contains("scale") || !state["scale"].is_number() ||
      !state.contains("_growth_tracker") || !state["_growth_tracker"].is_number_integer())
    throw UserError("loss scaler state: expected an object with a number 'scale' and an integer '_growth_tracker', found " +
                    state.dump());
  const double scale = state["scale"].get<double>();
  if (!(scale > 0) || !std::isfinite(scale))
    throw UserError(cat("loss scaler state: scale ", scale, " (expected a finite value > 0)"));
  const int64_t tracker = state["_growth_tracker"].get<int64_t>();
  if (tracker < 0) throw UserError(cat("loss scaler state: _growth_tracker ", tracker, " (expected >= 0)"));
  scaler.scale.fill_(scale);
  scaler.growth_tracker.fill_(tracker);
  scaler.found_inf.zero_();
}

}  // namespace qlora
