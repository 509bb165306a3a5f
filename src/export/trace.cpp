// Tracing our C++ forward with the JIT tracer (torch::jit::tracer::trace): one training forward for
// `qlora check-compile`, and the logits forward as a torch::jit::Module for `qlora export --format
// torchscript`. While the tracer is active, the model code sends NF4 projections through the
// dispatcher as qlora::nf4_lora_linear (src/model/lora.cpp) and the loss here is called as the op
// qlora::fused_linear_cross_entropy, so each is one node of the graph, not its kernels' ATen calls.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <unordered_set>

#include "qlora/export.h"

namespace qlora {

namespace {

// ---- host syncs -----------------------------------------------------------------------------------
// A RecordFunction observer on this thread: the depth of nested op calls (the dispatcher records
// every op call, nested ones too) and, at depth 1, the item / _local_scalar_dense calls.

thread_local int t_depth = 0;
thread_local std::map<std::string, int64_t>* t_syncs = nullptr;

std::unique_ptr<at::ObserverContext> sync_start(const at::RecordFunction& fn) {
  if (++t_depth == 1 && t_syncs != nullptr) {
    const char* name = fn.name();
    if (std::strcmp(name, "aten::item") == 0 || std::strcmp(name, "aten::_local_scalar_dense") == 0) ++(*t_syncs)[name];
  }
  return nullptr;
}

void sync_end(const at::RecordFunction&, at::ObserverContext*) { --t_depth; }

std::string buffer_name(std::string name) {
  std::replace(name.begin(), name.end(), '.', '_');
  return name;
}

using FlceOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, c10::string_view, double,
                          double, double, double, int64_t);

c10::TypedOperatorHandle<FlceOp> flce_op() {
  const auto h = c10::Dispatcher::singleton().findSchema({"qlora::fused_linear_cross_entropy", ""});
  if (!h)
    throw std::runtime_error("the op qlora::fused_linear_cross_entropy is not registered: link libqlora_ops (the qlora "
                             "binary and qlora_tests do)");
  return h->typed<FlceOp>();
}

}  // namespace

std::vector<OpCheck> top_level_host_syncs(const std::function<void()>& fn) {
  std::map<std::string, int64_t> syncs;
  struct Observer {
    at::CallbackHandle handle;
    explicit Observer(std::map<std::string, int64_t>* s) {
      t_depth = 0;
      t_syncs = s;
      handle = at::addThreadLocalCallback(
          at::RecordFunctionCallback(sync_start, sync_end).scopes({at::RecordScope::FUNCTION}));
    }
    ~Observer() {
      at::removeCallback(handle);
      t_syncs = nullptr;
    }
  };
  {
    Observer observe(&syncs);
    fn();
  }
  std::vector<OpCheck> out;
  for (const auto& [name, n] : syncs) {
    OpCheck c = check_op(name, n);
    c.host_sync = true;
    out.push_back(c);
  }
  return out;
}

TracedForward trace_training_forward(const LlamaWeights& model, const LoraModel& lora, const at::Tensor& input_ids,
                                     const at::Tensor& labels, DequantScratch& scratch) {
  if (lora.layers.size() != model.layers.size())
    throw std::invalid_argument("trace_training_forward: the LoRA has " + std::to_string(lora.layers.size()) +
                                " layers, the model " + std::to_string(model.layers.size()));
  for (const LoraLayer& l : lora.layers)
    for (const std::string& p : lora_projection_names())
      if (const auto& a = lora_projection(l, p); a && a->dropout > 0)
        throw std::invalid_argument("trace_training_forward: LoRA dropout must be 0 (a trace would freeze one mask)");
  const auto loss_op = flce_op();

  // Inputs: the batch, then every LoRA master (they require grad: the tracer cannot make them
  // constants). The model code reads the masters from `lora`: the same tensors, so the same values.
  torch::jit::Stack inputs{input_ids, labels};
  std::vector<std::string> names{"input_ids", "labels"};
  for (const auto& [name, p] : named_lora_parameters(lora)) {
    inputs.emplace_back(p);
    names.push_back(buffer_name(name));
  }
  auto fn = [&](torch::jit::Stack in) -> torch::jit::Stack {
    const at::Tensor ids = in.at(0).toTensor();
    const at::Tensor targets = in.at(1).toTensor();
    const int64_t B = ids.size(0), T = ids.size(1);
    const AttentionInputs attn = attention_inputs(model, at::Tensor(), B, T);
    at::Tensor h = at::embedding(model.embed_tokens, ids);
    for (size_t i = 0; i < model.layers.size(); ++i)
      h = decoder_layer(h, model.layers[i], model, attn, scratch, &lora.layers[i], /*training=*/true);
    const at::Tensor x = rms_norm(h, model.norm, model.config.rms_norm_eps);
    const at::Tensor loss = loss_op.call(x.reshape({-1, x.size(-1)}), model.lm_head, targets.reshape({-1}), -100,
                                         "mean", 0.0, 1.0, 0.0, 0.0, 0);
    return {loss};
  };
  TracedForward out;
  out.host_syncs = top_level_host_syncs([&] {
    auto [state, outputs] = torch::jit::tracer::trace(
        std::move(inputs), fn, [](const at::Tensor&) { return std::string(); }, /*strict=*/true,
        /*force_outplace=*/false, /*self=*/nullptr, names);
    out.graph = state->graph;
    out.loss = outputs.at(0).toTensor();
  });
  torch::jit::EliminateDeadCode(out.graph);
  return out;
}

torch::jit::Module trace_logits_module(const LlamaWeights& model, const LoraModel* lora, int64_t seq_len) {
  if (seq_len < 1) throw std::invalid_argument("trace_logits_module: seq_len must be >= 1");
  torch::jit::Module m(c10::QualifiedName("__torch__.qlora.LlamaLogits"));
  m.register_attribute("training", c10::BoolType::get(), false);

  // Every tensor the forward reads becomes a buffer, once (a tied lm_head is embed_tokens): the
  // tracer then records a read of `self.<buffer>` instead of baking the tensor into the graph.
  std::unordered_set<const void*> seen;
  auto add = [&](const std::string& name, const at::Tensor& t) {
    if (!t.defined() || !seen.insert(t.unsafeGetTensorImpl()).second) return;
    m.register_buffer(buffer_name(name), t);
  };
  auto add_linear = [&](const std::string& name, const LinearWeight& w) {
    if (w.nf4) {
      add(name + ".weight.packed", w.nf4->packed);
      add(name + ".weight.absmax", w.nf4->absmax);
      add(name + ".weight.absmax2", w.nf4->absmax2);
      add(name + ".weight.code2", w.nf4->code2);
    } else {
      add(name + ".weight", w.dense);
    }
    add(name + ".bias", w.bias);
  };
  add("model.embed_tokens.weight", model.embed_tokens);
  for (size_t i = 0; i < model.layers.size(); ++i) {
    const DecoderLayerWeights& l = model.layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    add(p + "input_layernorm.weight", l.input_layernorm);
    add(p + "post_attention_layernorm.weight", l.post_attention_layernorm);
    for (const std::string& proj : lora_projection_names()) {
      const bool attn = proj == "q_proj" || proj == "k_proj" || proj == "v_proj" || proj == "o_proj";
      add_linear(p + (attn ? "self_attn." : "mlp.") + proj, base_projection(l, proj));
    }
  }
  add("model.norm.weight", model.norm);
  add("lm_head.weight", model.lm_head);
  add("rope.inv_freq", model.inv_freq);
  if (lora != nullptr)
    for (const auto& [name, t] : named_lora_parameters(*lora)) {
      t.requires_grad_(false);  // inference: the module holds plain tensors
      add(name, t);
    }

  // No adapter: an empty one (no projection adapted) instead of nullptr, so that every projection
  // runs lora_linear_forward, which records NF4 weights as qlora::nf4_lora_linear while tracing.
  LoraModel no_adapter;
  no_adapter.layers.resize(model.layers.size());
  if (lora == nullptr) lora = &no_adapter;

  at::NoGradGuard no_grad;
  DequantScratch scratch;
  const at::Tensor example = at::zeros({1, seq_len}, at::TensorOptions().dtype(at::kLong).device(model.device));
  auto fn = [&](torch::jit::Stack in) -> torch::jit::Stack {
    ForwardInputs fi;
    fi.input_ids = in.at(0).toTensor();
    return {llama_logits(model, fi, scratch, lora, /*training=*/false)};
  };
  auto [state, outputs] = torch::jit::tracer::trace(
      {example}, fn, [](const at::Tensor&) { return std::string(); }, /*strict=*/true, /*force_outplace=*/false, &m,
      {"input_ids"});
  std::shared_ptr<torch::jit::Graph> graph = state->graph;
  torch::jit::EliminateDeadCode(graph);  // the vocabulary check's aminmax feeds only a host sync
  torch::jit::Function* traced =
      m._ivalue()->compilation_unit()->create_function(c10::QualifiedName(*m.type()->name(), "forward_traced"), graph);
  m.type()->addMethod(traced);
  // The trace holds this one shape as constants: say so instead of failing somewhere inside it.
  const std::string n = std::to_string(seq_len);
  m.define("def forward(self, input_ids: Tensor) -> Tensor:\n"
           "    assert input_ids.dim() == 2 and input_ids.size(0) == 1 and input_ids.size(1) == " + n + ", "
           "'qlora export: this module was traced for input_ids of shape [1, " + n + "] (qlora export --seq " + n +
           ")'\n"
           "    return self.forward_traced(input_ids)\n");
  return m;
}

}  // namespace qlora
