#!/usr/bin/env python3
"""Oracle (CPU): bnb-4bit checkpoint entries and `qlora quantize` against real bitsandbytes.

A. bitsandbytes -> qlora: bitsandbytes quantizes random fp16/bf16/fp32 weights (odd sizes, nested
   and not) and its QuantState.as_dict(packed=True) entries are saved; our reader
   (read_bnb4bit_weight, through the hidden Catch test "[.bnb_oracle]") must accept every one, and
   our dequantize must equal bitsandbytes.functional.dequantize_4bit bit for bit.
B. qlora -> bitsandbytes: `qlora quantize` output is loaded with QuantState.from_dict and
   dequantized by bitsandbytes; compared with bitsandbytes' own quantize of the same weights:
   packed bytes, absmax codes, the quant_state JSON bytes, and the dequantized output.

Usage: PYTHONPATH=<dir with bitsandbytes, packaging, safetensors> .venv/bin/python \
         tests/oracle/quantize_bnb.py --qlora build-b/qlora --tests build-b/qlora_tests
Exit 0: pass, 1: fail, 77: skipped (a package is missing).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

try:
    import safetensors.torch as st
    import bitsandbytes.functional as F
    from bitsandbytes.functional import QuantState
except ImportError as e:
    print(f"SKIP: {e} (pip install --target DIR bitsandbytes packaging safetensors; PYTHONPATH=DIR)")
    sys.exit(77)

from oracle_common import LINEAR, check, failures  # noqa: E402 (after the package check)


def part_a(tests_bin, tmp):
    g = torch.Generator().manual_seed(1)
    entries, ref = {}, {}
    i = 0
    for shape in [(1, 1), (3, 21), (8, 64), (5, 13), (1, 64 * 256 + 1), (1, 64 * 256 * 3 + 17), (96, 64)]:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for nested in (True, False):
                w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
                q, s = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
                name = f"w{i}.weight"
                entries[name] = q.clone()
                for k, v in s.as_dict(packed=True).items():
                    entries[f"{name}.{k}"] = v.clone()  # safetensors refuses shared storage (bnb caches quant_map)
                ref[name] = F.dequantize_4bit(q, s).clone()
                i += 1
    st.save_file(entries, os.path.join(tmp, "bnb.safetensors"), metadata={"format": "pt"})
    st.save_file(ref, os.path.join(tmp, "ref.safetensors"), metadata={"format": "pt"})
    r = subprocess.run([tests_bin, "[.bnb_oracle]"], env={**os.environ, "QLORA_BNB_ORACLE_DIR": tmp}, capture_output=True, text=True)
    print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "")
    check(r.returncode == 0, f"A: bnb-written entries through our reader: {r.stdout[-3000:]}{r.stderr[-2000:]}")
    for line in r.stdout.splitlines():
        if line.startswith("bnb oracle:"):
            print(line)
    print(f"A: {i} bitsandbytes-quantized weights written for our reader")


def make_checkpoint(d, dtype):
    g = torch.Generator().manual_seed(2)
    H, I, V = 64, 96, 100
    t = {"model.embed_tokens.weight": torch.randn(V, H, generator=g).to(dtype), "model.norm.weight": torch.ones(H, dtype=dtype),
         "lm_head.weight": torch.randn(V, H, generator=g).to(dtype)}
    for layer in range(2):
        for m, s in zip(LINEAR, [(H, H), (32, H), (32, H), (H, H), (I, H), (I, H), (H, I)]):
            t[f"model.layers.{layer}.{m}.weight"] = (torch.randn(s, generator=g) * 0.05).to(dtype)
    os.makedirs(d)
    st.save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V,
                   "torch_dtype": str(dtype).replace("torch.", "")}, f)
    return t


def part_b(qlora, tmp, dtype, nested):
    tag = f"B {dtype} nested={nested}"
    src = os.path.join(tmp, f"ck_{len(os.listdir(tmp))}")
    out = src + "_out"
    t = make_checkpoint(src, dtype)
    r = subprocess.run([qlora, "quantize", src, out] + ([] if nested else ["--no-double-quant"]), capture_output=True, text=True)
    check(r.returncode == 0, f"{tag}: qlora quantize: {r.stdout}{r.stderr}")
    if r.returncode:
        return
    e = st.load_file(os.path.join(out, "model.safetensors"))
    n_el = n_packed_diff = n_code_diff = n_out_diff = n_json_diff = 0
    for k, w in t.items():
        if not any(k.endswith(m + ".weight") for m in LINEAR):
            continue
        qs_dict = {kk[len(k) + 1:]: v for kk, v in e.items() if kk.startswith(k + ".")}
        qs = QuantState.from_dict(qs_dict, device=torch.device("cpu"))  # bnb's own loader must accept ours
        ours_out = F.dequantize_4bit(e[k], qs)
        q, s = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        theirs_out = F.dequantize_4bit(q, s)
        n_el += w.numel()
        check(e[k].shape == q.shape and e[k].dtype == q.dtype, f"{tag}: {k} packed {tuple(e[k].shape)} vs bnb {tuple(q.shape)}")
        n_packed_diff += int((e[k] != q).sum())
        n_code_diff += int((e[k + ".absmax"] != s.absmax).sum())
        n_out_diff += int((ours_out.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32) !=
                           theirs_out.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32)).sum())
        ours_json = bytes(e[k + ".quant_state.bitsandbytes__nf4"].tolist())
        theirs_json = bytes(s.as_dict(packed=True)["quant_state.bitsandbytes__nf4"].tolist())
        if ours_json != theirs_json:
            n_json_diff += 1
            print(f"  {k}: quant_state differs:\n    ours   {ours_json}\n    theirs {theirs_json}")
        if nested:
            check(torch.equal(e[k + ".nested_quant_map"], s.state2.code), f"{tag}: {k} nested_quant_map differs from bnb's code")
    print(f"{tag}: {n_el} elements; packed bytes differing {n_packed_diff}, absmax codes differing {n_code_diff}, "
          f"dequantized outputs differing {n_out_diff}, quant_state JSON differing {n_json_diff}/14")
    check(n_out_diff <= max(1, n_el // 10**5) and n_json_diff == 0, f"{tag}: differences beyond the documented bound")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlora", default=os.environ.get("QLORA_BINARY", "build/qlora"))
    ap.add_argument("--tests", default="build/qlora_tests")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qlora_bnb_oracle_") as tmp:
        part_a(a.tests, tmp)
        for dtype in (torch.bfloat16, torch.float16):
            for nested in (True, False):
                part_b(a.qlora, tmp, dtype, nested)
    print(f"FAILED: {len(failures)}") if failures else print("quantize_bnb: all checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
