// qlora quantize IN_DIR OUT_DIR: a 16-bit Hugging Face checkpoint -> a bitsandbytes 4-bit (NF4)
// checkpoint that transformers loads as is. The work is quantize_checkpoint (src/io/).
#include "cli/commands.h"
#include "qlora/bnb4bit.h"
#include "qlora/error.h"

namespace qlora::cli {

CommandFn add_quantize_command(CLI::App& app) {
  struct State {
    std::string in_dir, out_dir;
    int64_t blocksize = 64;
    bool no_double_quant = false;
    bool force = false;
  };
  auto st = std::make_shared<State>();
  auto* sub = app.add_subcommand("quantize", "turn a 16-bit HF checkpoint into a bnb-4bit (NF4) one");
  sub->add_option("in_dir", st->in_dir, "16-bit Hugging Face model directory (config.json + safetensors)")->required();
  sub->add_option("out_dir", st->out_dir, "output directory (must be empty or absent unless --force)")->required();
  sub->add_option("--blocksize", st->blocksize, "NF4 block size: a power of two in 32..4096")->capture_default_str();
  sub->add_flag("--no-double-quant", st->no_double_quant, "keep absmax in fp32 (bnb_4bit_use_double_quant=false)");
  sub->add_flag("--force", st->force, "write into a non-empty OUT_DIR (files of the same name are replaced)");
  return [st] {
    QuantizeOptions opt;
    opt.blocksize = st->blocksize;
    opt.double_quant = !st->no_double_quant;
    opt.force = st->force;
    quantize_checkpoint(st->in_dir, st->out_dir, opt);
    return kExitOk;
  };
}

}  // namespace qlora::cli
