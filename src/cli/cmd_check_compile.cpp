// qlora check-compile CONFIG [key=value ...]: traces one training forward of the configured model
// (the model and LoRA exactly as `qlora train` sets them up, a random batch) with the C++ JIT tracer
// and reports every op of the graph: can torch.compile / torch.export trace it (a Meta kernel or a
// composite one) and is its output shape independent of the data? Exit 0 when clean, 1 when an op
// is flagged (listed), 2 for a bad config. Writes nothing.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/jit/ir/ir.h>
#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <algorithm>
#include <chrono>
#include <iostream>

#include "cli/commands.h"
#include "qlora/config.h"
#include "qlora/error.h"
#include "qlora/export.h"
#include "qlora/log.h"
#include "qlora/lora.h"
#include "qlora/model.h"
#include "qlora/trainer.h"

namespace qlora::cli {

CommandFn add_check_compile_command(CLI::App& app) {
  struct State {
    std::string config_path;
    std::vector<std::string> overrides;
    int64_t seq = 16;
    bool print_graph = false;
  };
  auto st = std::make_shared<State>();
  auto* sub = app.add_subcommand(
      "check-compile",
      "trace one training forward of a config's model and check each op for torch.compile/torch.export "
      "(Meta kernel, data-independent output shape); exit 0 clean, 1 flagged");
  sub->add_option("config", st->config_path, "YAML config file (as for qlora train)");
  sub->add_option("overrides", st->overrides, "key=value overrides, e.g. device=cpu lora_r=8");
  sub->add_option("--seq", st->seq, "tokens in the traced batch (one row)")->capture_default_str();
  sub->add_flag("--graph", st->print_graph, "also print the traced graph");
  return [st] {
    if (st->config_path.empty()) throw UserError("qlora check-compile: expected a CONFIG.yaml argument");
    if (st->seq < 2) throw UserError("qlora check-compile: --seq must be at least 2, found " + std::to_string(st->seq));
    const TrainConfig config = load_config(st->config_path, st->overrides);

    // Device, dtype, model and LoRA as make_trainer sets them up (src/train/trainer.cpp).
    const at::Device device = resolve_train_device(config.device);
#ifdef QLORA_WITH_CUDA
    if (device.is_cuda()) c10::cuda::set_device(device.index());
#endif
    ModelLoadOptions mo;
    mo.load_in_4bit = config.adapter == AdapterType::qlora && config.load_in_4bit;
    mo.double_quant = config.bnb_4bit_use_double_quant;
    mo.compute_dtype = resolve_compute_dtype(config, device);
    mo.device = device;
    const auto t0 = std::chrono::steady_clock::now();
    const LlamaWeights model = load_llama(config.base_model, mo);
    // LoRA dropout is a random mask per call: a trace would freeze one draw into the graph as a
    // constant, so the traced forward runs with dropout 0 (the op sequence is otherwise the same;
    // dropout itself is aten::native_dropout / bernoulli, both with Meta kernels).
    LoraOptions lo = lora_options_from_config(config);
    const double config_dropout = lo.dropout;
    lo.dropout = 0.0;
    LoraModel lora = make_lora(model, lo, static_cast<uint64_t>(config.seed));

    // A random batch: one row of --seq tokens, labels = the next token (last one ignored).
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(config.seed));
    const at::Tensor ids_cpu = at::randint(model.config.vocab_size, {1, st->seq}, gen, at::TensorOptions().dtype(at::kLong));
    at::Tensor labels_cpu = at::full({1, st->seq}, -100, at::TensorOptions().dtype(at::kLong));
    labels_cpu.narrow(1, 0, st->seq - 1).copy_(ids_cpu.narrow(1, 1, st->seq - 1));
    DequantScratch scratch;
    const TracedForward traced = trace_training_forward(model, lora, ids_cpu.to(device), labels_cpu.to(device), scratch);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    std::vector<OpCheck> ops = check_graph_ops(*traced.graph);
    ops.insert(ops.end(), traced.host_syncs.begin(), traced.host_syncs.end());
    std::sort(ops.begin(), ops.end(), [](const OpCheck& a, const OpCheck& b) { return a.name < b.name; });

    std::cout << "# qlora check-compile " << st->config_path << "\n"
              << "model: " << config.base_model << " (" << model.layers.size() << " layers, "
              << (mo.load_in_4bit ? "NF4" : "16-bit") << " base, compute " << torch_dtype_name(mo.compute_dtype)
              << " on " << device.str() << "); LoRA r " << lo.r << " on " << lo.target_modules.size()
              << " projections\n"
              << "traced: embedding -> " << model.layers.size()
              << " decoder layers (training) -> final norm -> qlora::fused_linear_cross_entropy, batch 1 x " << st->seq
              << ", loss " << traced.loss.item<double>() << " (" << secs << " s with loading)\n"
              << "not traced: LoRA dropout (" << config_dropout
              << " in the config; off in the trace, its mask would be frozen), the packed-row mask of "
                 "attention_inputs (rows here are single documents)\n";
    if (st->print_graph) std::cout << *traced.graph;
    std::cout << "ops:\n" << format_op_checks(ops);
    return op_checks_exit_status(ops);
  };
}

}  // namespace qlora::cli
