#!/usr/bin/env python3
"""AOTInductor round trip of an NF4 model (issue 9, item 3): torch.export + AOTInductor in Python,
the .pt2 run by the qlora binary in C++ (`qlora aoti-run`: AOTIModelPackageLoader with our ops
registered), logits equal to eager.

1. A tiny Llama (hidden 64, 4 heads / 2 KV heads of 16, intermediate 96, 2 layers, vocab 128, rope
   theta 1e4) written here in plain PyTorch, with NF4 projections (torch.ops.qlora.nf4_quantize,
   blocksize 64, double quantization) and a random LoRA (r 4, scale 2) on each. Two variants:
     merged       (the issue's case) W' = dequant(W) + scale * B @ A in fp32, re-quantized with
                  nf4_quantize; the forward dequantizes each weight with torch.ops.qlora.nf4_dequantize
                  and multiplies (14 nf4_dequantize nodes in the exported graph);
     lora_linear  the NF4 base and the live LoRA through torch.ops.qlora.nf4_lora_linear (the op
                  the training forward uses; 14 nodes).
2. torch.export.export with a dynamic sequence length (Dim 2..512), then
   torch._inductor.aoti_compile_and_package -> .pt2 (wall time printed).
3. For T = 16 and T = 37 (one package, two shapes): the input ids go to a safetensors file,
   `qlora aoti-run X.pt2 --inputs in.safetensors --out out.safetensors` runs it in C++, and its
   output0 must equal the eager logits: max |C++ - eager| / max |eager| <= 1e-5 (fp32 on CPU; 1e-4
   on CUDA, where inductor's kernels and GEMM choices differ more from eager). Logits here reach ~5,
   and inductor's fused reductions (RMSNorm means, softmax) round differently from eager's: the
   absolute difference measured 6e-6 .. 2.2e-5, i.e. <= 5e-6 relative. torch._inductor.aoti_load_package
   runs the same package in Python, in a child process, as a second check (same tolerance); the C++
   and Python runs of the package must agree to 1e-6 absolute (measured: bit-identical on CPU). On
   CUDA with torch 2.11 that Python loader segfaults before running anything (seen on an H200; the
   C++ loader runs the same package): reported as KNOWN, not as a failure.

PyTorch 2.11 bug (pytorch/pytorch#169157, fixed by #173562 after 2.11): AOTInductor's proxy
executor, which runs custom ops such as qlora::nf4_dequantize, casts a serialized ScalarType
argument (torch._export.serde numbering: FLOAT = 7) straight to c10::ScalarType (7 = Double), so
nf4_dequantize(..., dtype=float32) receives float64 and refuses it, in Python and C++ alike. With torch <= 2.11 the script rewrites the ScalarType
arguments of the package's extern-kernel JSON into c10 numbering (the fix's mapping, for
half/float/bfloat16) before running it, and says so. nf4_lora_linear has no ScalarType argument.

    python tests/compile/aoti_roundtrip.py --qlora build/qlora --lib build/libqlora_ops.so [--device cuda]
Exit status: 0 pass, 1 fail, 77 skipped (no C++ compiler for AOTInductor, or --device cuda without
a GPU).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

try:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file
except ImportError as e:
    print(f"SKIP: {e}")
    sys.exit(77)

VOCAB, HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 128, 64, 4, 2, 96, 2
HEAD_DIM = HIDDEN // HEADS
THETA, EPS, BLOCKSIZE, LORA_R, LORA_SCALE = 10000.0, 1e-5, 64, 4, 2.0
PROJ = {"q_proj": (HEADS * HEAD_DIM, HIDDEN), "k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "o_proj": (HIDDEN, HEADS * HEAD_DIM),
        "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
SEQ_LENS = [16, 37]
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def nf4(w):
    return torch.ops.qlora.nf4_quantize(w.float().contiguous(), BLOCKSIZE, True)


def dequant(q, shape):
    return torch.ops.qlora.nf4_dequantize(*q, BLOCKSIZE, list(shape), torch.float32)


class NF4Llama(torch.nn.Module):
    """Llama forward on NF4 projections: `merged` (LoRA merged into the NF4 weight, each weight
    dequantized by qlora.nf4_dequantize) or `lora_linear` (NF4 base + live LoRA, qlora.nf4_lora_linear)."""

    PIECES = ("packed", "absmax", "absmax2", "code2", "offset")

    def __init__(self, g, variant):
        super().__init__()
        self.variant = variant
        self.register_buffer("embed", torch.randn(VOCAB, HIDDEN, generator=g))
        self.register_buffer("norm", 1 + 0.2 * torch.randn(HIDDEN, generator=g))
        self.register_buffer("lm_head", torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN ** 0.5)
        self.register_buffer("inv_freq", 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
        for l in range(LAYERS):
            self.register_buffer(f"l{l}_ln1", 1 + 0.2 * torch.randn(HIDDEN, generator=g))
            self.register_buffer(f"l{l}_ln2", 1 + 0.2 * torch.randn(HIDDEN, generator=g))
            for p, (out_f, in_f) in PROJ.items():
                w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
                a = torch.randn(LORA_R, in_f, generator=g) / in_f ** 0.5
                b = 0.5 * torch.randn(out_f, LORA_R, generator=g)
                base = nf4(w)
                if variant == "merged":
                    stored = nf4(dequant(base, w.shape) + LORA_SCALE * (b @ a))  # merged in fp32, re-quantized
                else:
                    stored = base
                    self.register_buffer(f"l{l}_{p}_lora_a", a)
                    self.register_buffer(f"l{l}_{p}_lora_b", b)
                for name, t in zip(self.PIECES, stored):
                    self.register_buffer(f"l{l}_{p}_{name}", t)

    def proj(self, x, l, p):
        q = [getattr(self, f"l{l}_{p}_{n}") for n in self.PIECES]
        if self.variant == "merged":
            return x @ dequant(q, PROJ[p]).t()
        return torch.ops.qlora.nf4_lora_linear(x, *q, BLOCKSIZE, list(PROJ[p]), None, getattr(self, f"l{l}_{p}_lora_a"),
                                               getattr(self, f"l{l}_{p}_lora_b"), LORA_SCALE)

    @staticmethod
    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))

    @staticmethod
    def rotate(x, cos, sin):
        x1, x2 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
        return x * cos + torch.cat((-x2, x1), -1) * sin

    def forward(self, input_ids):
        B, T = input_ids.shape
        h = F.embedding(input_ids, self.embed)
        pos = torch.arange(T, device=input_ids.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        for l in range(LAYERS):
            x = self.rms(h, getattr(self, f"l{l}_ln1"))
            q = self.proj(x, l, "q_proj").view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
            k = self.proj(x, l, "k_proj").view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
            v = self.proj(x, l, "v_proj").view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
            # GQA inside SDPA: repeating k/v of the transposed layout (repeat_interleave, or
            # expand + reshape as transformers' repeat_kv) makes torch.export add a guard on seq that
            # it cannot prove (Min(16 T, 32 T) == 16 T) and refuse the dynamic dimension.
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            o = o.transpose(1, 2).reshape(B, T, HIDDEN)
            h = h + self.proj(o, l, "o_proj")
            y = self.rms(h, getattr(self, f"l{l}_ln2"))
            h = h + self.proj(F.silu(self.proj(y, l, "gate_proj")) * self.proj(y, l, "up_proj"), l, "down_proj")
        return self.rms(h, self.norm) @ self.lm_head.t()


# torch 2.11's Python loader of CUDA packages segfaults on the GPU box (see run_variant).
TORCH_CUDA_LOAD_CRASH = torch.__version__.startswith("2.11.")
# pytorch/pytorch#169157 is fixed after 2.11 (#173562).
TORCH_SCALAR_TYPE_BUG = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) <= (2, 11)

# torch._export.serde.schema.ScalarType -> c10::ScalarType for the dtypes our ops take.
SERDE_TO_C10_SCALAR_TYPE = {6: 5, 7: 6, 13: 15}  # HALF -> Half, FLOAT -> Float, BFLOAT16 -> BFloat16


def rewrite_scalar_types(src, dst):
    """Copy of the package with the extern kernels' ScalarType arguments in c10 numbering (the
    workaround for pytorch/pytorch#169157, see the header). Returns how many were rewritten."""
    n = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith(".json"):
                j = json.loads(data)
                for node in j.get("nodes", []) if isinstance(j, dict) else []:
                    for arg in node.get("node", {}).get("inputs", []):
                        if "as_scalar_type" in arg.get("arg", {}):
                            arg["arg"]["as_scalar_type"] = SERDE_TO_C10_SCALAR_TYPE[arg["arg"]["as_scalar_type"]]
                            n += 1
                data = json.dumps(j).encode()
            zout.writestr(info, data)
    return n


def run_variant(variant, a, d, dev, tol):
    print(f"--- {variant}", flush=True)
    vd = os.path.join(d, variant)
    os.makedirs(vd, exist_ok=True)
    model = NF4Llama(torch.Generator().manual_seed(0), variant).to(dev).eval()
    gen = torch.Generator().manual_seed(1)
    ids = {T: torch.randint(0, VOCAB, (1, T), generator=gen).to(dev) for T in SEQ_LENS}
    with torch.no_grad():
        eager = {T: model(ids[T]) for T in SEQ_LENS}

    t0 = time.perf_counter()
    # Dim.AUTO, not a named Dim with a range: on CUDA the memory-efficient SDPA kernel's fake
    # implementation guards on stride expressions of the sequence length (min(16 s, 32 s) == 16 s),
    # which a named Dim reports as a constraint violation although they hold for every s >= 1. The
    # two lengths run below (16 and 37) show the package stayed dynamic.
    ep = torch.export.export(model, (ids[SEQ_LENS[0]],), dynamic_shapes={"input_ids": {1: torch.export.Dim.AUTO}})
    t_export = time.perf_counter() - t0
    op = torch.ops.qlora.nf4_dequantize.default if variant == "merged" else torch.ops.qlora.nf4_lora_linear.default
    n_ops = sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target is op)
    check(n_ops == LAYERS * len(PROJ), f"{variant}: exported graph has {n_ops} {op} nodes "
                                       f"(expected {LAYERS * len(PROJ)}); torch.export {t_export:.1f} s")
    package = os.path.join(vd, "model.pt2")
    t0 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(ep, package_path=package)
    t_compile = time.perf_counter() - t0
    check(os.path.isfile(package), f"{variant}: aoti_compile_and_package -> {package} "
                                   f"({os.path.getsize(package) / 2**20:.1f} MiB) in {t_compile:.1f} s wall")
    with zipfile.ZipFile(package) as z:
        name = op.name().split(".")[0]  # "qlora::nf4_dequantize"
        calls = sum(z.read(f).count(name.encode()) for f in z.namelist() if f.endswith(".json"))
    check(calls == LAYERS * len(PROJ), f"{variant}: the package runs {calls} {name} calls through the proxy executor")

    # PyTorch 2.11 bug (see the header): the proxy executor reads serialized ScalarType arguments
    # in the wrong numbering. Rewritten up front by version rather than detected by a failing
    # Python run, which on CUDA cannot be made (the Python loader crashes there, see below).
    if TORCH_SCALAR_TYPE_BUG:
        patched = os.path.join(vd, "model.c10_dtypes.pt2")
        n = rewrite_scalar_types(package, patched)
        if n:
            print(f"note {variant}: torch {torch.__version__} has pytorch/pytorch#169157; {n} ScalarType arguments "
                  f"rewritten into c10 numbering -> {patched}", flush=True)
            package = patched

    for T in SEQ_LENS:
        inp, out = os.path.join(vd, f"in{T}.safetensors"), os.path.join(vd, f"out{T}.safetensors")
        save_file({"input0": ids[T].cpu().contiguous()}, inp, metadata={"inputs": "input0"})
        save_file({"logits": eager[T].cpu().contiguous()}, os.path.join(vd, f"eager{T}.safetensors"))
        t0 = time.perf_counter()
        r = subprocess.run([a.qlora, "aoti-run", package, "--inputs", inp, "--out", out], capture_output=True, text=True)
        t_run = time.perf_counter() - t0
        check(r.returncode == 0, f"{variant} T={T}: qlora aoti-run exit status {r.returncode} "
                                 f"({t_run:.2f} s with process start)")
        if r.returncode != 0:
            print(r.stdout + r.stderr)
            continue
        cpp = load_file(out)["output0"]
        ref = eager[T].cpu()
        check(cpp.shape == ref.shape and cpp.dtype == torch.float32,
              f"{variant} T={T}: C++ logits {tuple(cpp.shape)} {cpp.dtype}")
        scale = ref.abs().max().item()
        diff = (cpp - ref).abs().max().item()
        check(diff <= tol * scale, f"{variant} T={T}: max |C++ AOTI - eager| = {diff:.3g}, relative to max |eager| "
                                   f"{scale:.3g}: {diff / scale:.3g} (tolerance {tol:g})")
        # The same package through torch._inductor.aoti_load_package, in a child process (a crash
        # there must not hide the C++ result above).
        py_out = os.path.join(vd, f"py{T}.safetensors")
        rp = subprocess.run([sys.executable, __file__, "--python-run", package, "--lib", a.lib, "--inputs", inp,
                             "--out", py_out, "--qlora", a.qlora], capture_output=True, text=True)
        if rp.returncode < 0 and dev.type == "cuda" and TORCH_CUDA_LOAD_CRASH:
            # Seen on the H200 box (torch 2.11.0+cu130): the child dies with SIGSEGV inside
            # torch.export.pt2_archive._package._load_aoti, before running anything, for both
            # variants; the same package runs in C++ (checked above). A cross-check we cannot make
            # there, said so on every run rather than counted as our failure.
            print(f"KNOWN {variant} T={T}: Python aoti_load_package died with signal {-rp.returncode} loading the "
                  f"CUDA package (torch {torch.__version__}); the C++ run above is the round trip", flush=True)
            continue
        check(rp.returncode == 0, f"{variant} T={T}: Python aoti_load_package run exit status {rp.returncode}")
        if rp.returncode != 0:
            print((rp.stdout + rp.stderr)[-2000:])
            continue
        py = load_file(py_out)["output0"]
        diff_py = (py - ref).abs().max().item()
        check(diff_py <= tol * scale, f"{variant} T={T}: max |Python AOTI - eager| = {diff_py:.3g}, relative "
                                      f"{diff_py / scale:.3g} (tolerance {tol:g})")
        diff_cp = (py - cpp).abs().max().item()
        check(diff_cp <= 1e-6, f"{variant} T={T}: max |C++ AOTI - Python AOTI| = {diff_cp:.3g} (tolerance 1e-6)")
    return t_compile


def python_run(package, lib, inputs, out):
    """--python-run: the package run by torch._inductor.aoti_load_package on the inputs file."""
    torch.ops.load_library(lib)
    runner = torch._inductor.aoti_load_package(package)
    meta = runner.get_metadata() if hasattr(runner, "get_metadata") else {}
    dev = torch.device(meta.get("AOTI_DEVICE_KEY", "cpu"))
    with torch.no_grad():
        y = runner(load_file(inputs)["input0"].to(dev))
    save_file({"output0": y.cpu().contiguous()}, out)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python-run", metavar="PACKAGE", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--qlora", required=True, help="the qlora binary")
    ap.add_argument("--lib", required=True, help="libqlora_ops.so")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--variants", default="merged,lora_linear", help="comma-separated: merged, lora_linear")
    ap.add_argument("--keep", help="keep the packages and the tensors in this directory")
    a = ap.parse_args()
    if a.python_run:
        return python_run(a.python_run, a.lib, a.inputs, a.out)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: --device cuda but torch sees no GPU")
        return 77
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        cxx = get_cpp_compiler()
    except Exception as e:  # AOTInductor compiles the generated C++ with the host compiler
        print(f"SKIP: AOTInductor needs a C++ compiler (g++ or clang++, or $CXX) and none was found: {e}")
        return 77
    if shutil.which(cxx) is None and not os.path.isfile(cxx):
        print(f"SKIP: AOTInductor needs a C++ compiler; '{cxx}' is not on PATH")
        return 77
    torch.ops.load_library(a.lib)
    tol = 1e-5 if a.device == "cpu" else 1e-4

    tmp = tempfile.TemporaryDirectory(prefix="qlora_aoti_")
    d = a.keep or tmp.name
    os.makedirs(d, exist_ok=True)
    times = {v: run_variant(v, a, d, torch.device(a.device), tol) for v in a.variants.split(",")}
    walls = ", ".join(f"{v} {t:.1f} s" for v, t in times.items())
    print(f"{len(failures)} failure(s)" if failures else
          f"AOTInductor round trip: all checks passed (aoti_compile_and_package wall: {walls})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
