// qlora check-compile (issue 9): the op report's lookups in the dispatcher (Meta / composite kernels,
// data-dependent tags, unknown ops), the flagging and exit status on a hand-made graph holding
// aten::nonzero, the traced training forward of a tiny NF4 model (one qlora::nf4_lora_linear node
// per projection, one qlora::fused_linear_cross_entropy, no host syncs, the same loss as untraced),
// and the command itself: clean on tiny NF4 and 16-bit configs, exit 2 on bad input.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/export.h"
#include "qlora/flce.h"
#include "qlora/lora.h"
#include "qlora/model.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/ir/irparser.h>
#include <torch/library.h>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <sstream>
#include <stdexcept>

#include "test_util.h"
#include "trainer_fixture.h"

using Catch::Matchers::ContainsSubstring;
using namespace qlora;
using namespace qlora::test;

// An op with a CPU kernel and nothing else: what check-compile must flag as "no Meta kernel".
TORCH_LIBRARY(qlora_check_compile_test, m) { m.def("cpu_only(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(qlora_check_compile_test, CPU, m) {
  m.impl("cpu_only", [](const at::Tensor& x) { return x.clone(); });
}

namespace {

const OpCheck* find_op(const std::vector<OpCheck>& ops, const std::string& name) {
  auto it = std::find_if(ops.begin(), ops.end(), [&](const OpCheck& c) { return c.name == name; });
  return it == ops.end() ? nullptr : &*it;
}

// The line of `op` in check-compile's output ("" when absent).
std::string op_line(const std::string& output, const std::string& op) {
  std::istringstream in(output);
  for (std::string line; std::getline(in, line);)
    if (line.find("  " + op + " ") == 0) return line;
  return "";
}

}  // namespace

TEST_CASE("check-compile: dispatcher lookups of single ops", "[check_compile]") {
  const OpCheck mm = check_op("aten::mm");
  CHECK(mm.meta == MetaSupport::kernel);
  CHECK_FALSE(mm.flagged());
  CHECK(check_op("aten::linear").meta == MetaSupport::composite_implicit);
  CHECK(check_op("aten::embedding").meta != MetaSupport::none);
  CHECK_FALSE(check_op("aten::add.Tensor").flagged());
  CHECK_FALSE(check_op("qlora::nf4_dequantize").flagged());
  CHECK_FALSE(check_op("qlora::fused_linear_cross_entropy").flagged());

  const OpCheck nz = check_op("aten::nonzero");
  CHECK(nz.dynamic_output_shape);
  CHECK(nz.flagged());
  const OpCheck item = check_op("aten::_local_scalar_dense");
  CHECK(item.data_dependent_output);
  CHECK(item.flagged());

  const OpCheck cpu_only = check_op("qlora_check_compile_test::cpu_only");
  CHECK(cpu_only.meta == MetaSupport::none);
  CHECK(cpu_only.flagged());
  const OpCheck unknown = check_op("qlora_check_compile_test::no_such_op");
  CHECK(unknown.meta == MetaSupport::unknown_op);
  CHECK(unknown.flagged());
}

TEST_CASE("check-compile: a graph with aten::nonzero is flagged (exit status 1)", "[check_compile]") {
  auto g = std::make_shared<torch::jit::Graph>();
  torch::jit::parseIR(R"IR(
graph(%x : Tensor):
  %one : int = prim::Constant[value=1]()
  %n : Tensor = aten::nonzero(%x)
  %y : Tensor = aten::add(%x, %x, %one)
  %z : Tensor = aten::add(%y, %x, %one)
  %w : Tensor = qlora_check_compile_test::cpu_only(%z)
  return (%n, %w))IR",
                      g.get());
  const std::vector<OpCheck> ops = check_graph_ops(*g);
  REQUIRE(ops.size() == 3);  // prim::Constant is skipped
  const OpCheck* add = find_op(ops, "aten::add.Tensor");
  REQUIRE(add != nullptr);
  CHECK(add->count == 2);
  CHECK_FALSE(add->flagged());
  REQUIRE(find_op(ops, "aten::nonzero") != nullptr);
  CHECK(find_op(ops, "aten::nonzero")->flagged());
  CHECK(op_checks_exit_status(ops) == 1);
  const std::string report = format_op_checks(ops);
  CHECK_THAT(op_line(report, "aten::nonzero"), ContainsSubstring("data-dependent: yes (dynamic_output_shape)"));
  CHECK_THAT(op_line(report, "aten::nonzero"), ContainsSubstring("FLAGGED"));
  CHECK_THAT(op_line(report, "qlora_check_compile_test::cpu_only"), ContainsSubstring("meta: NO"));
  CHECK_THAT(report, ContainsSubstring("2 flagged: aten::nonzero qlora_check_compile_test::cpu_only"));

  // Without the flagged ops: clean.
  std::vector<OpCheck> clean;
  std::copy_if(ops.begin(), ops.end(), std::back_inserter(clean), [](const OpCheck& c) { return !c.flagged(); });
  CHECK(op_checks_exit_status(clean) == 0);
  CHECK_THAT(format_op_checks(clean), ContainsSubstring("clean"));
}

TEST_CASE("check-compile: host syncs at the top level are counted, those inside ops are not", "[check_compile]") {
  const at::Tensor t = at::arange(6, at::TensorOptions().dtype(at::kFloat));
  const std::vector<OpCheck> none = top_level_host_syncs([&] {
    (void)at::allclose(t, t);  // its kernel calls .item(): inside the op, invisible to a compiler
    (void)at::mm(t.view({2, 3}), t.view({3, 2}));
  });
  CHECK(none.empty());
  const std::vector<OpCheck> two = top_level_host_syncs([&] {
    (void)t.sum().item<double>();
    (void)t.max().item<double>();
    (void)at::allclose(t, t);
  });
  REQUIRE(two.size() == 1);
  CHECK(two[0].name == "aten::item");
  CHECK(two[0].count == 2);
  CHECK(two[0].host_sync);
  CHECK(two[0].data_dependent_output);
  CHECK(two[0].flagged());
  CHECK_THAT(format_op_checks(two), ContainsSubstring("(host sync: not in the graph)"));
}

TEST_CASE("check-compile: the traced training forward of a tiny NF4 model", "[check_compile]") {
  TempDir dir("qlora_cc_trace");
  write_trainer_fixture(dir.path);
  ModelLoadOptions mo;
  mo.load_in_4bit = true;
  mo.compute_dtype = at::kFloat;
  const LlamaWeights model = load_llama(dir / "model", mo);
  LoraOptions lo;
  lo.r = 4;
  lo.alpha = 8;
  lo.target_modules = lora_projection_names();
  LoraModel lora = make_lora(model, lo, 3);
  for (auto& [name, p] : named_lora_parameters(lora))
    if (name.find("lora_B") != std::string::npos) {
      at::NoGradGuard ng;
      p.normal_(0, 0.1);  // B != 0: the LoRA branch counts in the loss
    }
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(9);
  const at::Tensor ids = at::randint(100, {1, 12}, gen, at::TensorOptions().dtype(at::kLong));
  at::Tensor labels = at::full({1, 12}, -100, at::TensorOptions().dtype(at::kLong));
  labels.narrow(1, 0, 11).copy_(ids.narrow(1, 1, 11));
  DequantScratch scratch;
  const TracedForward t = trace_training_forward(model, lora, ids, labels, scratch);

  const std::vector<OpCheck> ops = check_graph_ops(*t.graph);
  const OpCheck* lin = find_op(ops, "qlora::nf4_lora_linear");
  REQUIRE(lin != nullptr);
  CHECK(lin->count == 14);  // 2 layers x 7 projections
  CHECK(lin->meta == MetaSupport::kernel);
  const OpCheck* loss = find_op(ops, "qlora::fused_linear_cross_entropy");
  REQUIRE(loss != nullptr);
  CHECK(loss->count == 1);
  CHECK(t.host_syncs.empty());
  CHECK(op_checks_exit_status(ops) == 0);
  // The graph takes the batch and every LoRA master as inputs.
  CHECK(t.graph->inputs().size() == 2 + named_lora_parameters(lora).size());

  // The traced run computed the loss the training forward computes.
  const AttentionInputs attn = attention_inputs(model, at::Tensor(), 1, 12);
  at::Tensor h = at::embedding(model.embed_tokens, ids);
  for (size_t i = 0; i < model.layers.size(); ++i) h = decoder_layer(h, model.layers[i], model, attn, scratch, &lora.layers[i], true);
  const at::Tensor x = rms_norm(h, model.norm, model.config.rms_norm_eps);
  const at::Tensor ref = fused_linear_cross_entropy(x.reshape({-1, x.size(-1)}), model.lm_head, labels.reshape({-1}));
  CHECK(std::abs(t.loss.item<double>() - ref.item<double>()) <= 1e-5 * std::abs(ref.item<double>()));

  SECTION("LoRA dropout is refused: a trace would freeze its mask") {
    LoraOptions ld = lo;
    ld.dropout = 0.1;
    const LoraModel with_dropout = make_lora(model, ld, 3);
    CHECK_THROWS_AS(trace_training_forward(model, with_dropout, ids, labels, scratch), std::invalid_argument);
  }
}

TEST_CASE("qlora check-compile on tiny configs: exit 0, our ops listed", "[check_compile][cli]") {
  TempDir dir("qlora_cc_cli");
  write_trainer_fixture(dir.path);
  write_file(dir / "cfg.yaml", trainer_yaml(dir.path, ""));
  const std::string cfg = (dir / "cfg.yaml").string();

  SECTION("NF4 base (adapter qlora), LoRA dropout on in the config") {
    const Run r = run_qlora("check-compile " + cfg + " adapter=qlora load_in_4bit=true lora_dropout=0.1");
    CAPTURE(r.output);
    CHECK(r.status == 0);
    CHECK_THAT(op_line(r.output, "qlora::nf4_lora_linear"), ContainsSubstring("x14"));
    CHECK_THAT(op_line(r.output, "qlora::nf4_lora_linear"), ContainsSubstring("meta: yes"));
    CHECK_THAT(op_line(r.output, "qlora::nf4_lora_linear"), ContainsSubstring("data-dependent: no"));
    CHECK_THAT(op_line(r.output, "qlora::fused_linear_cross_entropy"), ContainsSubstring("x1 "));
    CHECK_THAT(op_line(r.output, "qlora::fused_linear_cross_entropy"), ContainsSubstring("meta: yes"));
    CHECK_THAT(r.output, ContainsSubstring("NF4 base"));
    CHECK_THAT(r.output, ContainsSubstring("LoRA dropout (0.1 in the config; off in the trace"));
    CHECK_THAT(r.output, ContainsSubstring(": clean ("));
    CHECK_THAT(r.output, !ContainsSubstring("FLAGGED"));
  }
  SECTION("16-bit base (adapter lora): the LoRA linear is traced as ATen ops") {
    const Run r = run_qlora("check-compile " + cfg + " --seq 8");
    CAPTURE(r.output);
    CHECK(r.status == 0);
    CHECK(op_line(r.output, "qlora::nf4_lora_linear").empty());
    CHECK_THAT(op_line(r.output, "qlora::fused_linear_cross_entropy"), ContainsSubstring("meta: yes"));
    CHECK_THAT(r.output, ContainsSubstring("batch 1 x 8"));
    CHECK_THAT(r.output, ContainsSubstring(": clean ("));
  }
  SECTION("--graph prints the traced graph") {
    const Run r = run_qlora("check-compile " + cfg + " adapter=qlora load_in_4bit=true --graph");
    CHECK(r.status == 0);
    CHECK_THAT(r.output, ContainsSubstring("qlora::nf4_lora_linear("));
    CHECK_THAT(r.output, ContainsSubstring("graph("));
  }
}

TEST_CASE("qlora check-compile: bad input exits 2 with one line", "[check_compile][cli]") {
  CHECK(run_qlora("check-compile").status == 2);
  const Run missing = run_qlora("check-compile /nonexistent/qlora_cc.yaml");
  CHECK(missing.status == 2);
  CHECK_THAT(missing.output, ContainsSubstring("qlora_cc.yaml"));
  TempDir dir("qlora_cc_bad");
  write_trainer_fixture(dir.path);
  write_file(dir / "cfg.yaml", trainer_yaml(dir.path, ""));
  CHECK(run_qlora("check-compile " + (dir / "cfg.yaml").string() + " --seq 1").status == 2);
  CHECK(run_qlora("check-compile " + (dir / "cfg.yaml").string() + " lora_rr=3").status == 2);
  const Run no_model = run_qlora("check-compile " + (dir / "cfg.yaml").string() + " base_model=/nonexistent/m");
  CHECK(no_model.status == 2);
}
