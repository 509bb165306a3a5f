// FSDP2-style sharding of the decoder layers (see qlora/fsdp.h): shard at setup, then per layer
// all-gather (optionally prefetched), install views, reduce-scatter the LoRA gradients, reshard.
#include "qlora/fsdp.h"

#include <ATen/core/grad_mode.h>

#include <cmath>

#include "qlora/error.h"
#include "qlora/log.h"

namespace qlora {

namespace {

constexpr int64_t kAlign = 256;  // byte alignment of every region of a gathered buffer

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The bytes of a contiguous CPU or device tensor as a flat uint8 tensor (a view).
at::Tensor as_bytes(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  if (c.scalar_type() == at::kByte) return c.reshape({-1});
  return c.reshape({-1}).view(at::kByte);
}

// Appends one frozen tensor: its shard unit is `unit` bytes (whole double-quant groups, whole rows).
void add_frozen(ShardedLayer& sl, std::vector<at::Tensor>& local_parts, at::Tensor* slot, int64_t unit, int world,
                int rank) {
  const at::Tensor& t = *slot;
  FrozenShard f;
  f.slot = slot;
  f.shape = t.sizes().vec();
  f.dtype = t.scalar_type();
  f.nbytes = t.numel() * static_cast<int64_t>(t.element_size());
  f.shard_bytes = ceil_div(ceil_div(f.nbytes, unit), world) * unit;
  f.local_offset = 0;
  for (const at::Tensor& p : local_parts) f.local_offset += p.numel();
  f.gathered_offset = sl.gathered_bytes;
  sl.gathered_bytes = round_up(sl.gathered_bytes + f.shard_bytes * world, kAlign);

  const at::Tensor bytes = as_bytes(t);
  at::Tensor shard = at::zeros({f.shard_bytes}, bytes.options());
  const int64_t begin = std::min(f.nbytes, f.shard_bytes * rank);
  const int64_t end = std::min(f.nbytes, f.shard_bytes * (rank + 1));
  if (end > begin) shard.narrow(0, 0, end - begin).copy_(bytes.narrow(0, begin, end - begin));
  local_parts.push_back(shard);
  sl.frozen.push_back(std::move(f));
  *slot = at::Tensor();  // the whole tensor is freed once every rank took its shard
}

void add_linear(ShardedLayer& sl, std::vector<at::Tensor>& parts, LinearWeight& w, int world, int rank) {
  if (w.nf4) {
    NF4Tensor& q = *w.nf4;
    // A shard holds whole double-quantization groups: `group` blocks share one absmax2 value.
    const int64_t group = q.nested ? q.nested_blocksize : 256;
    add_frozen(sl, parts, &q.packed, q.blocksize * group / 2, world, rank);
    add_frozen(sl, parts, &q.absmax, group * static_cast<int64_t>(q.absmax.element_size()), world, rank);
    if (q.nested) add_frozen(sl, parts, &q.absmax2, 4, world, rank);
  } else {
    add_frozen(sl, parts, &w.dense, w.in_features * static_cast<int64_t>(w.dense.element_size()), world, rank);
  }
  if (w.bias.defined()) add_frozen(sl, parts, &w.bias, static_cast<int64_t>(w.bias.element_size()), world, rank);
}

}  // namespace

int64_t rows_per_rank(int64_t rows, int world) { return ceil_div(rows, world); }

ShardPlacement shard_placement(int64_t rows, int world, int rank) {
  const int64_t k = rows_per_rank(rows, world);
  ShardPlacement p;
  p.global_rows = rows;
  p.row_offset = std::min(rows, k * rank);
  p.rows = std::min(rows, k * (rank + 1)) - p.row_offset;
  return p;
}

at::Tensor shard_rows(const at::Tensor& full, int world, int rank) {
  const ShardPlacement p = shard_placement(full.size(0), world, rank);
  std::vector<int64_t> shape = full.sizes().vec();
  shape[0] = rows_per_rank(full.size(0), world);
  at::Tensor out = at::zeros(shape, full.options());
  if (p.rows > 0) out.narrow(0, 0, p.rows).copy_(full.narrow(0, p.row_offset, p.rows));
  return out;
}

Fsdp shard_model(LlamaWeights& model, LoraModel& lora, std::vector<at::Tensor>& params, std::shared_ptr<Collective> comm,
                 const FsdpOptions& options) {
  if (!comm) throw std::invalid_argument("shard_model: no collective");
  if (lora.layers.size() != model.layers.size())
    throw UserError(cat("shard_model: the adapter has ", lora.layers.size(), " layers, the model ", model.layers.size()));
  const int world = comm->world_size(), rank = comm->rank();
  Fsdp fsdp;
  fsdp.comm = std::move(comm);
  fsdp.options = options;
  fsdp.compute_dtype = model.compute_dtype;
  fsdp.layers.resize(model.layers.size());
  at::NoGradGuard no_grad;
  size_t param = 0;  // named_lora_parameters order: layer, projection, A then B
  for (size_t i = 0; i < model.layers.size(); ++i) {
    ShardedLayer& sl = fsdp.layers[i];
    DecoderLayerWeights& layer = model.layers[i];
    std::vector<at::Tensor> parts;
    for (const std::string& name : lora_projection_names()) {
      add_linear(sl, parts, base_projection(layer, name), world, rank);
      std::optional<LoraLinear>& ad = lora_projection(lora.layers[i], name);
      if (!ad) continue;
      for (at::Tensor* master : {&ad->A, &ad->B}) {
        if (param >= params.size() || !params[param].is_same(*master))
          throw std::logic_error("shard_model: params are not the adapter's masters in named_lora_parameters order");
        LoraShard s;
        s.slot = master;
        s.param = param;
        s.rows = master->size(0);
        s.cols = master->size(1);
        s.rows_per_rank = rows_per_rank(s.rows, world);
        s.gathered_offset = sl.gathered_lora_elems;
        sl.gathered_lora_elems += s.rows_per_rank * s.cols * world;
        params[param] = shard_rows(*master, world, rank).requires_grad_(true);
        *master = at::Tensor();
        sl.lora.push_back(s);
        ++param;
      }
    }
    sl.local = parts.empty() ? at::empty({0}, at::TensorOptions().dtype(at::kByte).device(model.device)) : at::cat(parts);
  }
  if (param != params.size()) throw std::logic_error("shard_model: more params than adapter masters");
  return fsdp;
}

void prefetch_layer(Fsdp& fsdp, size_t layer, const std::vector<at::Tensor>& params) {
  if (layer >= fsdp.layers.size()) return;
  ShardedLayer& sl = fsdp.layers[layer];
  if (sl.gathered.defined()) return;  // already gathered or on its way
  const int world = fsdp.comm->world_size();
  at::NoGradGuard no_grad;
  sl.gathered = at::empty({sl.gathered_bytes}, sl.local.options());
  sl.gathered_lora = at::empty({sl.gathered_lora_elems}, sl.local.options().dtype(fsdp.compute_dtype));
  std::vector<at::Tensor> outs, ins;
  for (const FrozenShard& f : sl.frozen) {
    outs.push_back(sl.gathered.narrow(0, f.gathered_offset, f.shard_bytes * world));
    ins.push_back(sl.local.narrow(0, f.local_offset, f.shard_bytes));
  }
  // LoRA shards travel in the compute dtype (FSDP2's param_dtype): the cast happens before the
  // gather, on the current stream, which NCCL waits for.
  for (const LoraShard& s : sl.lora) {
    outs.push_back(sl.gathered_lora.narrow(0, s.gathered_offset, s.rows_per_rank * s.cols * world));
    ins.push_back(params[s.param].detach().to(fsdp.compute_dtype).reshape({-1}));
  }
  sl.gather_work = fsdp.comm->all_gather(outs, ins);
}

void unshard_layer(Fsdp& fsdp, size_t layer, const std::vector<at::Tensor>& params) {
  ShardedLayer& sl = fsdp.layers.at(layer);
  if (sl.installed) return;
  prefetch_layer(fsdp, layer, params);
  sl.gather_work.wait();
  for (const FrozenShard& f : sl.frozen) {
    at::Tensor bytes = sl.gathered.narrow(0, f.gathered_offset, f.nbytes);
    *f.slot = (f.dtype == at::kByte ? bytes : bytes.view(f.dtype)).view(f.shape);
  }
  for (const LoraShard& s : sl.lora) {
    const at::Tensor full = sl.gathered_lora.narrow(0, s.gathered_offset, s.rows * s.cols).view({s.rows, s.cols});
    // A fresh fp32 leaf: LoRA's autograd casts it back to the compute dtype (exact) and returns fp32
    // gradients, so the numbers equal the unsharded run's; the extra fp32 copy is one layer's adapter.
    *s.slot = full.to(at::kFloat).detach().requires_grad_(true);
  }
  sl.installed = true;
}

void reshard_layer(Fsdp& fsdp, size_t layer) {
  ShardedLayer& sl = fsdp.layers.at(layer);
  sl.gather_work.wait();
  for (const FrozenShard& f : sl.frozen) *f.slot = at::Tensor();
  for (const LoraShard& s : sl.lora) *s.slot = at::Tensor();
  sl.gathered = at::Tensor();
  sl.gathered_lora = at::Tensor();
  sl.installed = false;
}

namespace {

// Waits for layer's pending reduce-scatter (if any) and adds its outputs into the shards' grads.
void accumulate_layer_grads(const Fsdp& fsdp, ShardedLayer& sl, const std::vector<at::Tensor>& params) {
  if (sl.grad_shards.empty()) return;
  const int world = fsdp.comm->world_size();
  const bool low = fsdp.options.reduce_in_compute_dtype && fsdp.compute_dtype != at::kFloat;
  const double post = low && fsdp.compute_dtype == at::kHalf ? std::sqrt(static_cast<double>(world)) : 1.0;
  at::NoGradGuard no_grad;
  sl.scatter_work.wait();
  for (size_t k = 0; k < sl.lora.size(); ++k) {
    at::Tensor g = sl.grad_shards[k].to(at::kFloat);
    if (post != 1.0) g.mul_(post);
    at::Tensor p = params[sl.lora[k].param];
    if (p.grad().defined()) p.mutable_grad().add_(g);
    else p.mutable_grad() = g.contiguous();
  }
  sl.grad_shards.clear();
}

}  // namespace

void reduce_scatter_layer_grads(Fsdp& fsdp, size_t layer, const std::vector<at::Tensor>& params) {
  ShardedLayer& sl = fsdp.layers.at(layer);
  const int world = fsdp.comm->world_size();
  accumulate_layer_grads(fsdp, sl, params);  // the previous micro-batch's, if still pending
  at::NoGradGuard no_grad;
  const bool low = fsdp.options.reduce_in_compute_dtype && fsdp.compute_dtype != at::kFloat;
  // fp16 sums of `world` terms may overflow: divide by sqrt(world) before, multiply after.
  const double pre = low && fsdp.compute_dtype == at::kHalf ? 1.0 / std::sqrt(static_cast<double>(world)) : 1.0;
  std::vector<at::Tensor> outs, ins;
  sl.grad_shards.clear();
  for (const LoraShard& s : sl.lora) {
    const at::Tensor& g = s.slot->defined() ? s.slot->grad() : at::Tensor();
    at::Tensor padded = at::zeros({s.rows_per_rank * world, s.cols},
                                  sl.local.options().dtype(low ? fsdp.compute_dtype : at::kFloat));
    if (g.defined()) {
      if (pre != 1.0) padded.narrow(0, 0, s.rows).copy_(g * pre);
      else padded.narrow(0, 0, s.rows).copy_(g);
    }
    at::Tensor out = at::empty({s.rows_per_rank, s.cols}, padded.options());
    ins.push_back(padded.reshape({-1}));
    outs.push_back(out.reshape({-1}));
    sl.grad_shards.push_back(out);
  }
  sl.scatter_work = fsdp.comm->reduce_scatter(outs, ins);
}

void finish_grads(Fsdp& fsdp, const std::vector<at::Tensor>& params) {
  for (ShardedLayer& sl : fsdp.layers) accumulate_layer_grads(fsdp, sl, params);
}

LoraModel gather_lora(Fsdp& fsdp, const LoraModel& lora, const std::vector<at::Tensor>& params) {
  const int world = fsdp.comm->world_size();
  LoraModel out = lora;  // the structure; the masters are replaced below
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < fsdp.layers.size(); ++i) {
    const ShardedLayer& sl = fsdp.layers[i];
    std::vector<at::Tensor> outs, ins, fulls;
    for (const LoraShard& s : sl.lora) {
      at::Tensor full = at::empty({s.rows_per_rank * world, s.cols}, params[s.param].options().requires_grad(false));
      outs.push_back(full.view({-1}));
      ins.push_back(params[s.param].detach().contiguous().view({-1}));
      fulls.push_back(full);
    }
    if (!outs.empty()) fsdp.comm->all_gather(outs, ins).wait();
    size_t k = 0;
    for (const std::string& name : lora_projection_names()) {
      std::optional<LoraLinear>& ad = lora_projection(out.layers[i], name);
      if (!ad) continue;
      ad->A = fulls[k].narrow(0, 0, sl.lora[k].rows).clone();
      ++k;
      ad->B = fulls[k].narrow(0, 0, sl.lora[k].rows).clone();
      ++k;
    }
  }
  return out;
}

FsdpFootprint fsdp_footprint(const Fsdp& fsdp) {
  FsdpFootprint f;
  const int world = fsdp.comm->world_size();
  for (const ShardedLayer& sl : fsdp.layers) {
    f.frozen_local_bytes += sl.local.numel();
    for (const FrozenShard& fr : sl.frozen) f.frozen_total_bytes += fr.nbytes;
    for (const LoraShard& s : sl.lora) {
      f.lora_local_elems += s.rows_per_rank * s.cols;
      f.lora_total_elems += s.rows * s.cols;
    }
  }
  (void)world;
  return f;
}

}  // namespace qlora
