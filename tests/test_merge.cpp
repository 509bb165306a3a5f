// LoRA merge (`qlora merge`, src/io/merge.cpp): merged weights equal deq(W) + s B A exactly in fp32
// (NF4-dequantized and 16-bit bases), the merged checkpoint's logits equal base + adapter, the
// written files (single, sharded, NF4 requantized, config.json, tokenizer files), the output
// directory rules, and user errors through the real binary (exit status 2, one line).
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/bnb4bit.h"
#include "qlora/error.h"
#include "qlora/gguf_export.h"
#include "qlora/hf_config.h"
#include "qlora/lora.h"
#include "qlora/merge.h"
#include "qlora/model.h"
#include "qlora/nf4.h"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <filesystem>
#include <map>

#include "merge_fixture.h"
#include "test_util.h"

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using qlora::test::TempDir;

namespace {

const std::vector<std::string> kAll = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

std::map<std::string, at::Tensor> as_map(const qlora::NamedTensors& ts) {
  std::map<std::string, at::Tensor> m;
  for (const auto& [n, t] : ts) m[n] = t;
  return m;
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).norm().item<double>() / b.to(at::kDouble).norm().item<double>();
}

at::Tensor logits_of(const qlora::LlamaWeights& m, const qlora::LoraModel* lora) {
  qlora::DequantScratch scratch;
  at::NoGradGuard g;
  const at::Tensor ids = at::tensor({1, 4, 9, 16, 25, 36, 49, 64, 81, 99, 0, 3}, at::kLong).reshape({2, 6});
  return qlora::llama_logits(m, {ids, at::Tensor()}, scratch, lora);
}

std::string merge_error(const fs::path& base, const fs::path& adapter, const fs::path& out, qlora::MergeOptions opt = {}) {
  try {
    qlora::merge_checkpoint(base, adapter, out, opt);
  } catch (const qlora::UserError& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("merge: merged weights are deq(W) + scale * B A exactly in fp32", "[merge]") {
  TempDir d("qlora_merge");
  const qlora::NamedTensors base = qlora::test::write_tiny_model(d / "base", {}, 1);
  const auto orig = as_map(base);
  qlora::test::write_tiny_adapter(d / "adapter", d / "base", 4, 8.0, {"q_proj", "v_proj", "down_proj"}, 7);

  for (const bool base_16bit : {false, true}) {
    CAPTURE(base_16bit);
    const qlora::LlamaWeights model =
        qlora::load_merge_base(d / "base", base_16bit ? qlora::MergeBase::base_16bit : qlora::MergeBase::nf4);
    const qlora::LoraModel lora = qlora::load_peft_adapter(d / "adapter", model, at::kCPU);
    const auto merged = as_map(qlora::merge_lora(model, &lora, at::kFloat));
    REQUIRE(merged.size() == orig.size());
    int adapted = 0;
    for (const auto& [name, w] : orig) {
      CAPTURE(name);
      REQUIRE(merged.count(name));
      const at::Tensor& got = merged.at(name);
      REQUIRE(got.scalar_type() == at::kFloat);
      if (!qlora::is_quantizable_linear_weight(name)) {
        CHECK(at::equal(got, w.to(at::kFloat)));  // embeddings, norms, lm_head pass through exactly
        continue;
      }
      // deq(W): training's NF4 (blocksize 64, double quant) of the bf16 weight, dequantized in fp32.
      const at::Tensor deq = base_16bit ? w.to(at::kFloat) : qlora::nf4_dequantize(qlora::nf4_quantize(w, 64, true), at::kFloat);
      at::Tensor expected = deq;
      const int layer = name[13] - '0';  // model.layers.N.
      std::string proj;
      for (const auto& p : kAll)
        if (name.find("." + p + ".") != std::string::npos) proj = p;
      if (const auto& l = qlora::lora_projection(lora.layers[layer], proj)) {
        expected = deq + at::matmul(l->B.detach(), l->A.detach()) * (8.0 / 4);  // PEFT: W += (B @ A) * scaling
        ++adapted;
        CHECK(!at::equal(got, deq));  // the adapter changed it
      }
      CHECK(at::equal(got, expected));
    }
    CHECK(adapted == 6);  // 3 projections x 2 layers
  }
}

TEST_CASE("merge: the merged checkpoint's logits equal base + adapter", "[merge]") {
  TempDir d("qlora_merge");
  qlora::test::write_tiny_model(d / "base", {}, 2);
  qlora::test::write_tiny_adapter(d / "adapter", d / "base", 8, 16.0, kAll, 11, /*rslora=*/true);
  for (const bool base_16bit : {false, true}) {
    CAPTURE(base_16bit);
    const fs::path out = d / (base_16bit ? "m16" : "mnf4");
    qlora::MergeOptions opt;
    opt.dtype = at::kFloat;
    opt.base_16bit = base_16bit;
    qlora::merge_checkpoint(d / "base", d / "adapter", out, opt);

    // base + adapter, fp32 compute, linear weights as training saw them (NF4) or 16-bit.
    qlora::ModelLoadOptions o;
    o.compute_dtype = at::kFloat;
    o.load_in_4bit = !base_16bit;
    const qlora::LlamaWeights model = qlora::load_llama(d / "base", o);
    const qlora::LoraModel lora = qlora::load_peft_adapter(d / "adapter", model, at::kCPU);
    const at::Tensor ref = logits_of(model, &lora);
    const at::Tensor without = logits_of(model, nullptr);

    o.load_in_4bit = false;
    const qlora::LlamaWeights merged = qlora::load_llama(out, o);
    const at::Tensor got = logits_of(merged, nullptr);
    const double err = rel_err(got, ref);
    INFO("relative error " << err << ", adapter moves the logits by " << rel_err(without, ref));
    CHECK(err <= 1e-5);
    CHECK(rel_err(without, ref) > 1e-3);
  }
}

TEST_CASE("merge: files written, sharding, config.json and tokenizer files", "[merge]") {
  TempDir d("qlora_merge");
  qlora::test::write_tiny_model(d / "base", {}, 3);
  qlora::test::write_tiny_adapter(d / "adapter", d / "base", 4, 4.0, kAll, 5);
  const qlora::LlamaWeights model = qlora::load_merge_base(d / "base", qlora::MergeBase::nf4);
  const qlora::LoraModel lora = qlora::load_peft_adapter(d / "adapter", model, at::kCPU);
  const auto expected32 = as_map(qlora::merge_lora(model, &lora, at::kFloat));
  const auto expected = as_map(qlora::merge_lora(model, &lora, at::kBFloat16));

  SECTION("single file, bf16") {
    const qlora::MergeSummary s = qlora::save_merged_checkpoint(model, &lora, d / "base", d / "out", {});
    CHECK(s.merged == 14);
    CHECK(fs::exists(d / "out" / "model.safetensors"));
    CHECK(!fs::exists(d / "out" / "model.safetensors.index.json"));
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"})
      CHECK(qlora::test::read_file(d / "out" / f) == qlora::test::read_file(d / "base" / f));
    CHECK(!fs::exists(d / "out" / "README.md"));
    const qlora::HFConfig c = qlora::load_hf_config(d / "out");
    CHECK(c.torch_dtype == "bfloat16");
    CHECK(!c.quantization_config);
    CHECK(c.hidden_size == 64);
    const qlora::SafetensorsCheckpoint ck(d / "out");
    CHECK(ck.names().size() == expected.size());
    for (const auto& [n, t] : expected) CHECK(at::equal(ck.tensor(n), t));
    // Nothing left behind: the staging folder is gone.
    for (const auto& de : fs::directory_iterator(d.path)) CHECK(de.path().filename().string().find("partial") == std::string::npos);
  }
  SECTION("sharded above max_shard_bytes, fp16") {
    qlora::MergeOptions opt;
    opt.dtype = at::kHalf;
    opt.max_shard_bytes = 20000;
    const qlora::MergeSummary s = qlora::save_merged_checkpoint(model, &lora, d / "base", d / "out", opt);
    CHECK(fs::exists(d / "out" / "model.safetensors.index.json"));
    CHECK(!fs::exists(d / "out" / "model.safetensors"));
    CHECK(s.files_written.size() > 4);
    const qlora::SafetensorsCheckpoint ck(d / "out");
    REQUIRE(ck.sharded());
    for (const auto& [n, t] : expected32) CHECK(at::equal(ck.tensor(n), t.to(at::kHalf)));  // one rounding from fp32
    CHECK(qlora::load_hf_config(d / "out").torch_dtype == "float16");
  }
  SECTION("--requantize nf4: a bnb-4bit checkpoint of the merged weights") {
    qlora::MergeOptions opt;
    opt.requantize_nf4 = true;
    qlora::save_merged_checkpoint(model, &lora, d / "base", d / "out", opt);
    const qlora::HFConfig c = qlora::load_hf_config(d / "out");
    REQUIRE(c.quantization_config);
    CHECK(c.quantization_config->load_in_4bit);
    CHECK(c.quantization_config->bnb_4bit_quant_type == "nf4");
    const qlora::SafetensorsCheckpoint ck(d / "out");
    for (const auto& [n, t] : expected) {
      CAPTURE(n);
      if (!qlora::is_quantizable_linear_weight(n)) {
        CHECK(at::equal(ck.tensor(n), t));
        continue;
      }
      const qlora::NF4Tensor got = qlora::read_bnb4bit_weight(ck, n);
      const qlora::NF4Tensor want = qlora::nf4_quantize(t, 64, true);
      CHECK(at::equal(got.packed, want.packed));
      CHECK(at::equal(got.absmax, want.absmax));
    }
    qlora::ModelLoadOptions o;
    o.compute_dtype = at::kFloat;
    CHECK(qlora::load_llama(d / "out", o).layers.size() == 2);  // loads as a bnb-4bit base
  }
}

TEST_CASE("merge: a GGUF base and tied embeddings", "[merge]") {
  TempDir d("qlora_merge");
  qlora::test::TinyModel tm;
  tm.tied = true;
  qlora::test::write_tiny_model(d / "base", tm, 4);
  qlora::test::write_tiny_adapter(d / "adapter", d / "base", 4, 8.0, {"k_proj", "up_proj"}, 9);
  qlora::MergeOptions opt;
  opt.dtype = at::kFloat;
  opt.base_16bit = true;
  qlora::merge_checkpoint(d / "base", d / "adapter", d / "out", opt);
  const qlora::SafetensorsCheckpoint ck(d / "out");
  CHECK(!ck.contains("lm_head.weight"));  // transformers re-ties it
  CHECK(qlora::load_hf_config(d / "out").tie_word_embeddings);

  // The same base as an f32 GGUF file (its bf16 values held exactly): the merge is bit-identical.
  const qlora::LlamaWeights hf = qlora::load_merge_base(d / "base", qlora::MergeBase::as_stored);
  qlora::GgufExportOptions g;
  g.type = qlora::GgmlType::f32;
  qlora::export_gguf(hf, nullptr, d / "base", d / "base.gguf", g);
  qlora::merge_checkpoint(d / "base.gguf", d / "adapter", d / "from_gguf", opt);
  const qlora::SafetensorsCheckpoint ck2(d / "from_gguf");
  REQUIRE(ck2.names() == ck.names());
  for (const auto& n : ck.names()) CHECK(at::equal(ck2.tensor(n), ck.tensor(n)));
  CHECK(!fs::exists(d / "from_gguf" / "tokenizer.json"));  // a GGUF base has no tokenizer files to copy
}

TEST_CASE("merge: output directory rules; an error leaves it as it was", "[merge]") {
  TempDir d("qlora_merge");
  qlora::test::write_tiny_model(d / "base", {}, 5);
  qlora::test::write_tiny_adapter(d / "adapter", d / "base", 2, 4.0, {"o_proj"}, 3);
  fs::create_directories(d / "full");
  qlora::test::write_file(d / "full" / "keep.txt", "user's");
  CHECK_THAT(merge_error(d / "base", d / "adapter", d / "full"), ContainsSubstring("not empty (pass --force"));
  qlora::MergeOptions force;
  force.force = true;
  qlora::test::write_file(d / "full" / "model-00001-of-00002.safetensors", "stale");
  CHECK(merge_error(d / "base", d / "adapter", d / "full", force) == "no error");
  CHECK(qlora::test::read_file(d / "full" / "keep.txt") == "user's");
  CHECK(!fs::exists(d / "full" / "model-00001-of-00002.safetensors"));  // stale shard of an earlier run removed
  CHECK(fs::exists(d / "full" / "model.safetensors"));

  qlora::test::write_file(d / "afile", "x");
  CHECK_THAT(merge_error(d / "base", d / "adapter", d / "afile"), ContainsSubstring("found a file"));
  CHECK_THAT(merge_error(d / "base", d / "nope", d / "o1"), ContainsSubstring("adapter directory does not exist"));
  CHECK_THAT(merge_error(d / "nobase", d / "adapter", d / "o1"), ContainsSubstring("base model does not exist"));
  CHECK(!fs::exists(d / "o1"));

  // An adapter for another shape: A of layer 0 o_proj is [2, 32] instead of [2, 64].
  qlora::test::write_tiny_adapter(d / "bad", d / "base", 2, 4.0, {"o_proj"}, 3);
  qlora::NamedTensors ts;
  const qlora::SafetensorsFile f(d / "bad" / "adapter_model.safetensors");
  for (const auto& n : f.names())
    ts.emplace_back(n, n.find("layers.0.self_attn.o_proj.lora_A") != std::string::npos ? at::zeros({2, 32}) : f.tensor(n));
  qlora::save_safetensors(d / "bad" / "adapter_model.safetensors", ts);
  CHECK_THAT(merge_error(d / "base", d / "bad", d / "o2"), ContainsSubstring("o_proj"));
  CHECK(!fs::exists(d / "o2"));

  // --base-16bit has nothing to merge into for a bnb-4bit base.
  qlora::QuantizeOptions q;
  qlora::quantize_checkpoint(d / "base", d / "bnb", q);
  qlora::MergeOptions b16;
  b16.base_16bit = true;
  CHECK_THAT(merge_error(d / "bnb", d / "adapter", d / "o3", b16), ContainsSubstring("no 16-bit weights"));
  CHECK(merge_error(d / "bnb", d / "adapter", d / "o3") == "no error");  // merged into its NF4 weights
}

TEST_CASE("merge: the qlora binary (success, and user errors with exit status 2)", "[merge]") {
  TempDir d("qlora_merge_cli");
  qlora::test::write_tiny_model(d / "base", {}, 6);
  qlora::test::write_tiny_adapter(d / "adapter", d / "base", 4, 8.0, kAll, 13);
  const std::string base = (d / "base").string(), adapter = (d / "adapter").string();

  auto r = qlora::test::run_qlora("merge " + base + " --adapter " + adapter + " --out " + (d / "out").string());
  INFO(r.output);
  CHECK(r.status == 0);
  CHECK(fs::exists(d / "out" / "model.safetensors"));

  qlora::test::expect_user_error("merge " + base + " --adapter " + (d / "missing").string() + " --out " + (d / "o").string(),
                    "adapter directory does not exist");
  qlora::test::expect_user_error("merge " + base + " --adapter " + adapter + " --out " + (d / "out").string(), "not empty");
  qlora::test::expect_user_error("merge " + base + " --adapter " + adapter + " --out " + (d / "o").string() + " --dtype int8",
                    "--dtype: expected bf16, fp16 or fp32, found 'int8'");
  qlora::test::expect_user_error("merge " + base + " --adapter " + adapter + " --out " + (d / "o").string() + " --requantize q4",
                    "--requantize: expected nf4");
  qlora::test::expect_user_error("merge " + base + " --out " + (d / "o").string(), "expected --adapter");
  CHECK(!fs::exists(d / "o"));
}
