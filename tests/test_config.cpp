// Config parsing: every key's parsing, overrides, the resolved printer, and every error path (the
// message names the key, the location, and what was expected).
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "qlora/config.h"
#include "qlora/error.h"

using Catch::Matchers::ContainsSubstring;
using namespace qlora;

namespace {

const std::string kMinimal = "base_model: /models/tiny\ndatasets:\n  - path: data.jsonl\n";

// Parses and returns the UserError message ("" if it parsed).
std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    parse_config(yaml, "t.yaml", overrides);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("minimal config gets the documented defaults", "[config]") {
  const TrainConfig c = parse_config(kMinimal, "t.yaml");
  const TrainConfig d;
  CHECK(c.base_model == "/models/tiny");
  REQUIRE(c.datasets.size() == 1);
  CHECK(c.datasets[0].path == "data.jsonl");
  CHECK(c.datasets[0].type == DatasetType::completion);
  CHECK(c.datasets[0].field == "text");
  CHECK(c.adapter == AdapterType::qlora);
  CHECK(c.load_in_4bit);
  CHECK(c.lora_r == d.lora_r);
  CHECK(c.lora_alpha == d.lora_alpha);
  CHECK(c.lora_target_modules == all_lora_target_modules());
  CHECK(c.sequence_len == 2048);
  CHECK(c.learning_rate == 2e-4);
  CHECK(c.lr_scheduler == LrScheduler::cosine);
  CHECK(c.bf16 == Bf16Mode::auto_);
  CHECK(c.gradient_checkpointing_split_layers == AutoBool::auto_);
  CHECK(c.device == "auto");
  CHECK(c.seed == 42);
}

TEST_CASE("every key is parsed into its field", "[config]") {
  const std::string yaml = R"(
base_model: /m/llama
tokenizer_config: /m/tok
adapter: qlora
load_in_4bit: true
bnb_4bit_use_double_quant: false
lora_r: 8
lora_alpha: 16.5
lora_dropout: 0.1
lora_target_modules: [q_proj, v_proj]
lora_target_linear: false
datasets:
  - path: a.jsonl
    type: alpaca
  - path: b.jsonl
    type: chat_template
    field_messages: conversations
  - path: c.jsonl
    type: completion
    field: body
  - path: d.jsonl
    type: pretokenized
sequence_len: 512
sample_packing: false
val_set_size: 0.05
chat_template: llama3
train_on_inputs: true
micro_batch_size: 4
gradient_accumulation_steps: 8
num_epochs: 2.5
max_steps: 100
learning_rate: 1.0e-3
lr_scheduler: constant_with_warmup
warmup_steps: 10
warmup_ratio: 0
optimizer: adamw
weight_decay: 0.01
adam_beta1: 0.8
adam_beta2: 0.95
adam_epsilon: 1.0e-6
max_grad_norm: 0.3
gradient_checkpointing: false
attention_backend: cudnn
embedding_offloading: true
lm_head_offloading: true
gradient_checkpointing_reuse_weights: false
gradient_checkpointing_split_layers: false
bf16: false
fp16: true
device: cuda:1
seed: 7
output_dir: out/x
save_steps: 50
save_total_limit: 3
eval_steps: 25
logging_steps: 5
resume_from_checkpoint: out/x/checkpoint-50
)";
  const TrainConfig c = parse_config(yaml, "all.yaml");
  CHECK(c.base_model == "/m/llama");
  CHECK(c.tokenizer_config == "/m/tok");
  CHECK(c.adapter == AdapterType::qlora);
  CHECK(c.load_in_4bit);
  CHECK_FALSE(c.bnb_4bit_use_double_quant);
  CHECK(c.lora_r == 8);
  CHECK(c.lora_alpha == 16.5);
  CHECK(c.lora_dropout == 0.1);
  CHECK(c.lora_target_modules == std::vector<std::string>{"q_proj", "v_proj"});
  CHECK_FALSE(c.lora_target_linear);
  CHECK_FALSE(c.use_rslora);
  REQUIRE(c.datasets.size() == 4);
  CHECK(c.datasets[0].type == DatasetType::alpaca);
  CHECK(c.datasets[1].type == DatasetType::chat_template);
  CHECK(c.datasets[1].field_messages == "conversations");
  CHECK(c.datasets[2].field == "body");
  CHECK(c.datasets[3].type == DatasetType::pretokenized);
  CHECK(c.sequence_len == 512);
  CHECK_FALSE(c.sample_packing);
  CHECK(c.val_set_size == 0.05);
  CHECK(c.chat_template == "llama3");
  CHECK(c.train_on_inputs);
  CHECK(c.micro_batch_size == 4);
  CHECK(c.gradient_accumulation_steps == 8);
  CHECK(c.num_epochs == 2.5);
  CHECK(c.max_steps == 100);
  CHECK(c.learning_rate == 1e-3);
  CHECK(c.lr_scheduler == LrScheduler::constant_with_warmup);
  CHECK(c.warmup_steps == 10);
  CHECK(c.warmup_ratio == 0.0);
  CHECK(c.optimizer == OptimizerType::adamw_torch);
  CHECK(c.weight_decay == 0.01);
  CHECK(c.adam_beta1 == 0.8);
  CHECK(c.adam_beta2 == 0.95);
  CHECK(c.adam_epsilon == 1e-6);
  CHECK(c.max_grad_norm == 0.3);
  CHECK_FALSE(c.gradient_checkpointing);
  CHECK(c.attention_backend == AttentionBackend::cudnn);
  CHECK(c.embedding_offloading);
  CHECK(c.lm_head_offloading);
  CHECK_FALSE(c.gradient_checkpointing_reuse_weights);
  CHECK(c.gradient_checkpointing_split_layers == AutoBool::off);
  CHECK(c.bf16 == Bf16Mode::off);
  CHECK(c.fp16);
  CHECK(c.device == "cuda:1");
  CHECK(c.seed == 7);
  CHECK(c.output_dir == "out/x");
  CHECK(c.save_steps == 50);
  CHECK(c.save_total_limit == 3);
  CHECK(c.eval_steps == 25);
  CHECK(c.logging_steps == 5);
  CHECK(c.resume_from_checkpoint == "out/x/checkpoint-50");

  SECTION("the resolved YAML parses back to the same config") {
    const TrainConfig back = parse_config(config_to_yaml(c), "resolved.yaml");
    CHECK(config_to_yaml(back) == config_to_yaml(c));
    CHECK(back.lora_alpha == c.lora_alpha);
    CHECK(back.adam_epsilon == c.adam_epsilon);
    CHECK(back.datasets[1].field_messages == "conversations");
  }
}

TEST_CASE("special spellings of some keys", "[config]") {
  CHECK(parse_config(kMinimal + "lora_target_modules: all-linear\n", "t").lora_target_modules == all_lora_target_modules());
  CHECK(parse_config(kMinimal + "lora_target_modules: [q_proj]\nlora_target_linear: true\n", "t").lora_target_modules ==
        all_lora_target_modules());
  CHECK(parse_config(kMinimal + "bf16: auto\n", "t").bf16 == Bf16Mode::auto_);
  CHECK(parse_config(kMinimal + "bf16: true\n", "t").bf16 == Bf16Mode::on);
  CHECK(parse_config(kMinimal + "optimizer: adamw_torch\n", "t").optimizer == OptimizerType::adamw_torch);
  CHECK(parse_config(kMinimal + "tokenizer_config: null\n", "t").tokenizer_config.empty());
  CHECK(parse_config(kMinimal + "device: cpu\n", "t").device == "cpu");
  CHECK(parse_config(kMinimal + "val_set_size: 200\n", "t").val_set_size == 200);
  const TrainConfig lora = parse_config(kMinimal + "adapter: lora\n", "t");
  CHECK(lora.adapter == AdapterType::lora);
  CHECK_FALSE(lora.load_in_4bit);
}

TEST_CASE("an unknown key names itself, the nearest key and the line", "[config]") {
  const std::string msg = error_of("base_model: m\nlora_rr: 8\ndatasets: [{path: d}]\n");
  CHECK_THAT(msg, ContainsSubstring("t.yaml:2:1"));
  CHECK_THAT(msg, ContainsSubstring("lora_rr"));
  CHECK_THAT(msg, ContainsSubstring("did you mean 'lora_r'?"));
  CHECK_THAT(error_of(kMinimal + "learnig_rate: 1\n"), ContainsSubstring("did you mean 'learning_rate'?"));
  CHECK_THAT(error_of(kMinimal + "lroa_alpha: 1\n"), ContainsSubstring("did you mean 'lora_alpha'?"));
  // Far from every key: no suggestion.
  const std::string far = error_of(kMinimal + "wandb_project_name_x: q\n");
  CHECK_THAT(far, ContainsSubstring("unknown key"));
  CHECK_THAT(far, !ContainsSubstring("did you mean"));
}

TEST_CASE("wrong types and ranges name the key path and line:column", "[config]") {
  struct Case {
    std::string line;
    std::string expect;
  };
  auto c = GENERATE(values<Case>({
      {"lora_r: abc", "t.yaml:4:9: lora_r: expected an integer, found 'abc'"},
      {"lora_r: 0", "lora_r: expected an integer in [1, 4096], found 0"},
      {"lora_r: 2.5", "lora_r: expected an integer"},
      {"lora_r: [1]", "lora_r: expected an integer, found a list"},
      {"lora_dropout: 1.0", "lora_dropout: expected a number in [0, 1)"},
      {"lora_alpha: 0", "lora_alpha: expected a number in (0,"},
      {"learning_rate: fast", "learning_rate: expected a number, found 'fast'"},
      {"learning_rate: .nan", "learning_rate: expected a number"},
      {"sample_packing: maybe", "sample_packing: expected true or false, found 'maybe'"},
      {"lr_scheduler: cosin", "lr_scheduler: expected one of cosine, linear, constant, constant_with_warmup, found 'cosin'"},
      {"adapter: qlora8", "adapter: expected one of qlora, lora"},
      {"optimizer: adamw_bnb_8bit", "optimizer: expected one of adamw_torch, adamw"},
      {"bf16: sometimes", "bf16: expected auto, true or false"},
      {"gradient_checkpointing_split_layers: yes please",
       "gradient_checkpointing_split_layers: expected auto, true or false, found 'yes please'"},
      {"attention_backend: fa3", "attention_backend: expected one of auto, flash, cudnn, efficient, math, found 'fa3'"},
      {"device: gpu", "device: expected auto, cpu, cuda or cuda:N, found 'gpu'"},
      {"device: cuda:x", "device: expected auto, cpu, cuda or cuda:N"},
      {"output_dir: {a: 1}", "output_dir: expected a string, found a mapping"},
      {"micro_batch_size: -1", "micro_batch_size: expected an integer in [1,"},
      {"max_steps: -5", "max_steps: expected an integer in [0,"},
      {"warmup_ratio: 1", "warmup_ratio: expected a number in [0, 1)"},
      {"sequence_len: 1", "sequence_len: expected an integer in [2,"},
      {"seed: 99999999999999999999999", "seed: expected an integer"},
      {"lora_target_modules: [q_proj, qproj]", "lora_target_modules[1]: unknown module 'qproj' (did you mean 'q_proj'?)"},
      {"lora_target_modules: [q_proj, q_proj]", "lora_target_modules[1]: 'q_proj' listed twice"},
      {"lora_target_modules: []", "lora_target_modules: expected a non-empty list"},
      {"lora_target_modules: q_proj", "lora_target_modules: expected a non-empty list"},
      {"base_model: m", "base_model: duplicate key"},
  }));
  CAPTURE(c.line);
  CHECK_THAT(error_of(kMinimal + c.line + "\n"), ContainsSubstring(c.expect));
}

TEST_CASE("dataset entries are checked strictly", "[config]") {
  const std::string head = "base_model: m\n";
  CHECK_THAT(error_of(head + "datasets: data.jsonl\n"), ContainsSubstring("datasets: expected a non-empty list"));
  CHECK_THAT(error_of(head + "datasets: []\n"), ContainsSubstring("datasets: expected a non-empty list"));
  CHECK_THAT(error_of(head + "datasets:\n  - data.jsonl\n"), ContainsSubstring("datasets[0]: expected a mapping"));
  CHECK_THAT(error_of(head + "datasets:\n  - type: alpaca\n"), ContainsSubstring("datasets[0].path: required key missing"));
  CHECK_THAT(error_of(head + "datasets:\n  - path: ''\n"), ContainsSubstring("datasets[0].path: expected a file path"));
  const std::string typo = error_of(head + "datasets:\n  - path: a\n  - path: b\n    tpye: alpaca\n");
  CHECK_THAT(typo, ContainsSubstring("t.yaml:5:5: datasets[1].tpye: unknown key (did you mean 'type'?)"));
  CHECK_THAT(error_of(head + "datasets:\n  - path: a\n    type: sharegpt\n"),
             ContainsSubstring("datasets[0].type: expected one of completion, alpaca, chat_template, pretokenized"));
}

TEST_CASE("rules across keys", "[config]") {
  CHECK_THAT(error_of("datasets: [{path: d}]\n"), ContainsSubstring("base_model: required key missing"));
  CHECK_THAT(error_of("base_model: m\n"), ContainsSubstring("datasets: required key missing"));
  CHECK_THAT(error_of(kMinimal + "load_in_4bit: false\n"), ContainsSubstring("adapter: qlora needs load_in_4bit: true"));
  CHECK_THAT(error_of(kMinimal + "adapter: lora\nload_in_4bit: true\n"), ContainsSubstring("adapter: lora keeps a 16-bit base"));
  CHECK_THAT(error_of(kMinimal + "bf16: true\nfp16: true\n"), ContainsSubstring("fp16: bf16: true and fp16: true exclude each other"));
  CHECK_THAT(error_of(kMinimal + "warmup_steps: 5\nwarmup_ratio: 0.1\n"), ContainsSubstring("set warmup_steps or warmup_ratio"));
  CHECK_THAT(error_of(kMinimal + "gradient_checkpointing: false\nactivation_offloading: true\n"),
             ContainsSubstring("activation_offloading: needs gradient_checkpointing: true"));
  CHECK(error_of(kMinimal + "bf16: auto\nfp16: true\n").empty());
}

TEST_CASE("YAML that is not a config", "[config]") {
  CHECK_THAT(error_of("base_model: [unclosed\n"), ContainsSubstring("t.yaml:2:1: YAML syntax error"));
  CHECK_THAT(error_of("- a\n- b\n"), ContainsSubstring("expected a mapping of config keys at the top level, found a list"));
  CHECK_THAT(error_of("just a string\n"), ContainsSubstring("expected a mapping of config keys"));
  CHECK_THAT(error_of(""), ContainsSubstring("base_model: required key missing"));
  CHECK_THROWS_AS(load_config("/nonexistent/qlora.yaml"), UserError);
  CHECK_THROWS_WITH(load_config("/nonexistent/qlora.yaml"), ContainsSubstring("config file '/nonexistent/qlora.yaml': cannot open"));
}

TEST_CASE("key=value overrides", "[config]") {
  SECTION("typed values and dotted paths") {
    const TrainConfig c = parse_config(kMinimal, "t.yaml",
                                       {"lora_r=32", "learning_rate=1e-5", "sample_packing=false",
                                        "lora_target_modules=[q_proj,v_proj]", "datasets.0.path=x.jsonl",
                                        "datasets[0].type=alpaca", "output_dir=/tmp/o", "resume_from_checkpoint=null"});
    CHECK(c.lora_r == 32);
    CHECK(c.learning_rate == 1e-5);
    CHECK_FALSE(c.sample_packing);
    CHECK(c.lora_target_modules == std::vector<std::string>{"q_proj", "v_proj"});
    CHECK(c.datasets[0].path == "x.jsonl");
    CHECK(c.datasets[0].type == DatasetType::alpaca);
    CHECK(c.output_dir == "/tmp/o");
  }
  SECTION("an index equal to the list size appends an entry") {
    const TrainConfig c = parse_config(kMinimal, "t.yaml", {"datasets.1.path=more.jsonl", "datasets[1].type=alpaca"});
    REQUIRE(c.datasets.size() == 2);
    CHECK(c.datasets[1].path == "more.jsonl");
    CHECK(c.datasets[1].type == DatasetType::alpaca);
  }
  SECTION("a config made of overrides only") {
    const TrainConfig c = parse_config("", "t.yaml", {"base_model=m", "datasets.0.path=d.jsonl"});
    CHECK(c.base_model == "m");
    CHECK(c.datasets.at(0).path == "d.jsonl");
  }
  SECTION("errors name the override") {
    CHECK_THAT(error_of(kMinimal, {"lora_r=abc"}), ContainsSubstring("override 'lora_r=abc': lora_r: expected an integer"));
    CHECK_THAT(error_of(kMinimal, {"lora_rr=8"}), ContainsSubstring("override 'lora_rr=8': lora_rr: unknown key (did you mean 'lora_r'?)"));
    CHECK_THAT(error_of(kMinimal, {"datasets.0.tpye=alpaca"}), ContainsSubstring("override 'datasets.0.tpye=alpaca': datasets[0].tpye: unknown key"));
    CHECK_THAT(error_of(kMinimal, {"lora_r"}), ContainsSubstring("override 'lora_r': expected key=value"));
    CHECK_THAT(error_of(kMinimal, {"=3"}), ContainsSubstring("expected key=value"));
    CHECK_THAT(error_of(kMinimal, {"datasets.5.path=x"}), ContainsSubstring("index 5 is past the end of a list of 1"));
    CHECK_THAT(error_of(kMinimal, {"base_model.x=1"}), ContainsSubstring("'base_model.x' is inside something that is not a mapping"));
    CHECK_THAT(error_of(kMinimal, {"lora_r.x=1"}), ContainsSubstring("override 'lora_r.x=1': lora_r: expected an integer, found a mapping"));
    CHECK_THAT(error_of(kMinimal, {"base_model[0]=1"}), ContainsSubstring("indexes something that is not a list"));
    CHECK_THAT(error_of(kMinimal, {"datasets[x].path=1"}), ContainsSubstring("expected [N] with a list index"));
    CHECK_THAT(error_of(kMinimal, {"a..b=1"}), ContainsSubstring("empty component in key path"));
    CHECK_THAT(error_of(kMinimal, {"lora_target_modules=[q_proj"}), ContainsSubstring("the value is not valid YAML"));
  }
}

TEST_CASE("key listing covers every key with its default", "[config]") {
  const std::string keys = describe_config_keys();
  for (const char* k : {"base_model", "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "sequence_len",
                        "sample_packing", "micro_batch_size", "gradient_accumulation_steps", "num_epochs", "max_steps",
                        "learning_rate", "lr_scheduler", "warmup_steps", "optimizer", "gradient_checkpointing", "datasets",
                        "val_set_size", "output_dir", "save_steps", "eval_steps", "resume_from_checkpoint", "seed"})
    CHECK_THAT(keys, ContainsSubstring(std::string(k) + "  ("));
  CHECK_THAT(keys, ContainsSubstring("lora_r  (integer in [1, 4096], default 16)"));
}

TEST_CASE("nearest_name", "[config]") {
  const std::vector<std::string> names = {"lora_r", "lora_alpha", "learning_rate"};
  CHECK(nearest_name("lora_rr", names) == "lora_r");
  CHECK(nearest_name("lroa_r", names) == "lora_r");
  CHECK(nearest_name("LEARNING_RATE", names).empty());
  CHECK(nearest_name("xyz", names).empty());
}

TEST_CASE("data keys: dataset types, aliases, fields and the preparation options", "[config]") {
  SECTION("defaults") {
    const TrainConfig c = parse_config(kMinimal, "t.yaml");
    CHECK(c.datasets[0].field_messages == "messages");
    CHECK(c.datasets[0].field_tools == "tools");
    CHECK(c.dataset_num_proc == 0);
    CHECK(c.shuffle_merged_datasets);
    CHECK_FALSE(c.skip_bad_lines);
    CHECK(c.dataset_prepared_path.empty());
  }
  SECTION("every data key is read and printed back") {
    const std::string yaml = R"(base_model: m
datasets:
  - {path: a.jsonl, type: text, field: body}
  - {path: b.jsonl, type: chat, field_messages: conversations, field_tools: functions}
  - {path: c.jsonl, type: input_ids}
  - {path: d.txt}
dataset_num_proc: 3
shuffle_merged_datasets: false
skip_bad_lines: true
dataset_prepared_path: /tmp/prep
)";
    const TrainConfig c = parse_config(yaml, "t.yaml");
    REQUIRE(c.datasets.size() == 4);
    CHECK(c.datasets[0].type == DatasetType::completion);
    CHECK(c.datasets[0].field == "body");
    CHECK(c.datasets[1].type == DatasetType::chat_template);
    CHECK(c.datasets[1].field_messages == "conversations");
    CHECK(c.datasets[1].field_tools == "functions");
    CHECK(c.datasets[2].type == DatasetType::pretokenized);
    CHECK(c.datasets[3].type == DatasetType::completion);
    CHECK(c.dataset_num_proc == 3);
    CHECK_FALSE(c.shuffle_merged_datasets);
    CHECK(c.skip_bad_lines);
    CHECK(c.dataset_prepared_path == "/tmp/prep");
    const std::string resolved = config_to_yaml(c);
    CHECK_THAT(resolved, ContainsSubstring("type: completion"));   // aliases print canonically
    CHECK_THAT(resolved, ContainsSubstring("type: chat_template"));
    CHECK_THAT(resolved, ContainsSubstring("field_tools: functions"));
    const TrainConfig back = parse_config(resolved, "resolved.yaml");
    CHECK(config_to_yaml(back) == resolved);
    CHECK(back.datasets[1].field_tools == "functions");
    CHECK(back.dataset_prepared_path == "/tmp/prep");
  }
  SECTION("errors") {
    CHECK_THAT(error_of(kMinimal + "dataset_num_proc: -1\n"), ContainsSubstring("dataset_num_proc: expected an integer in [0,"));
    CHECK_THAT(error_of(kMinimal + "skip_bad_lines: sometimes\n"), ContainsSubstring("skip_bad_lines: expected true or false"));
    CHECK_THAT(error_of(kMinimal + "shuffle_merged_dataset: true\n"),
               ContainsSubstring("did you mean 'shuffle_merged_datasets'?"));
    CHECK_THAT(error_of("base_model: m\ndatasets:\n  - {path: a.jsonl, field_tool: x}\n"),
               ContainsSubstring("datasets[0].field_tool: unknown key (did you mean 'field_tools'?)"));
    CHECK_THAT(error_of("base_model: m\ndatasets:\n  - {path: a.jsonl, field: ''}\n"),
               ContainsSubstring("datasets[0].field: expected a JSON field name"));
    CHECK_THAT(error_of("base_model: m\ndatasets:\n  - {path: a.txt, type: alpaca}\n"),
               ContainsSubstring("t.yaml:3:25: datasets[0].type: a .txt file holds one completion example per line"));
    CHECK_THAT(error_of("base_model: m\ndatasets:\n  - {path: a, type: sharegpt}\n"),
               ContainsSubstring("text, chat, input_ids"));
  }
  SECTION("the key listing documents them") {
    const std::string keys = describe_config_keys();
    for (const char* k : {"dataset_num_proc", "shuffle_merged_datasets", "skip_bad_lines", "dataset_prepared_path"})
      CHECK_THAT(keys, ContainsSubstring(std::string(k) + "  ("));
    CHECK_THAT(keys, ContainsSubstring("a .txt file is read as completion data, one example per non-empty line"));
    CHECK_THAT(keys, ContainsSubstring("shuffle_merged_datasets  (true | false, default true)"));
  }
}
