// qlora aoti-run PACKAGE.pt2 --inputs IN.safetensors --out OUT.safetensors: runs an AOTInductor
// package (torch._inductor.aoti_compile_and_package) with torch::inductor::AOTIModelPackageLoader
// inside the qlora binary, where the qlora ops are registered (it links qlora_ops), so a package
// whose graph calls qlora::nf4_dequantize & co. runs with no Python. For the compile round trip of
// issue 9 (tests/compile/aoti_roundtrip.py); hidden from `qlora --help`.
// Input order: the comma-separated names of the file's "inputs" metadata entry when present; else
// input0, input1, ... when every name has that form; else the file's order. Inputs go to the
// package's device. Outputs are written (on the CPU) as output0, output1, ...
#include <ATen/ATen.h>
#include <dlfcn.h>
#include <link.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "cli/commands.h"
#include "qlora/error.h"
#include "qlora/log.h"
#include "qlora/safetensors.h"

namespace qlora::cli {

namespace {

namespace fs = std::filesystem;

std::vector<std::string> input_order(const SafetensorsFile& f) {
  std::vector<std::string> names;
  if (auto it = f.metadata().find("inputs"); it != f.metadata().end()) {
    std::stringstream ss(it->second);
    for (std::string n; std::getline(ss, n, ',');)
      if (!n.empty()) {
        if (!f.contains(n))
          throw UserError(f.path().string() + ": metadata \"inputs\" names '" + n + "', which the file does not hold");
        names.push_back(n);
      }
    return names;
  }
  names = f.names();
  auto index = [](const std::string& n) -> int64_t {
    if (n.size() < 6 || n.compare(0, 5, "input") != 0 || n.find_first_not_of("0123456789", 5) != std::string::npos)
      return -1;
    return std::stoll(n.substr(5));
  };
  if (std::all_of(names.begin(), names.end(), [&](const std::string& n) { return index(n) >= 0; }))
    std::sort(names.begin(), names.end(), [&](const std::string& a, const std::string& b) { return index(a) < index(b); });
  return names;
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// The model .so of a package names libtorch.so (torch's shim over libtorch_cpu / libtorch_cuda) as a
// dependency, which we do not link (cmake/torch.cmake says why) and which is not on the loader's
// path. Load it from the directory of the libtorch_cpu.so this process runs with, RTLD_LOCAL: the
// model's dependency then resolves to it by soname, and none of its symbols enter the global scope.
void preload_libtorch_shim() {
  std::string dir;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        const std::string name = info->dlpi_name ? info->dlpi_name : "";
        const std::string lib = "/libtorch_cpu.so";
        if (name.size() > lib.size() && name.compare(name.size() - lib.size(), lib.size(), lib) == 0) {
          *static_cast<std::string*>(data) = name.substr(0, name.size() - lib.size());
          return 1;
        }
        return 0;
      },
      &dir);
  if (dir.empty()) return;
  const std::string shim = dir + "/libtorch.so";
  std::error_code ec;
  if (fs::exists(shim, ec) && dlopen(shim.c_str(), RTLD_NOW | RTLD_LOCAL) == nullptr)
    log_warn(cat("aoti-run: could not preload ", shim, ": ", dlerror()));
}

}  // namespace

CommandFn add_aoti_run_command(CLI::App& app) {
  struct State {
    std::string package;
    std::string inputs;
    std::string out;
    std::string model_name = "model";
  };
  auto st = std::make_shared<State>();
  auto* sub = app.add_subcommand("aoti-run", "run an AOTInductor .pt2 package on safetensors inputs (compile round-trip test)");
  sub->group("");  // hidden: a test tool, not a user command
  sub->add_option("package", st->package, "the .pt2 file from torch._inductor.aoti_compile_and_package")->required();
  sub->add_option("--inputs", st->inputs, "safetensors file with the inputs")->required();
  sub->add_option("--out", st->out, "safetensors file to write the outputs to (output0, output1, ...)")->required();
  sub->add_option("--model-name", st->model_name, "model name inside the package")->capture_default_str();
  return [st] {
    if (!fs::is_regular_file(st->package)) throw UserError("qlora aoti-run: package '" + st->package + "' is not a file");
    const SafetensorsFile in(st->inputs);
    const std::vector<std::string> names = input_order(in);

    const auto t0 = std::chrono::steady_clock::now();
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
    preload_libtorch_shim();
    try {
      loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(st->package, st->model_name);
    } catch (const c10::Error& e) {
      throw UserError("qlora aoti-run: cannot load the AOTInductor package '" + st->package +
                      "': " + first_line(e.what_without_backtrace()));
    }
    const auto meta = loader->get_metadata();
    const auto dev_it = meta.find("AOTI_DEVICE_KEY");
    const at::Device device(dev_it != meta.end() ? dev_it->second : std::string("cpu"));
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    std::vector<at::Tensor> inputs;
    for (const std::string& n : names) inputs.push_back(in.tensor(n).to(device));
    const auto t1 = std::chrono::steady_clock::now();
    const std::vector<at::Tensor> outputs = loader->run(inputs);
    const double run_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();

    NamedTensors named;
    for (size_t i = 0; i < outputs.size(); ++i) named.emplace_back("output" + std::to_string(i), outputs[i].cpu());
    save_safetensors(st->out, named);
    std::ostringstream shapes;
    for (size_t i = 0; i < outputs.size(); ++i) shapes << (i ? ", " : "") << outputs[i].sizes();
    log_info(cat("aoti-run: ", st->package, " on ", device.str(), " (loaded in ", load_s, " s, ran in ", run_s,
                 " s): ", names.size(), " inputs -> ", outputs.size(), " outputs [", shapes.str(), "] written to ",
                 st->out));
    return kExitOk;
  };
}

}  // namespace qlora::cli
