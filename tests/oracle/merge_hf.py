#!/usr/bin/env python3
"""Oracle: `qlora merge` against Hugging Face transformers + PEFT (+ bitsandbytes for the NF4 base).

transformers writes tiny random fp32 checkpoints (a Llama, and a Qwen2 with q/k/v biases); PEFT makes
a random adapter for each (A and B both random, so the adapter matters) and saves it. Then, per model:
  (1) `qlora merge BASE --adapter A --out M16 --dtype fp32 --base-16bit`: transformers' logits on M16
      vs PEFT's logits of base + adapter (relative error <= 1e-5), and every merged tensor vs PEFT's
      merge_and_unload() weights (relative error <= 1e-6; reported: how many are bit-identical);
  (2) `qlora merge BASE --adapter A --out MNF4 --dtype fp32` (the default: the adapter was trained
      against the NF4-dequantized base): the reference replaces every linear weight of the base by
      bitsandbytes' own dequantize_4bit of the NF4 that training's load_in_4bit makes (taken from
      `qlora quantize BASE`, loaded with QuantState.from_dict; reported: how many of its nibbles differ
      from bnb's own quantize_4bit), adds the adapter with PEFT; transformers on MNF4 must give its
      logits (relative error <= 1e-5). bnb 0.50's CPU path blocks each row separately when the row
      length is not a multiple of 64 (down_proj [64, 160] here), which is not bnb's CUDA layout nor
      ours (blocks of 64 over the flattened weight): both bnb calls get the flat weight;
  (3) the default bf16 output loads in transformers as bf16 and its fp32-upcast logits stay within
      2e-2 relative of (2) (bf16 rounding of the weights only).
Relative error = ||ours - ref|| / ||ref|| in fp64.

Usage: .venv/bin/python tests/oracle/merge_hf.py --qlora build/qlora [--keep DIR]
Exit 0: pass, 1: fail, 77: skipped (transformers, peft or bitsandbytes missing).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

try:
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    import peft
    from peft import LoraConfig, PeftModel, get_peft_model
    import bitsandbytes.functional as bnbF
    import safetensors.torch as st
except ImportError as e:
    print(f"SKIP: {e} (scripts/setup installs transformers, peft and bitsandbytes into .venv)")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle_common import LINEAR, check, failures  # noqa: E402

transformers.utils.logging.disable_progress_bar()
TF_MAJOR = int(transformers.__version__.split(".")[0])
TOL_LOGITS, TOL_WEIGHT, TOL_BF16 = 1e-5, 1e-6, 2e-2


def rope_kwargs(theta):
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}} if TF_MAJOR >= 5 else {"rope_theta": theta}


def specs():
    common = dict(num_hidden_layers=2, rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False)
    return {
        "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                                num_key_value_heads=2, **rope_kwargs(10000.0), **common)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(vocab_size=151, hidden_size=96, intermediate_size=200, num_attention_heads=3,
                                                num_key_value_heads=1, **rope_kwargs(1e6), **common)),
    }


def load(mdir, dtype=torch.float32):
    kw = {"dtype": dtype} if TF_MAJOR >= 5 else {"torch_dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(mdir, attn_implementation="eager", **kw).eval()


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bnb_dequantized(qdir, name):
    """bitsandbytes' dequantize_4bit of the bnb-4bit entries of `name` in the checkpoint `qdir`."""
    e = st.load_file(os.path.join(qdir, "model.safetensors"))
    qs = bnbF.QuantState.from_dict({k[len(name) + 1:]: v for k, v in e.items() if k.startswith(name + ".")},
                                   device=torch.device("cpu"))
    shape = qs.shape
    qs.shape = torch.Size([shape.numel()])  # flat: bnb's CPU path would block rows of 160 separately
    return bnbF.dequantize_4bit(e[name], qs).to(torch.float32).reshape(shape), e[name]


def bnb_quantize_flat(w):
    """bnb's own packed nibbles for w, blocks of 64 over the flattened weight (its CUDA layout)."""
    packed, _ = bnbF.quantize_4bit(w.detach().reshape(-1).contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return packed.reshape(-1)


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print("command failed:", " ".join(cmd), "\n", r.stdout[-2000:], r.stderr[-2000:])
    return r.returncode == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qlora", default="build/qlora")
    ap.add_argument("--keep", default=None, help="keep the models, adapters and merged folders here")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}")
    root = a.keep or tempfile.mkdtemp(prefix="qlora_merge_oracle_")
    os.makedirs(root, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    for i, (name, (cls, cfg)) in enumerate(specs().items()):
        base, adapter = os.path.join(root, name), os.path.join(root, name + "_adapter")
        torch.manual_seed(100 + i)
        cls(cfg).save_pretrained(base, safe_serialization=True)
        pm = get_peft_model(load(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "lora_B" in n else p.shape[1] ** -0.5))
        pm.save_pretrained(adapter)
        ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=g)

        with torch.no_grad():
            # (1) 16-bit base
            ref_model = PeftModel.from_pretrained(load(base), adapter).eval()
            ref16 = ref_model(input_ids=ids).logits.float()
            base_logits = load(base)(input_ids=ids).logits.float()
            merged_ref = ref_model.merge_and_unload().state_dict()
            m16 = os.path.join(root, name + "_m16")
            if not run([a.qlora, "merge", base, "--adapter", adapter, "--out", m16, "--dtype", "fp32", "--base-16bit"]):
                check(False, f"{name}: qlora merge --base-16bit failed")
                continue
            ours16 = load(m16)
            e1 = rel(ours16(input_ids=ids).logits.float(), ref16)
            worst, identical, total = 0.0, 0, 0
            for n, t in ours16.state_dict().items():
                if n not in merged_ref:
                    continue
                total += 1
                identical += int(torch.equal(t, merged_ref[n]))
                worst = max(worst, rel(t, merged_ref[n]))
            print(f"{name}: (1) --base-16bit: logits rel {e1:.2e} (adapter moves them {rel(base_logits, ref16):.2e}); "
                  f"weights vs PEFT merge_and_unload: worst rel {worst:.2e}, {identical}/{total} bit-identical")
            check(e1 <= TOL_LOGITS, f"{name}: --base-16bit logits rel {e1:.2e} > {TOL_LOGITS}")
            check(worst <= TOL_WEIGHT, f"{name}: merged weight rel {worst:.2e} > {TOL_WEIGHT}")
            check(rel(base_logits, ref16) > 1e-3, f"{name}: the adapter does not move the logits")

            # (2) NF4-dequantized base, as training saw it
            qdir = os.path.join(root, name + "_bnb")
            if not run([a.qlora, "quantize", base, qdir]):
                check(False, f"{name}: qlora quantize failed")
                continue
            deq = load(base)
            nibbles, differing = 0, 0
            for n, mod in deq.named_modules():
                if any(n.endswith(x) for x in LINEAR):
                    w, packed = bnb_dequantized(qdir, n + ".weight")
                    theirs = bnb_quantize_flat(mod.weight)
                    nibbles += 2 * packed.numel()
                    differing += int(((packed.reshape(-1) >> 4) != (theirs >> 4)).sum() + ((packed.reshape(-1) & 15) != (theirs & 15)).sum())
                    mod.weight.copy_(w)
            print(f"{name}: NF4 of the base: {differing}/{nibbles} nibbles differ from bnb's CPU quantize_4bit (informational)")
            ref_nf4 = PeftModel.from_pretrained(deq, adapter).eval()(input_ids=ids).logits.float()
            mnf4 = os.path.join(root, name + "_mnf4")
            if not run([a.qlora, "merge", base, "--adapter", adapter, "--out", mnf4, "--dtype", "fp32"]):
                check(False, f"{name}: qlora merge failed")
                continue
            got_nf4 = load(mnf4)(input_ids=ids).logits.float()
            e2 = rel(got_nf4, ref_nf4)
            print(f"{name}: (2) NF4 base: logits rel {e2:.2e} (NF4 vs 16-bit base moves them {rel(ref_nf4, ref16):.2e})")
            check(e2 <= TOL_LOGITS, f"{name}: NF4-base logits rel {e2:.2e} > {TOL_LOGITS}")

            # (3) default bf16 output
            mbf = os.path.join(root, name + "_mbf16")
            if not run([a.qlora, "merge", base, "--adapter", adapter, "--out", mbf]):
                check(False, f"{name}: qlora merge (bf16) failed")
                continue
            mb = load(mbf, torch.bfloat16)
            check(next(mb.parameters()).dtype == torch.bfloat16, f"{name}: bf16 output did not load as bf16")
            e3 = rel(load(mbf)(input_ids=ids).logits.float(), ref_nf4)
            print(f"{name}: (3) bf16 output: logits rel {e3:.2e} vs (2)")
            check(e3 <= TOL_BF16, f"{name}: bf16 logits rel {e3:.2e} > {TOL_BF16}")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    print("PASS" if not failures else f"FAIL ({len(failures)})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
