#!/usr/bin/env python3
"""`qlora export --format torchscript` round trip (issue 9, legacy format): the C++ tracer's module
loads in Python with torch.jit.load once libqlora_ops is loaded, and its logits equal the reference.

transformers writes a tiny random fp32 Llama checkpoint (hidden 64, 4 heads / 2 KV heads, 2 layers,
vocab 128) and PEFT a LoRA adapter for it (r 4 on all seven projections, random B). Cases, each
`qlora export --format torchscript MODEL --out X.pt --seq 12 [--nf4] [--adapter DIR]`, then
torch.jit.load(X.pt)(input_ids [1, 12]) against:
  16bit          transformers' logits of the checkpoint (fp32, eager attention)
  16bit+adapter  PEFT's logits of checkpoint + adapter
  nf4            transformers holding our NF4 weights dequantized (torch.ops.qlora.nf4_quantize with
                 blocksize 64 and double quantization, as qlora quantizes at load, then
                 nf4_dequantize); the module must hold qlora::nf4_lora_linear nodes
  nf4+adapter    PEFT on those dequantized weights
Tolerance: max |ours - ref| <= 1e-4 (fp32 logits of magnitude ~1..10; measured ~1e-6). Also: a
[1, 11] input is refused with the module's own message; `--format onnx` exits 2.

    python tests/compile/torchscript_load.py --qlora build/qlora --lib build/libqlora_ops.so
Exit status: 0 pass, 1 fail, 77 skipped (transformers / peft missing).
"""
import argparse
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

try:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    import peft
except ImportError as e:
    print(f"SKIP: {e} (scripts/setup installs transformers and peft into .venv)")
    sys.exit(77)

TOL = 1e-4
SEQ = 12
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def make_model(seed=3):
    tf_major = int(transformers.__version__.split(".")[0])
    rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}} if tf_major >= 5
            else {"rope_theta": 10000.0})
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, rms_norm_eps=1e-5, max_position_embeddings=256,
                      tie_word_embeddings=False, **rope)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # far from uniform attention, as tests/oracle/model_hf_parity.py
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return m


def nf4_roundtrip(w):
    """W as qlora holds it after quantizing at load: NF4, blocksize 64, double quantization."""
    packed, absmax, absmax2, code2, offset = torch.ops.qlora.nf4_quantize(w.float().contiguous(), 64, True)
    return torch.ops.qlora.nf4_dequantize(packed, absmax, absmax2, code2, offset, 64, list(w.shape), torch.float32)


def with_nf4_weights(model):
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in LINEAR:
                mod.weight.copy_(nf4_roundtrip(mod.weight))
    return model


def add_adapter(model, seed=11):
    lc = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LINEAR, bias="none",
                         task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, lc)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return pm.eval()


def export(qlora, model_dir, out, *extra):
    cmd = [qlora, "export", "--format", "torchscript", model_dir, "--out", out, "--seq", str(SEQ), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout + r.stderr)
    return r.returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qlora", required=True, help="the qlora binary")
    ap.add_argument("--lib", required=True, help="libqlora_ops.so")
    ap.add_argument("--keep", help="keep the files in this directory")
    a = ap.parse_args()
    torch.ops.load_library(a.lib)

    tmp = tempfile.TemporaryDirectory(prefix="qlora_ts_")
    d = a.keep or tmp.name
    os.makedirs(d, exist_ok=True)
    model_dir, adapter_dir = os.path.join(d, "model"), os.path.join(d, "adapter")
    base = make_model()
    base.save_pretrained(model_dir, safe_serialization=True)
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(5))

    with torch.no_grad():
        ref = {"16bit": base(ids).logits}
        pm = add_adapter(make_model())
        pm.save_pretrained(adapter_dir)
        ref["16bit+adapter"] = pm(ids).logits
        ref["nf4"] = with_nf4_weights(make_model())(ids).logits
        ref["nf4+adapter"] = add_adapter(with_nf4_weights(make_model()))(ids).logits

    cases = {"16bit": [], "16bit+adapter": ["--adapter", adapter_dir], "nf4": ["--nf4"],
             "nf4+adapter": ["--nf4", "--adapter", adapter_dir]}
    for name, extra in cases.items():
        out = os.path.join(d, name.replace("+", "_") + ".pt")
        rc = export(a.qlora, model_dir, out, *extra)
        check(rc == 0, f"{name}: qlora export exit status {rc}")
        if rc != 0:
            continue
        m = torch.jit.load(out)
        with torch.no_grad():
            got = m(ids)
        diff = (got - ref[name]).abs().max().item()
        check(got.shape == ref[name].shape and got.dtype == torch.float32,
              f"{name}: logits {tuple(got.shape)} {got.dtype}")
        check(diff <= TOL, f"{name}: max |torchscript - reference| = {diff:.3g} (tolerance {TOL:g}, "
                           f"max |ref| {ref[name].abs().max().item():.3g})")
        code = m.forward_traced.code
        if name.startswith("nf4"):
            n = code.count("ops.qlora.nf4_lora_linear")
            check(n == 14, f"{name}: {n} qlora.nf4_lora_linear calls in the module's code (expected 2 layers x 7)")
        if name == "16bit":
            try:
                m(ids[:, :-1])
                check(False, "a [1, 11] input is refused")
            except Exception as e:  # torch.jit.Error
                check("traced for input_ids of shape [1, 12]" in str(e), "a [1, 11] input is refused: " +
                      str(e).strip().splitlines()[-1][:120])
    r = subprocess.run([a.qlora, "export", "--format", "onnx", model_dir, "--out", os.path.join(d, "x.onnx")],
                       capture_output=True, text=True)
    check(r.returncode == 2 and "--format" in r.stdout + r.stderr, f"--format onnx: exit {r.returncode}")

    print(f"{len(failures)} failure(s)" if failures else "torchscript round trip: all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
