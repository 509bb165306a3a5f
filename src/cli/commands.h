// The qlora subcommands. Each add_*_command adds its CLI11 subcommand (options bound to its own
// state) and returns the function that runs it once the command line was parsed.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace qlora::cli {

using CommandFn = std::function<int()>;

CommandFn add_train_command(CLI::App& app);
CommandFn add_validate_command(CLI::App& app);
CommandFn add_bench_command(CLI::App& app);
CommandFn add_quantize_command(CLI::App& app);
CommandFn add_inspect_command(CLI::App& app);
CommandFn add_preprocess_command(CLI::App& app);
CommandFn add_export_command(CLI::App& app);          // cmd_export.cpp
CommandFn add_check_compile_command(CLI::App& app);   // cmd_check_compile.cpp
CommandFn add_aoti_run_command(CLI::App& app);        // cmd_aoti_run.cpp (hidden: a test tool)
CommandFn add_generate_command(CLI::App& app);        // cmd_generate.cpp
CommandFn add_eval_command(CLI::App& app);            // cmd_eval.cpp
CommandFn add_merge_command(CLI::App& app);           // cmd_merge.cpp

// qlora export --format gguf|safetensors (cmd_merge.cpp): adds --type, --base-16bit and --force to
// the export subcommand; the returned function runs those formats with export's shared MODEL,
// --adapter and --out, and --dtype ("" when it was not given).
using ExportMergedFn = std::function<int(const std::string& format, const std::string& model, const std::string& adapter,
                                         const std::string& out, const std::string& dtype)>;
ExportMergedFn add_export_merged_options(CLI::App& export_command);

// The options qlora bench model and qlora bench train share (--seq, --batch, --no-4bit, --device,
// --seed), added to the bench subcommand once by add_bench_model_options.
struct BenchRunOptions {
  int64_t seq = 2048;
  int64_t batch = 1;
  bool no_4bit = false;
  std::string device = "cuda";
  uint64_t seed = 0;
};

// qlora bench model (bench_model.cpp): adds MODEL_DIR and the options of `run` to the bench
// subcommand; the returned function runs it with bench's shared --dtype, --iters (0 when not
// given) and --json values.
using BenchModelFn = std::function<int(const std::string& dtype, int iters, const std::string& json_path)>;
BenchModelFn add_bench_model_options(CLI::App& bench, std::shared_ptr<BenchRunOptions> run);

// qlora bench train (bench_train.cpp): adds --shape, --rank, --steps, --warmup, --peak-tflops and
// --no-profile; the returned function runs it with `run` and bench's --dtype and --json values.
using BenchTrainFn = std::function<int(const std::string& dtype, const std::string& json_path)>;
BenchTrainFn add_bench_train_options(CLI::App& bench, std::shared_ptr<const BenchRunOptions> run);

// qlora bench flce (bench_flce.cpp) with bench's --cases ("" = all), --iters (0 when not given)
// and --json values.
int bench_flce(const std::string& cases, int iters, const std::string& json_path);

// qlora bench fused (bench_fused.cpp): the fused RMSNorm / SwiGLU / RoPE kernels next to the ATen
// ops; --cases "" = all on CUDA, small on the CPU; iters 0 = default.
int bench_fused(const std::string& cases, int iters, const std::string& json_path);

// qlora bench ce (bench_ce.cpp): the in-place cross-entropy chunk kernels; iters 0 = default.
int bench_ce(int iters, const std::string& json_path);

// qlora bench tokenizer (bench_tokenizer.cpp): adds --tokenizer, --text, --threads; the returned
// function runs it with bench's --iters (0 when not given) and --json values.
using BenchTokenizerFn = std::function<int(int iters, const std::string& json_path)>;
BenchTokenizerFn add_bench_tokenizer_options(CLI::App& bench);

// Parses argv, runs the chosen subcommand, maps errors to exit statuses (error.h).
int run(int argc, char** argv);

}  // namespace qlora::cli
