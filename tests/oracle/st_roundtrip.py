#!/usr/bin/env python3
"""Oracle (CPU): our safetensors reader/writer and `qlora quantize` against the reference
`safetensors` package.

1. Python writes a tiny Llama checkpoint (single file and sharded, bf16 and fp16) plus extra
   tensors of every dtype, with safetensors.torch.save_file -> our reader must accept it
   (`qlora quantize` reads every tensor).
2. Our writer's output loads with safetensors.torch.load_file: every kept tensor equals the input
   bit for bit (so every dtype goes Python -> C++ -> Python), and re-serializing the loaded
   tensors with safetensors.torch.save gives our file byte for byte (same order, same padding).
3. The bnb-4bit entries have bitsandbytes' names, dtypes, shapes and quant_state JSON, and
   dequantizing them with bitsandbytes' formula (written here in plain torch) stays within the
   NF4 error bound of the original weight.

Usage: PYTHONPATH=<dir with safetensors> .venv/bin/python tests/oracle/st_roundtrip.py [--qlora build-b/qlora]
(`pip install --target <dir> safetensors` gives such a dir). Exit 0: pass, 1: fail, 77: skipped.
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
except ImportError:
    print("SKIP: the safetensors package is not importable (pip install --target DIR safetensors; PYTHONPATH=DIR)")
    sys.exit(77)

from oracle_common import LINEAR, NF4, check, failures  # noqa: E402 (after the package check)


def make_checkpoint(d, dtype, sharded):
    g = torch.Generator().manual_seed(0)
    H, I, V = 64, 96, 100
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        for m, s in zip(LINEAR, [(H, H), (32, H), (32, H), (H, H), (I, H), (I, H), (H, I)]):
            shapes[p + m + ".weight"] = s
    t = {k: (torch.randn(s, generator=g) * 0.05).to(dtype) for k, s in shapes.items()}
    # Every dtype, kept as is by quantize: Python -> our reader -> our writer -> Python.
    extra = {"extra.f64": torch.randn(3, generator=g, dtype=torch.float64), "extra.f32": torch.randn(5, generator=g),
             "extra.f16": torch.randn(7, generator=g).half(), "extra.bf16": torch.randn(2, 3, generator=g).bfloat16(),
             "extra.i64": torch.arange(-3, 4, dtype=torch.int64), "extra.i32": torch.arange(5, dtype=torch.int32),
             "extra.i16": torch.arange(-2, 2, dtype=torch.int16), "extra.i8": torch.arange(-5, 5, dtype=torch.int8),
             "extra.u8": torch.arange(250, 256, dtype=torch.uint8), "extra.bool": torch.tensor([True, False, True]),
             "extra.f8e4m3": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
             "extra.f8e5m2": torch.randn(4, generator=g).to(torch.float8_e5m2),
             "extra.scalar": torch.tensor(2.5), "extra.empty": torch.zeros(0, 3)}
    for name, dt in [("extra.u16", "uint16"), ("extra.u32", "uint32"), ("extra.u64", "uint64")]:
        if hasattr(torch, dt):
            extra[name] = torch.arange(4, dtype=torch.int64).to(getattr(torch, dt))
    t.update(extra)
    os.makedirs(d)
    if sharded:
        names = sorted(t)
        parts = [names[: len(names) // 2], names[len(names) // 2:]]
        wm = {}
        for i, part in enumerate(parts):
            fn = f"model-{i + 1:05d}-of-00002.safetensors"
            st.save_file({k: t[k] for k in part}, os.path.join(d, fn), metadata={"format": "pt"})
            wm.update({k: fn for k in part})
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
    else:
        st.save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    cfg = {"model_type": "llama", "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V, "rms_norm_eps": 1e-5,
           "torch_dtype": str(dtype).replace("torch.", ""), "architectures": ["LlamaForCausalLM"]}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return t


def dequant_bnb(e, w):
    """bitsandbytes' dequantize_4bit arithmetic in plain torch (fp32 steps, then the weight dtype)."""
    qs = json.loads(bytes(e[w + ".quant_state.bitsandbytes__nf4"].tolist()).decode("utf-8"))
    n = 1
    for s in qs["shape"]:
        n *= s
    packed = e[w].reshape(-1)
    q = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()
    if "nested_absmax" in [k[len(w) + 1:] for k in e if k.startswith(w + ".")]:
        code2 = e[w + ".nested_quant_map"]
        a2 = e[w + ".nested_absmax"]
        codes = e[w + ".absmax"].long()
        b = torch.arange(codes.numel())
        absmax = (code2[codes] * a2[b // qs["nested_blocksize"]]) + torch.tensor(qs["nested_offset"], dtype=torch.float32)
    else:
        absmax = e[w + ".absmax"]
    blk = torch.arange(n) // qs["blocksize"]
    return (NF4[q] * absmax[blk]).to(getattr(torch, qs["dtype"])).reshape(qs["shape"]), qs


def run_case(qlora, tmp, dtype, sharded, double_quant):
    tag = f"{dtype} sharded={sharded} double_quant={double_quant}"
    print("case:", tag)
    src = os.path.join(tmp, f"in_{len(os.listdir(tmp))}")
    out = src + "_out"
    t = make_checkpoint(src, dtype, sharded)
    cmd = [qlora, "quantize", src, out] + ([] if double_quant else ["--no-double-quant"])
    r = subprocess.run(cmd, capture_output=True, text=True)
    check(r.returncode == 0, f"{tag}: qlora quantize exit {r.returncode}: {r.stdout}{r.stderr}")
    if r.returncode != 0:
        return
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    e = {}
    for f in files:
        path = os.path.join(out, f)
        loaded = st.load_file(path)
        e.update(loaded)
        with open(path, "rb") as fh:
            ours = fh.read()
        check(st.save(loaded, metadata={"format": "pt"}) == ours, f"{tag}: {f} differs from safetensors.torch.save of the same tensors")
    for k, v in t.items():
        lin = any(k.endswith(m + ".weight") for m in LINEAR) and ".layers." in k
        if not lin:
            check(k in e and e[k].dtype == v.dtype and e[k].shape == v.shape and
                  (v.numel() == 0 or torch.equal(e[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))), f"{tag}: kept tensor {k} changed")
            continue
        n = v.numel()
        check(e[k].dtype == torch.uint8 and tuple(e[k].shape) == ((n + 1) // 2, 1), f"{tag}: {k} packed shape {tuple(e[k].shape)}")
        check(e[k + ".quant_map"].dtype == torch.float32 and torch.equal(e[k + ".quant_map"], NF4), f"{tag}: {k}.quant_map")
        check(e[k + ".absmax"].dtype == (torch.uint8 if double_quant else torch.float32), f"{tag}: {k}.absmax dtype")
        deq, qs = dequant_bnb(e, k)
        check(list(qs) == ["quant_type", "blocksize", "dtype", "shape"] +
              (["nested_blocksize", "nested_dtype", "nested_offset"] if double_quant else []), f"{tag}: {k} quant_state keys {list(qs)}")
        check(qs["quant_type"] == "nf4" and qs["blocksize"] == 64 and qs["shape"] == list(v.shape) and
              qs["dtype"] == str(dtype).replace("torch.", ""), f"{tag}: {k} quant_state {qs}")
        x = v.float().reshape(-1)
        am = x.reshape(-1, 64).abs().amax(dim=1).repeat_interleave(64)
        err = (deq.float().reshape(-1) - x).abs()
        # half the largest NF4 code gap (0.1385) times absmax, plus the 8-bit absmax code error
        check(bool((err <= 0.145 * am + 0.02 * am + 1e-3).all()), f"{tag}: {k} dequant error {float((err / am).max())} of absmax")
    cfg = json.load(open(os.path.join(out, "config.json")))
    q = cfg.get("quantization_config", {})
    check(q.get("quant_method") == "bitsandbytes" and q.get("load_in_4bit") is True and q.get("bnb_4bit_quant_type") == "nf4"
          and q.get("bnb_4bit_use_double_quant") is double_quant and q.get("bnb_4bit_compute_dtype") == str(dtype).replace("torch.", "")
          and q.get("bnb_4bit_quant_storage") == "uint8", f"{tag}: quantization_config {q}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlora", default=os.environ.get("QLORA_BINARY", "build/qlora"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qlora_st_oracle_") as tmp:
        run_case(a.qlora, tmp, torch.bfloat16, False, True)
        run_case(a.qlora, tmp, torch.float16, True, False)
        run_case(a.qlora, tmp, torch.bfloat16, True, True)
    print("FAILED:", len(failures)) if failures else print("st_roundtrip: all checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
