// qlora bench train (issue 11) on the CPU: the named shapes' configs (parameter counts of the real
// models), random_llama (deterministic per seed, NF4 as load_llama quantizes), the trainer built on
// an in-memory model and data, and the command itself: its JSON, the FLOPs-per-token formula worked
// out by hand for the tiny shape, and one-line errors with exit status 2.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/model.h"
#include "qlora/trainer.h"
#include "util/timeline.h"

#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <nlohmann/json.hpp>

#include "test_util.h"

using Catch::Matchers::ContainsSubstring;
using namespace qlora;
using namespace qlora::test;

namespace {

// Parameters as the HF model counts them: embeddings, 7 projections + 2 norms per layer, final
// norm, lm_head when untied.
int64_t hf_parameter_count(const HFConfig& c) {
  const int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  const int64_t per_layer = 2 * h * q + 2 * h * kv + 3 * h * c.intermediate_size + 2 * h;
  return (c.tie_word_embeddings ? 1 : 2) * c.vocab_size * h + c.num_hidden_layers * per_layer + h;
}

}  // namespace

TEST_CASE("model shapes: the real models' parameter counts", "[bench_train]") {
  // Llama-3.2-1B: 1,235,814,400 (its model card: 1.23 B); Llama-3-8B: 8,030,261,248 (8.03 B).
  CHECK(hf_parameter_count(model_shape_config("llama-3.2-1b")) == 1235814400);
  CHECK(hf_parameter_count(model_shape_config("llama-3-8b")) == 8030261248);
  CHECK(hf_parameter_count(model_shape_config("llama-3.2-3b")) == 3212749824);
  CHECK(hf_parameter_count(model_shape_config("llama-3-70b")) == 70553706496);
  CHECK(model_shape_config("llama-3.2-1b").head_dim == 64);
  CHECK(model_shape_config("llama-3.2-1b").rope_scaling.rope_type == "llama3");
  CHECK_THROWS_WITH(model_shape_config("llama-9b"), ContainsSubstring("unknown model shape 'llama-9b'"));
}

TEST_CASE("random_llama: deterministic per seed, NF4 as load_llama quantizes", "[bench_train]") {
  const HFConfig c = model_shape_config("tiny");
  ModelLoadOptions o;
  o.compute_dtype = at::kFloat;
  o.device = at::kCPU;
  const LlamaWeights a = random_llama(c, o, 7), b = random_llama(c, o, 7), other = random_llama(c, o, 8);
  CHECK(at::equal(a.embed_tokens, b.embed_tokens));
  CHECK(at::equal(a.layers[1].down_proj.nf4->packed, b.layers[1].down_proj.nf4->packed));
  CHECK_FALSE(at::equal(a.embed_tokens, other.embed_tokens));
  CHECK(a.layers.size() == 2);
  CHECK(a.layers[0].q_proj.nf4.has_value());
  CHECK(at::equal(a.norm, at::ones({c.hidden_size})));
  const double sd = a.embed_tokens.std().item<double>();
  CHECK(sd > 0.018);
  CHECK(sd < 0.022);
  // The logits run (shapes and rope tables are consistent).
  DequantScratch scratch;
  ForwardInputs in;
  in.input_ids = at::randint(c.vocab_size, {2, 9}, at::TensorOptions().dtype(at::kLong));
  const at::Tensor logits = llama_logits(a, in, scratch);
  CHECK(logits.sizes() == at::IntArrayRef({2, 9, c.vocab_size}));
  CHECK(at::isfinite(logits).all().item<bool>());
}

TEST_CASE("make_trainer on an in-memory model and data trains", "[bench_train][train]") {
  const HFConfig c = model_shape_config("tiny");
  TrainConfig config;
  config.base_model = "random:tiny";
  config.device = "cpu";
  config.sequence_len = 16;
  config.sample_packing = false;
  config.micro_batch_size = 2;
  config.max_steps = 8;
  config.learning_rate = 1e-2;
  config.lora_dropout = 0.0;
  ModelLoadOptions o;
  o.compute_dtype = at::kFloat;
  PreparedData data;
  for (int i = 0; i < 4; ++i) {  // the same 4 rows over and over: the loss must fall
    TokenizedExample ex;
    for (int j = 0; j < 16; ++j) ex.input_ids.push_back((i * 37 + j * 11) % static_cast<int>(c.vocab_size));
    ex.labels = ex.input_ids;
    data.train.push_back(ex);
  }
  TrainerOptions topt;
  topt.write_outputs = false;
  TrainerInputs inputs;
  inputs.model = random_llama(c, o, 1);
  inputs.data = data;
  Trainer t = make_trainer(config, topt, nullptr, std::move(inputs));
  std::vector<double> losses;
  for (int i = 0; i < 8; ++i) losses.push_back(train_step(t).loss);
  CAPTURE(losses);
  CHECK(losses.back() < losses.front() - 0.05);

  // A model on another dtype than the config's is refused, not silently used.
  TrainerInputs wrong;
  o.compute_dtype = at::kBFloat16;
  wrong.model = random_llama(c, o, 1);
  wrong.data = data;
  CHECK_THROWS(make_trainer(config, topt, nullptr, std::move(wrong)));
}

TEST_CASE("qlora bench train --shape tiny on the CPU: JSON, FLOPs per token by hand", "[bench_train][cli]") {
  TempDir dir("qlora_bench_train");
  const std::string json_path = (dir / "bench.json").string();
  const Run r = run_qlora("bench train --shape tiny --device cpu --dtype fp32 --seq 32 --batch 2 --rank 4 --steps 2 "
                          "--warmup 1 --json " + json_path);
  CAPTURE(r.output);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, ContainsSubstring("tokens/s"));
  CHECK_THAT(r.output, ContainsSubstring("FLOPs/token = 4 N_base + 6 N_lora + 12 L s d"));
  const nlohmann::json j = nlohmann::json::parse(read_file(json_path));
  // tiny: hidden 64, intermediate 160, 2 layers, 4 heads (head_dim 16), 2 KV heads, vocab 512.
  // Per layer: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 160x64, down 64x160 = 43,008; lm_head 512x64.
  const int64_t n_base = 2 * 43008 + 512 * 64;
  // LoRA r 4: r x (in + out) per projection: q 512, k 384, v 384, o 512, gate 896, up 896, down 896.
  const int64_t n_lora = 2 * 4 * (128 + 96 + 96 + 128 + 224 + 224 + 224);
  CHECK(j.at("n_base").get<int64_t>() == n_base);
  CHECK(j.at("n_lora").get<int64_t>() == n_lora);
  CHECK(j.at("flops_per_token").get<double>() == 4.0 * n_base + 6.0 * n_lora + 12.0 * 2 * 32 * 64);
  CHECK(j.at("tokens_per_s").get<double>() > 0);
  CHECK(j.at("steps").get<int>() == 2);
  CHECK(j.at("mfu").get<double>() == 0.0);  // no peak known for a CPU
  CHECK(std::isfinite(j.at("last_loss").get<double>()));
  CHECK(j.at("prompt_fraction").get<double>() == 0.0);

  // The same run with the first half of every row a masked prompt: the same tokens, so the same
  // FLOPs formula, but the loss is over the second halves only.
  const std::string masked_path = (dir / "masked.json").string();
  const Run m = run_qlora("bench train --shape tiny --device cpu --dtype fp32 --seq 32 --batch 2 --rank 4 --steps 2 "
                          "--warmup 1 --prompt-fraction 0.5 --json " + masked_path);
  CAPTURE(m.output);
  REQUIRE(m.status == 0);
  CHECK_THAT(m.output, ContainsSubstring("the first 50 % of each row a masked prompt"));
  const nlohmann::json jm = nlohmann::json::parse(read_file(masked_path));
  CHECK(jm.at("prompt_fraction").get<double>() == 0.5);
  CHECK(jm.at("flops_per_token").get<double>() == j.at("flops_per_token").get<double>());
  CHECK(std::isfinite(jm.at("last_loss").get<double>()));
  CHECK(jm.at("last_loss").get<double>() != j.at("last_loss").get<double>());
}

TEST_CASE("qlora bench train: bad input exits 2 with one line", "[bench_train][cli]") {
  for (const char* args : {"bench train --device cpu", "bench train --shape llama-9b --device cpu",
                           "bench train --shape tiny --device cpu --rank 0",
                           "bench train --shape tiny --device cpu --steps 0", "bench train --shape tiny --device cpu --seq 1",
                           "bench train --shape tiny --device cpu --seq-search",
                           "bench train --shape tiny --device cpu --prompt-fraction 1",
                           "bench train --shape tiny --device cpu --prompt-fraction -0.1"}) {
    const Run r = run_qlora(args);
    CAPTURE(args, r.output);
    CHECK(r.status == 2);
  }
  CHECK_THAT(run_qlora("bench train --shape llama-9b --device cpu").output, ContainsSubstring("llama-3-8b"));
}

TEST_CASE("idle_gaps: gaps between kernels over two streams, longest first, with the host op in each", "[bench_train]") {
  // Kernels (ns): a [0, 100), b [150, 400) on stream 1 and c [200, 300) on stream 2 (inside b: no gap
  // after c), d [1000, 1100), e [1100, 1200) (touching: no gap), f [5000, 5010).
  const std::vector<TimedEvent> kernels = {{1000, 1100, "d"}, {0, 100, "a"},       {200, 300, "c"},
                                           {150, 400, "b"},   {5000, 5010, "f"},  {1100, 1200, "e"}};
  // Host ops: an outer "step" over everything, an "item" sync inside the 1200..5000 gap, "launch"
  // inside the 400..1000 gap; the innermost one spanning a gap's middle names it.
  const std::vector<TimedEvent> host = {{0, 6000, "step"}, {2000, 4000, "item"}, {3000, 3050, "tiny"}, {500, 900, "launch"}};
  const IdleSummary s = idle_gaps(kernels, host, 2);
  CHECK(s.total_ms == Catch::Approx((50 + 600 + 3800) / 1e6));
  REQUIRE(s.longest.size() == 2);
  CHECK(s.longest[0].ms == Catch::Approx(3800 / 1e6));  // e -> f, its middle (3100) in "item", not in "tiny"
  CHECK(s.longest[0].before == "e");
  CHECK(s.longest[0].after == "f");
  CHECK(s.longest[0].host == "item");
  CHECK(s.longest[1].ms == Catch::Approx(600 / 1e6));  // b (not c, which ended earlier) -> d
  CHECK(s.longest[1].before == "b");
  CHECK(s.longest[1].after == "d");
  CHECK(s.longest[1].host == "launch");
  // A minimum length drops the short gaps from the list but not from the total; no kernels, no gaps.
  const IdleSummary big = idle_gaps(kernels, {}, 10, 1000);
  CHECK(big.longest.size() == 1);
  CHECK(big.longest[0].host.empty());
  CHECK(big.total_ms == Catch::Approx(s.total_ms));
  CHECK(idle_gaps({}, host, 3).longest.empty());
}
