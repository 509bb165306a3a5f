// Compile compatibility and inference export (issue 9): tracing our C++ forward with the JIT tracer,
// the per-op report of `qlora check-compile` (does every op in the traced graph have a Meta kernel,
// or a composite one, and a data-independent output shape?) and the legacy TorchScript export of
// `qlora export --format torchscript` (the traced logits forward as a torch::jit::Module).
//
// What the C++ tracer sees: every op called through the dispatcher at the outermost level (ops that
// a traced op calls internally are not recorded, so qlora::nf4_lora_linear is one node, not its
// dequant and GEMMs). Shapes are recorded as constants: a trace is for one input shape. Host syncs
// (.item()) leave no node (the value is baked in); trace_training_forward counts them separately.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "qlora/lora.h"
#include "qlora/model.h"

namespace torch::jit {
struct Graph;
struct Module;
}  // namespace torch::jit

namespace qlora {

// ---- the op report -------------------------------------------------------------------------------

// How an op can run on Meta tensors (what torch.compile / torch.export trace with), from its
// registrations in the c10 dispatcher. Anything but `none` / `unknown_op` is fine.
enum class MetaSupport {
  kernel,              // a Meta kernel is registered
  composite_implicit,  // CompositeImplicitAutograd: a compiler decomposes it into the ops it calls
                       // (aten::linear -> matmul, ...), which is how it runs on Meta tensors too
  composite_explicit,  // CompositeExplicitAutograd(NonFunctional): one kernel for every backend, Meta included
  none,                // none of these: a compiler cannot trace through it (flagged)
  unknown_op,          // not a registered operator (flagged)
};
const char* meta_support_name(MetaSupport m);  // "yes", "composite (implicit)", "composite (explicit)", "NO", "unknown op"

struct OpCheck {
  std::string name;                    // "aten::add.Tensor", "qlora::nf4_lora_linear" (with the overload, if any)
  int64_t count = 0;                   // nodes (or host syncs) in the trace
  MetaSupport meta = MetaSupport::none;
  bool data_dependent_output = false;  // at::Tag::data_dependent_output (item, _local_scalar_dense, ...)
  bool dynamic_output_shape = false;   // at::Tag::dynamic_output_shape (nonzero, unique, masked_select, ...)
  bool host_sync = false;              // seen as a call (.item()) that left no node in the graph
  bool flagged() const {
    return meta == MetaSupport::none || meta == MetaSupport::unknown_op || data_dependent_output ||
           dynamic_output_shape;
  }
};

// Looks `name` ("ns::op" or "ns::op.overload") up in c10::Dispatcher.
OpCheck check_op(const std::string& name, int64_t count = 1);

// One entry per distinct operator node of `graph` (sub-blocks included; prim::* skipped), sorted by
// name, with its count.
std::vector<OpCheck> check_graph_ops(const torch::jit::Graph& graph);

// One line per op ("  aten::mm  x12  meta: yes  data-dependent: no") and a summary line.
std::string format_op_checks(const std::vector<OpCheck>& ops);

// 0 when no op is flagged, 1 otherwise (the exit status of `qlora check-compile`).
int op_checks_exit_status(const std::vector<OpCheck>& ops);

// Runs `fn` and returns the host syncs it made at the top level: aten::item / aten::_local_scalar_dense
// called by fn's own code (not from inside another op's kernel, which a compiler never looks into),
// one OpCheck per op name with its count and host_sync set. The JIT tracer records no node for
// them (the number is baked into the graph), so trace_training_forward counts them this way.
std::vector<OpCheck> top_level_host_syncs(const std::function<void()>& fn);

// ---- tracing -------------------------------------------------------------------------------------

// One training forward as the trainer runs it (DESIGN.md "Data flow"), traced: embedding ->
// every decoder layer with `lora` (training = true) -> final norm -> qlora::fused_linear_cross_entropy
// (mean over the non-ignored labels). input_ids / labels: int64 [B, T] on the model's device.
// Rows are single documents (no position ids): the packed-row mask of attention_inputs is decided by
// one host sync per batch, which a compiled step would take as an input. LoRA dropout must be 0 in
// `lora` (the masks are random draws a trace would freeze; std::invalid_argument otherwise). The
// LoRA masters are the trace's inputs (after input_ids and labels), every other weight a constant.
struct TracedForward {
  std::shared_ptr<torch::jit::Graph> graph;
  at::Tensor loss;                       // the loss the traced run computed
  std::vector<OpCheck> host_syncs;       // aten::item / aten::_local_scalar_dense called at the top
                                         // level during the trace (host syncs the graph cannot show)
};
TracedForward trace_training_forward(const LlamaWeights& model, const LoraModel& lora, const at::Tensor& input_ids,
                                     const at::Tensor& labels, DequantScratch& scratch);

// The logits forward (llama_logits, inference: no dropout, no grad) traced for input_ids of shape
// [1, seq_len] as a torch::jit::Module: the model's and the adapter's tensors are its buffers
// (named after their HF / PEFT names with '.' -> '_'), `forward(input_ids) -> logits` (fp32
// [1, seq_len, vocab]) checks the input shape and runs the traced graph (method `forward_traced`).
// NF4 weights stay NF4: each projection is a qlora::nf4_lora_linear node, so whoever loads the module
// must have the qlora ops registered (libqlora_ops; Python: torch.ops.load_library). `lora` may be
// nullptr; its masters become buffers as they are, with requires_grad switched off (in place).
torch::jit::Module trace_logits_module(const LlamaWeights& model, const LoraModel* lora, int64_t seq_len);

}  // namespace qlora
