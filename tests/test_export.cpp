// qlora export --format torchscript (issue 9, legacy format): the saved module loads in C++ with
// torch::jit::load (the qlora ops are registered: the tests link qlora_ops) and gives llama_logits'
// logits for a 16-bit base, an NF4 base (qlora::nf4_lora_linear nodes) and a PEFT adapter on top;
// it refuses other input shapes; the other formats and bad input exit 2. The Python side
// (torch.jit.load after torch.ops.load_library, against transformers / PEFT) is
// tests/compile/torchscript_load.py.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/export.h"
#include "qlora/lora.h"
#include "qlora/model.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <sstream>

#include "test_util.h"
#include "trainer_fixture.h"

using Catch::Matchers::ContainsSubstring;
using namespace qlora;
using namespace qlora::test;
namespace fs = std::filesystem;

namespace {

constexpr int64_t kSeq = 10;

at::Tensor test_ids(int64_t seq = kSeq) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(21);
  return at::randint(100, {1, seq}, gen, at::TensorOptions().dtype(at::kLong));
}

LlamaWeights load_fixture(const fs::path& model_dir, bool nf4) {
  ModelLoadOptions mo;
  mo.load_in_4bit = nf4;
  mo.compute_dtype = at::kFloat;  // qlora export's default --dtype
  return load_llama(model_dir, mo);
}

at::Tensor reference_logits(const LlamaWeights& m, const LoraModel* lora, const at::Tensor& ids) {
  at::NoGradGuard ng;
  DequantScratch scratch;
  ForwardInputs in;
  in.input_ids = ids;
  return llama_logits(m, in, scratch, lora);
}

at::Tensor run_module(const fs::path& file, const at::Tensor& ids) {
  torch::jit::Module m = torch::jit::load(file.string());
  at::NoGradGuard ng;
  return m.forward({ids}).toTensor();
}

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

TEST_CASE("qlora export --format torchscript: torch::jit::load gives llama_logits", "[export]") {
  TempDir dir("qlora_export");
  write_trainer_fixture(dir.path);
  const fs::path model_dir = dir / "model";
  const at::Tensor ids = test_ids();

  // A PEFT adapter with B != 0, written by our own writer.
  const LlamaWeights base16 = load_fixture(model_dir, false);
  LoraOptions lo;
  lo.r = 4;
  lo.alpha = 8;
  lo.target_modules = lora_projection_names();
  LoraModel adapter = make_lora(base16, lo, 5);
  {
    at::NoGradGuard ng;
    for (auto& [name, p] : named_lora_parameters(adapter))
      if (name.find("lora_B") != std::string::npos) p.normal_(0, 0.2);
  }
  save_peft_adapter(dir / "adapter", adapter, base16.config, "tiny");

  for (const bool nf4 : {false, true})
    for (const bool with_adapter : {false, true}) {
      CAPTURE(nf4, with_adapter);
      const fs::path out = dir / ("m" + std::to_string(nf4) + std::to_string(with_adapter) + ".pt");
      std::string args = "export --format torchscript " + model_dir.string() + " --out " + out.string() + " --seq " +
                         std::to_string(kSeq);
      if (nf4) args += " --nf4";
      if (with_adapter) args += " --adapter " + (dir / "adapter").string();
      const Run r = run_qlora(args);
      CAPTURE(r.output);
      REQUIRE(r.status == 0);
      REQUIRE(fs::is_regular_file(out));
      CHECK_FALSE(fs::exists(out.string() + ".part"));

      const LlamaWeights m = load_fixture(model_dir, nf4);
      std::optional<LoraModel> lora;
      if (with_adapter) lora = load_peft_adapter(dir / "adapter", m, at::kCPU);
      const at::Tensor ref = reference_logits(m, lora ? &*lora : nullptr, ids);
      const at::Tensor got = run_module(out, ids);
      CHECK(got.sizes() == ref.sizes());
      CHECK(got.scalar_type() == at::kFloat);
      CHECK(max_diff(got, ref) <= 1e-5);

      torch::jit::Module module = torch::jit::load(out.string());
      std::ostringstream graph;
      graph << *module.get_method("forward_traced").graph();
      CHECK((graph.str().find("qlora::nf4_lora_linear") != std::string::npos) == nf4);
      if (!nf4 && !with_adapter) {
        // The module refuses another shape with its own message instead of failing inside the trace.
        try {
          run_module(out, test_ids(kSeq + 1));
          FAIL("a [1, 11] input was accepted");
        } catch (const std::exception& e) {
          CHECK_THAT(std::string(e.what()), ContainsSubstring("traced for input_ids of shape [1, 10]"));
        }
      }
    }
}

TEST_CASE("trace_logits_module: buffers named after the checkpoint, NF4 as nf4_lora_linear", "[export]") {
  TempDir dir("qlora_export_mod");
  write_trainer_fixture(dir.path);
  const LlamaWeights m = load_fixture(dir / "model", true);
  torch::jit::Module module = trace_logits_module(m, nullptr, 6);
  std::vector<std::string> names;
  for (const auto& b : module.named_buffers()) names.push_back(b.name);
  const auto has = [&](const std::string& n) { return std::find(names.begin(), names.end(), n) != names.end(); };
  CHECK(has("model_embed_tokens_weight"));
  CHECK(has("lm_head_weight"));
  CHECK(has("model_layers_1_mlp_down_proj_weight_packed"));
  CHECK(has("model_layers_0_self_attn_q_proj_weight_absmax"));
  CHECK(has("rope_inv_freq"));
  std::ostringstream graph;
  graph << *module.get_method("forward_traced").graph();
  size_t n = 0;
  for (size_t pos = graph.str().find("qlora::nf4_lora_linear("); pos != std::string::npos;
       pos = graph.str().find("qlora::nf4_lora_linear(", pos + 1))
    ++n;
  CHECK(n == 14);
  const at::Tensor ids = test_ids(6);
  at::NoGradGuard ng;
  CHECK(max_diff(module.forward({ids}).toTensor(), reference_logits(m, nullptr, ids)) <= 1e-5);
}

TEST_CASE("qlora export --format torchscript: bad input exits 2", "[export][cli]") {
  TempDir dir("qlora_export_bad");
  write_trainer_fixture(dir.path);
  const std::string model = (dir / "model").string(), out = (dir / "x.out").string();
  CHECK(run_qlora("export " + model + " --out " + out).status == 2);                                    // no --format
  CHECK(run_qlora("export --format onnx " + model + " --out " + out).status == 2);
  CHECK(run_qlora("export --format torchscript " + model).status == 2);                                 // no --out
  CHECK(run_qlora("export --format torchscript /nonexistent/qlora_m --out " + out).status == 2);        // no model
  CHECK(run_qlora("export --format torchscript " + model + " --out " + out + " --seq 0").status == 2);  // bad --seq
  CHECK(run_qlora("export --format torchscript " + model + " --out " + out + " --dtype fp8").status == 2);
  CHECK(run_qlora("export --format torchscript " + model + " --out " + out + " --adapter /nonexistent/a").status == 2);
  CHECK_FALSE(fs::exists(out));
}
