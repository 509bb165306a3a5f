// Multi-rank training (issue 8) with the in-process collective, one thread per rank, fp32 on the
// CPU: sharding and unsharding give back the exact layer tensors; 20 steps at 1, 2 and 4 ranks give
// the losses and the adapter of the plain single-process run; each rank holds about 1/world of the
// sharded state; a checkpoint saved at 2 ranks resumes at 1 and at 4 ranks with the same next loss;
// a rank that throws stops every rank (no hang).
#include <ATen/core/grad_mode.h>

#include <atomic>
#include <cmath>
#include <exception>
#include <filesystem>
#include <functional>
#include <iostream>
#include <mutex>
#include <thread>
#include <vector>

#include "qlora/checkpoint.h"
#include "qlora/metrics.h"
#include "qlora/config.h"
#include "qlora/dist.h"
#include "qlora/fsdp.h"
#include "qlora/safetensors.h"
#include "qlora/trainer.h"
#include "test_util.h"
#include "trainer_fixture.h"

#include "test_cuda_util.h"

// After the libtorch headers: c10 defines its own CHECK, which Catch2's must replace.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

namespace fs = std::filesystem;
using qlora::test::TempDir;

namespace {

// Runs fn(rank, comm) on `world` threads sharing one in-process group. A rank that throws aborts
// the group (so the others do not wait forever); the first exception is rethrown after all joined.
template <class Result>
std::vector<Result> run_ranks(int world, const std::function<Result(int, std::shared_ptr<qlora::Collective>)>& fn) {
  auto comms = qlora::make_in_process_collectives(world, std::chrono::seconds(120));
  std::vector<Result> results(static_cast<size_t>(world));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      try {
        results[static_cast<size_t>(r)] = fn(r, comms[static_cast<size_t>(r)]);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = std::current_exception();
        comms[static_cast<size_t>(r)]->abort(e.what());
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return results;
}

qlora::TrainConfig make_config(const fs::path& dir, const std::vector<std::string>& overrides) {
  return qlora::parse_config(qlora::test::trainer_yaml(dir, ""), "test.yaml", overrides);
}

std::vector<std::string> with(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// A 20-step run on `world` ranks (nullptr world 0: the plain single-process path) with a global
// batch of 4 micro-batches: gradient_accumulation_steps = 4 / world.
qlora::TrainRunResult train(const fs::path& dir, int world, const std::vector<std::string>& overrides,
                            const qlora::TrainerOptions& options = {}) {
  const int ga = 4 / std::max(1, world);
  const qlora::TrainConfig cfg =
      make_config(dir, with({"gradient_accumulation_steps=" + std::to_string(ga)}, overrides));
  if (world == 0) return qlora::run_training(cfg, options);
  auto results = run_ranks<qlora::TrainRunResult>(
      world, [&](int, std::shared_ptr<qlora::Collective> comm) { return qlora::run_training(cfg, options, comm); });
  for (int r = 1; r < world; ++r) REQUIRE(results[static_cast<size_t>(r)].losses == results[0].losses);
  return results[0];
}

double max_adapter_diff(const fs::path& a, const fs::path& b) {
  const qlora::SafetensorsFile fa(a / "adapter_model.safetensors"), fb(b / "adapter_model.safetensors");
  REQUIRE(fa.names() == fb.names());
  double d = 0;
  for (const auto& n : fa.names()) d = std::max(d, (fa.tensor(n) - fb.tensor(n)).abs().max().item<double>());
  return d;
}

const std::vector<std::string> kRecipe = {"adapter=qlora", "load_in_4bit=true", "max_steps=20",
                                          "lr_scheduler=cosine", "warmup_steps=2", "save_steps=0"};

}  // namespace

TEST_CASE("fsdp: shard then unshard gives back every layer tensor bit for bit, 1/world per rank", "[dist][fsdp]") {
  TempDir d("qlora_fsdp");
  qlora::test::write_trainer_fixture(d.path);
  for (const bool nf4 : {true, false}) {
    qlora::TrainerOptions o;
    o.write_outputs = false;
    const qlora::TrainConfig cfg =
        make_config(d.path, nf4 ? std::vector<std::string>{"adapter=qlora", "load_in_4bit=true"} : std::vector<std::string>{});
    const qlora::Trainer plain = qlora::make_trainer(cfg, o);
    for (const int world : {1, 2, 3, 4}) {
      CAPTURE(nf4, world);
      // Catch2 assertions are not thread-safe: each rank returns a list of what did not hold.
      const auto problems = run_ranks<std::string>(world, [&](int rank, std::shared_ptr<qlora::Collective> comm) {
        std::string bad;
        auto expect = [&bad, rank](bool ok, const std::string& what) {
          if (!ok) bad += "rank " + std::to_string(rank) + ": " + what + "\n";
        };
        qlora::Trainer t = qlora::make_trainer(cfg, o, comm);
        expect(t.fsdp.has_value(), "not sharded");
        const qlora::FsdpFootprint f = qlora::fsdp_footprint(*t.fsdp);
        // Shards are padded to whole units, so "about": at least 1/world, at most one unit more per tensor.
        expect(f.frozen_local_bytes * world >= f.frozen_total_bytes, "frozen shards smaller than 1/world");
        expect(f.lora_local_elems * world >= f.lora_total_elems, "LoRA shards smaller than 1/world");
        expect(f.lora_local_elems * world <= f.lora_total_elems + int64_t{2} * 7 * 2 * 96 * world, "LoRA shards too big");
        for (size_t i = 0; i < t.model.layers.size(); ++i) {
          const qlora::LinearWeight& q = t.model.layers[i].q_proj;
          expect(!(q.nf4 ? q.nf4->packed.defined() : q.dense.defined()), "layer weight still whole after sharding");
          qlora::unshard_layer(*t.fsdp, i, t.params);
          for (const std::string& name : qlora::lora_projection_names()) {
            const std::string where = "layer " + std::to_string(i) + " " + name;
            const qlora::LinearWeight& a = qlora::base_projection(t.model.layers[i], name);
            const qlora::LinearWeight& b = qlora::base_projection(plain.model.layers[i], name);
            if (nf4) {
              expect(at::equal(a.nf4->packed, b.nf4->packed), where + " packed");
              expect(at::equal(a.nf4->absmax, b.nf4->absmax), where + " absmax");
              expect(at::equal(a.nf4->absmax2, b.nf4->absmax2), where + " absmax2");
            } else {
              expect(at::equal(a.dense, b.dense), where + " dense");
            }
            const auto& la = qlora::lora_projection(t.lora.layers[i], name);
            const auto& lb = qlora::lora_projection(plain.lora.layers[i], name);
            expect(at::equal(la->A, lb->A) && at::equal(la->B, lb->B), where + " LoRA");
          }
          qlora::reshard_layer(*t.fsdp, i);
          expect(!qlora::lora_projection(t.lora.layers[i], "q_proj")->A.defined(), "LoRA still whole after reshard");
        }
        // The whole adapter comes back on every rank.
        const qlora::LoraModel full = qlora::full_adapter(t);
        expect(at::equal(full.layers[1].down_proj->A, plain.lora.layers[1].down_proj->A), "gathered adapter");
        return bad;
      });
      for (const std::string& p : problems) CHECK(p == "");
    }
  }
}

TEST_CASE("fsdp: each rank holds 1/world of the layer weights and LoRA state (a model of many NF4 groups)", "[dist][fsdp]") {
  // hidden 256, intermediate 1024: every projection holds 4..16 double-quantization groups of
  // 16,384 weights, so whole-group shards divide evenly at 2 and 4 ranks.
  TempDir d("qlora_fsdp");
  qlora::test::write_trainer_fixture(d.path);  // for the data; the model is replaced below
  const int64_t H = 256, I = 1024, V = 100, L = 2;
  const nlohmann::json cfg = {{"model_type", "llama"}, {"architectures", {"LlamaForCausalLM"}}, {"hidden_size", H},
                              {"intermediate_size", I}, {"num_hidden_layers", L}, {"num_attention_heads", 4},
                              {"num_key_value_heads", 4}, {"vocab_size", V}, {"rms_norm_eps", 1e-5},
                              {"hidden_act", "silu"}, {"tie_word_embeddings", false}, {"torch_dtype", "float32"}};
  qlora::test::write_file(d.path / "model" / "config.json", cfg.dump(2));
  at::manual_seed(11);
  qlora::NamedTensors ts = {{"model.embed_tokens.weight", at::randn({V, H})}, {"model.norm.weight", at::ones({H})},
                            {"lm_head.weight", at::randn({V, H}) * 0.05}};
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"})
      ts.emplace_back(p + "self_attn." + n + ".weight", at::randn({H, H}) * 0.05);
    ts.emplace_back(p + "mlp.gate_proj.weight", at::randn({I, H}) * 0.05);
    ts.emplace_back(p + "mlp.up_proj.weight", at::randn({I, H}) * 0.05);
    ts.emplace_back(p + "mlp.down_proj.weight", at::randn({H, I}) * 0.05);
    ts.emplace_back(p + "input_layernorm.weight", at::ones({H}));
    ts.emplace_back(p + "post_attention_layernorm.weight", at::ones({H}));
  }
  qlora::save_safetensors(d.path / "model" / "model.safetensors", ts);
  qlora::TrainerOptions o;
  o.write_outputs = false;
  const qlora::TrainConfig config = make_config(d.path, {"adapter=qlora", "load_in_4bit=true", "lora_r=8"});
  for (const int world : {2, 4}) {
    const auto prints = run_ranks<qlora::FsdpFootprint>(world, [&](int, std::shared_ptr<qlora::Collective> comm) {
      qlora::Trainer t = qlora::make_trainer(config, o, comm);
      qlora::FsdpFootprint f = qlora::fsdp_footprint(*t.fsdp);
      int64_t adam = 0;  // AdamW state elements this rank holds
      for (const at::Tensor& m : t.optimizer.exp_avg) adam += m.numel();
      f.lora_local_elems += adam;  // (reported together: masters + first moment; second moment is the same size)
      return f;
    });
    for (int r = 0; r < world; ++r) {
      const qlora::FsdpFootprint& f = prints[static_cast<size_t>(r)];
      const double frozen = static_cast<double>(f.frozen_local_bytes) / static_cast<double>(f.frozen_total_bytes);
      const double lora = static_cast<double>(f.lora_local_elems) / static_cast<double>(2 * f.lora_total_elems);
      std::cout << "fsdp footprint, world " << world << ", rank " << r << ": layer weights " << f.frozen_local_bytes
                << " of " << f.frozen_total_bytes << " bytes (" << frozen << "), LoRA masters + AdamW m "
                << f.lora_local_elems << " of " << 2 * f.lora_total_elems << " elements (" << lora << ")\n";
      CHECK(std::abs(frozen - 1.0 / world) <= 0.02);
      CHECK(std::abs(lora - 1.0 / world) <= 0.02);
    }
  }
}

TEST_CASE("fsdp: 20 steps at 1, 2 and 4 ranks equal the plain run (losses and adapter, fp32)", "[dist][fsdp][train]") {
  TempDir d("qlora_fsdp");
  qlora::test::write_trainer_fixture(d.path);
  const qlora::TrainRunResult plain = train(d.path, 0, with(kRecipe, {"output_dir=" + (d.path / "plain").string()}));
  REQUIRE(plain.losses.size() == 20);
  for (const int world : {1, 2, 4}) {
    for (const bool reshard : {true, false}) {
      if (world != 2 && !reshard) continue;
      CAPTURE(world, reshard);
      const fs::path out = d.path / ("w" + std::to_string(world) + (reshard ? "" : "-keep"));
      const qlora::TrainRunResult r =
          train(d.path, world, with(kRecipe, {"output_dir=" + out.string(),
                                              std::string("fsdp_reshard_after_forward=") + (reshard ? "true" : "false")}));
      REQUIRE(r.losses.size() == 20);
      double worst = 0;
      for (size_t i = 0; i < 20; ++i) {
        CAPTURE(i, plain.losses[i], r.losses[i]);
        CHECK(std::abs(r.losses[i] - plain.losses[i]) <= 1e-5 * std::max(1.0, std::abs(plain.losses[i])));
        worst = std::max(worst, std::abs(r.losses[i] - plain.losses[i]));
      }
      const double adapter = max_adapter_diff(d.path / "plain", out);
      CHECK(adapter <= 1e-5);
      std::cout << "fsdp " << world << " rank(s), reshard_after_forward " << reshard << ": max |loss - plain| "
                << worst << ", max |adapter - plain| " << adapter << "\n";
    }
  }
  // Without gradient checkpointing (the whole graph kept, layers gathered until the backward).
  const fs::path out = d.path / "w2-nockpt";
  const qlora::TrainRunResult r =
      train(d.path, 2, with(kRecipe, {"output_dir=" + out.string(), "gradient_checkpointing=false"}));
  for (size_t i = 0; i < 20; ++i) CHECK(std::abs(r.losses[i] - plain.losses[i]) <= 1e-5 * std::max(1.0, plain.losses[i]));
  CHECK(max_adapter_diff(d.path / "plain", out) <= 1e-5);
}

TEST_CASE("fsdp: fp16 gradients reduce-scattered in fp16 (scaled by 1/sqrt(world)) track the fp32 reduction", "[dist][fsdp][train]") {
  TempDir d("qlora_fsdp");
  qlora::test::write_trainer_fixture(d.path);
  const std::vector<std::string> fp16 = with(kRecipe, {"fp16=true", "max_steps=10"});
  const qlora::TrainRunResult f32 =
      train(d.path, 2, with(fp16, {"output_dir=" + (d.path / "f32").string(), "fsdp_reduce_in_compute_dtype=false"}));
  const qlora::TrainRunResult f16 =
      train(d.path, 2, with(fp16, {"output_dir=" + (d.path / "f16").string(), "fsdp_reduce_in_compute_dtype=true"}));
  double worst = 0;
  for (size_t i = 0; i < f32.losses.size(); ++i) {
    REQUIRE(std::isfinite(f16.losses[i]));
    worst = std::max(worst, std::abs(f16.losses[i] - f32.losses[i]));
  }
  std::cout << "fsdp fp16 compute, 2 ranks: max |loss(fp16 reduce) - loss(fp32 reduce)| " << worst
            << ", adapter " << max_adapter_diff(d.path / "f32", d.path / "f16") << "\n";
  CHECK(worst <= 1e-2);
  CHECK(max_adapter_diff(d.path / "f32", d.path / "f16") <= 1e-2);
}

TEST_CASE("fsdp: a checkpoint saved at 2 ranks resumes at 1 and at 4 ranks with the same next losses", "[dist][fsdp][train]") {
  TempDir d("qlora_fsdp");
  qlora::test::write_trainer_fixture(d.path);
  const std::vector<std::string> recipe = with(kRecipe, {"lora_dropout=0.0"});
  const qlora::TrainRunResult full = train(d.path, 2, with(recipe, {"output_dir=" + (d.path / "full").string()}));
  qlora::TrainerOptions stop;
  stop.stop_after_step = 10;
  const qlora::TrainRunResult first = train(d.path, 2, with(recipe, {"output_dir=" + (d.path / "split").string()}), stop);
  REQUIRE(first.interrupted);
  const fs::path ck = d.path / "split" / "checkpoint-10";
  REQUIRE(fs::exists(ck / "tensors-00000-of-00002.safetensors"));
  REQUIRE(fs::exists(ck / "tensors-00001-of-00002.safetensors"));
  CHECK(qlora::load_checkpoint(ck).world_size == 2);
  for (const int world : {1, 4, 0}) {
    CAPTURE(world);
    const fs::path out = d.path / ("resume" + std::to_string(world));
    fs::create_directories(out);
    fs::copy(ck, out / "checkpoint-10", fs::copy_options::recursive);
    const qlora::TrainRunResult rest =
        train(d.path, world, with(recipe, {"output_dir=" + out.string(), "resume_from_checkpoint=auto"}));
    REQUIRE(rest.losses.size() == 10);
    for (size_t i = 0; i < 10; ++i) {
      CAPTURE(i);
      CHECK(std::abs(rest.losses[i] - full.losses[10 + i]) <= 1e-5 * std::max(1.0, full.losses[10 + i]));
    }
    CHECK(max_adapter_diff(d.path / "full", out) <= 1e-5);
  }
}

TEST_CASE("fsdp: a rank that throws stops every rank instead of hanging", "[dist][fsdp][train]") {
  TempDir d("qlora_fsdp");
  qlora::test::write_trainer_fixture(d.path);
  const qlora::TrainConfig cfg = make_config(d.path, with(kRecipe, {"output_dir=" + (d.path / "out").string()}));
  auto comms = qlora::make_in_process_collectives(3, std::chrono::seconds(60));
  std::atomic<int> failed{0};
  std::vector<std::string> messages(3);
  std::vector<std::thread> threads;
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < 3; ++r)
    threads.emplace_back([&, r] {
      qlora::TrainerOptions o;
      if (r == 1) o.throw_at_step = 3;
      try {
        qlora::run_training(cfg, o, comms[static_cast<size_t>(r)]);
      } catch (const std::exception& e) {
        messages[static_cast<size_t>(r)] = e.what();
        ++failed;
        comms[static_cast<size_t>(r)]->abort(e.what());
      }
    });
  for (auto& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(failed == 3);
  CHECK_THAT(messages[1], Catch::Matchers::ContainsSubstring("test hook"));
  CHECK_THAT(messages[0], Catch::Matchers::ContainsSubstring("abort"));
  CHECK(seconds < 50);  // well before the collectives' 60 s timeout
}

TEST_CASE("fsdp: 2 ranks sharing one GPU (in-process) track the plain bf16 run", "[dist][fsdp][cuda]") {
  QLORA_REQUIRE_CUDA();
  TempDir d("qlora_fsdp");
  qlora::test::write_trainer_fixture(d.path);
  const std::vector<std::string> gpu = with(kRecipe, {"device=cuda", "bf16=true"});
  const qlora::TrainRunResult plain = train(d.path, 0, with(gpu, {"output_dir=" + (d.path / "plain").string()}));
  const qlora::TrainRunResult one = train(d.path, 1, with(gpu, {"output_dir=" + (d.path / "w1").string()}));
  const qlora::TrainRunResult two = train(d.path, 2, with(gpu, {"output_dir=" + (d.path / "w2").string()}));
  double worst1 = 0, worst2 = 0;
  for (size_t i = 0; i < 20; ++i) {
    worst1 = std::max(worst1, std::abs(one.losses[i] - plain.losses[i]));
    worst2 = std::max(worst2, std::abs(two.losses[i] - plain.losses[i]));
  }
  std::cout << "fsdp on CUDA, bf16: max |loss - plain| 1 rank " << worst1 << ", 2 ranks " << worst2 << "\n";
  CHECK(worst1 == 0.0);  // world 1: the same kernels on the same bf16 values
  CHECK(worst2 <= 2e-2);  // world 2: gradients summed in another order, then bf16 forwards
  CHECK(plain.losses.back() < plain.losses.front());
}

namespace {

qlora::test::Run run_shell(const std::string& cmd) {
  qlora::test::Run r;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

}  // namespace

TEST_CASE("qlora train under scripts/launch: 2 CPU processes equal 1; a failing rank stops both", "[dist][launch][train]") {
  TempDir d("qlora_fsdp");
  qlora::test::write_trainer_fixture(d.path);
  const fs::path cfg = d.path / "cfg.yaml";
  qlora::test::write_file(cfg, qlora::test::trainer_yaml(d.path, ""));
  const std::string launch = std::string(QLORA_SOURCE_DIR) + "/scripts/launch --standalone --nproc-per-node ";
  const std::string train = std::string(" ") + QLORA_BINARY + " train " + cfg.string() +
                            " adapter=qlora load_in_4bit=true max_steps=8 lr_scheduler=cosine save_steps=4 ";
  const qlora::test::Run one = qlora::test::run_qlora(
      "train " + cfg.string() + " adapter=qlora load_in_4bit=true max_steps=8 lr_scheduler=cosine save_steps=4 "
      "gradient_accumulation_steps=2 output_dir=" + (d.path / "one").string());
  REQUIRE(one.status == 0);
  const qlora::test::Run two = run_shell(launch + "2" + train + "gradient_accumulation_steps=1 output_dir=" +
                                         (d.path / "two").string());
  CAPTURE(two.output);
  REQUIRE(two.status == 0);
  CHECK_THAT(two.output, Catch::Matchers::ContainsSubstring("tcpstore"));
  const qlora::LossCurve a = qlora::read_loss_curve(d.path / "one" / "metrics.jsonl");
  const qlora::LossCurve b = qlora::read_loss_curve(d.path / "two" / "metrics.jsonl");
  REQUIRE(a.train.size() == 8);
  REQUIRE(b.train.size() == 8);
  for (size_t i = 0; i < 8; ++i) CHECK(std::abs(a.train[i].second - b.train[i].second) <= 1e-5 * std::max(1.0, a.train[i].second));
  CHECK(fs::exists(d.path / "two" / "checkpoint-8" / "tensors-00001-of-00002.safetensors"));
  CHECK(max_adapter_diff(d.path / "one", d.path / "two") <= 1e-5);

  // The same binary unchanged under torchrun --no-python (its elastic agent serves the store).
  const fs::path torchrun = fs::path(QLORA_SOURCE_DIR) / ".venv" / "bin" / "torchrun";
  if (fs::exists(torchrun)) {
    const qlora::test::Run tr = run_shell(torchrun.string() + " --standalone --nproc-per-node 2 --no-python" + train +
                                          "gradient_accumulation_steps=1 output_dir=" + (d.path / "torchrun").string());
    CAPTURE(tr.output);
    REQUIRE(tr.status == 0);
    const qlora::LossCurve c = qlora::read_loss_curve(d.path / "torchrun" / "metrics.jsonl");
    REQUIRE(c.train.size() == 8);
    for (size_t i = 0; i < 8; ++i) CHECK(std::abs(a.train[i].second - c.train[i].second) <= 1e-5 * std::max(1.0, a.train[i].second));
  } else {
    WARN("no " << torchrun.string() << ": the torchrun check did not run");
  }

  // Rank 1 throws before step 3: the launcher stops rank 0 (waiting in a collective) and fails.
  const auto start = std::chrono::steady_clock::now();
  const qlora::test::Run bad = run_shell("QLORA_TEST_THROW_AT=1:2 QLORA_LAUNCH_GRACE_S=5 " + launch + "2" + train +
                                         "output_dir=" + (d.path / "bad").string());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CAPTURE(bad.output);
  CHECK(bad.status != 0);
  CHECK_THAT(bad.output, Catch::Matchers::ContainsSubstring("test hook: rank 1 fails"));
  CHECK_THAT(bad.output, Catch::Matchers::ContainsSubstring("launch: rank 1"));
  CHECK(seconds < 60);
}
