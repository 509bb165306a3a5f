// The packing acceptance check: a packed micro-batch of 3 documents gives the same per-token losses
// as the 3 documents run alone (unpacked), on a tiny random Llama in fp32 -- the position ids and
// targets make_batch builds keep documents apart in attention and in the loss.
// torch headers before Catch: c10 defines a CHECK macro that Catch must override.
#include "qlora/dataset.h"
#include "qlora/flce.h"
#include "qlora/model.h"
#include "qlora/safetensors.h"

#include <catch2/catch_test_macros.hpp>

#include <nlohmann/json.hpp>

#include <random>

#include "test_util.h"
#include "tiny_llama.h"

using namespace qlora;

namespace {

// Per-token losses [B*L] (0 where the target is -100) of a batch.
at::Tensor token_losses(const LlamaWeights& model, const Batch& b) {
  at::NoGradGuard no_grad;
  DequantScratch scratch;
  const at::Tensor h = llama_hidden_states(model, {b.input_ids, b.position_ids}, scratch);
  FlceOptions o;
  o.reduction = FlceOptions::Reduction::none;
  return fused_linear_cross_entropy(h.reshape({-1, h.size(-1)}), model.lm_head, b.target_ids.reshape({-1}), o);
}

}  // namespace

TEST_CASE("data: a packed batch of 3 documents gives the losses of the documents run alone", "[data][model]") {
  at::manual_seed(11);
  test::TempDir dir;
  const nlohmann::json config = {{"model_type", "llama"},         {"architectures", {"LlamaForCausalLM"}},
                                 {"hidden_size", 64},             {"intermediate_size", 96},
                                 {"num_hidden_layers", 2},        {"num_attention_heads", 4},
                                 {"num_key_value_heads", 2},      {"head_dim", 16},
                                 {"vocab_size", 100},             {"max_position_embeddings", 256},
                                 {"rms_norm_eps", 1e-5},          {"rope_theta", 10000.0},
                                 {"tie_word_embeddings", false},  {"hidden_act", "silu"},
                                 {"torch_dtype", "float32"}};
  write_file_atomic(dir / "config.json", config.dump(2));
  save_safetensors(dir / "model.safetensors", test::tiny_llama_tensors(at::kFloat));
  ModelLoadOptions lo;
  lo.load_in_4bit = false;
  lo.compute_dtype = at::kFloat;
  const LlamaWeights model = load_llama(dir.path, lo);

  // Three documents of different lengths, with masked prompt tokens.
  std::mt19937 rng(5);
  std::vector<TokenizedExample> docs;
  for (int n : {7, 12, 4}) {
    TokenizedExample ex;
    for (int t = 0; t < n; ++t) {
      const int32_t id = static_cast<int32_t>(rng() % 100);
      ex.input_ids.push_back(id);
      ex.labels.push_back(t < n / 3 ? kIgnoreLabel : id);
    }
    docs.push_back(ex);
  }
  BatchingOptions packed;
  packed.sequence_len = 16;
  packed.micro_batch_size = 2;
  packed.sample_packing = true;
  BatchingOptions alone = packed;
  alone.sample_packing = false;

  const Batch pb = make_batch(docs, {0, 1, 2}, packed);
  REQUIRE(pb.input_ids.size(0) == 1);
  REQUIRE(pb.input_ids.size(1) == 23);
  const at::Tensor packed_loss = token_losses(model, pb);
  const at::Tensor packed_targets = pb.target_ids.reshape({-1});

  int64_t offset = 0, compared = 0;
  for (int64_t d = 0; d < 3; ++d) {
    const Batch ab = make_batch(docs, {d}, alone);
    const int64_t n = ab.input_ids.size(1);
    const at::Tensor alone_loss = token_losses(model, ab);
    INFO("document " << d);
    CHECK(packed_targets.narrow(0, offset, n).equal(ab.target_ids.reshape({-1})));
    const at::Tensor got = packed_loss.narrow(0, offset, n);
    const at::Tensor mask = ab.target_ids.reshape({-1}) != kIgnoreLabel;
    REQUIRE(mask.sum().item<int64_t>() > 0);
    const at::Tensor a = got.masked_select(mask), b = alone_loss.masked_select(mask);
    CHECK((b > 0).all().item<bool>());
    const double rel = ((a - b).abs() / b.abs()).max().item<double>();
    CHECK(rel <= 1e-5);
    CHECK(got.masked_select(~mask).abs().sum().item<double>() == 0.0);  // ignored positions carry no loss
    compared += mask.sum().item<int64_t>();
    offset += n;
  }
  CHECK(compared == pb.n_target_tokens);
  // The sums agree too: the packed batch's loss normalizer counts the same tokens.
  CHECK(std::abs(packed_loss.sum().item<double>() - [&] {
          double s = 0;
          for (int64_t d = 0; d < 3; ++d) s += token_losses(model, make_batch(docs, {d}, alone)).sum().item<double>();
          return s;
        }()) <= 1e-4);
}
