#!/usr/bin/env python3
"""Oracle: our LoRA adapters against Hugging Face PEFT (issue 7's acceptance: "HF PEFT loads our
adapter onto the HF tiny model and its logits equal ours within 1e-4 (16-bit base, fp32)").

transformers writes tiny random fp32 checkpoints; the hidden Catch test "[.peft_oracle]"
(tests/test_lora.cpp) loads each with qlora::load_llama (16-bit base, fp32 compute) and, per case:
  save  make_lora(seed) with B drawn N(0, 0.1^2) from its own seed (so the adapter matters),
        save_peft_adapter -> case/adapter; PEFT then loads that adapter
        (PeftModel.from_pretrained(..., is_trainable=True)) onto the transformers model
  load  PEFT makes the adapter (get_peft_model, A and B re-drawn at random) and saves it;
        qlora::load_peft_adapter reads it
and writes its fp32 logits, the loss (mean cross-entropy over non-ignored shifted labels, as
transformers' ForCausalLMLoss) and the LoRA gradients of that first step (dropout 0, training
mode). Here transformers + PEFT compute the same, and we compare (relative error = ||ours - ref|| /
||ref||, fp64): logits <= 1e-4, every LoRA gradient tensor <= 1e-4, loss <= 1e-5 abs. Also checked:
PEFT's loaded A/B equal the tensors in our file (nothing silently dropped: PEFT warns, not fails,
on missing keys), and reported (not gating): how far the adapter moves the logits from the base.

Usage: .venv/bin/python tests/oracle/peft_parity.py --tests build/qlora_tests [--keep DIR] [--out r.json]
Exit 0: pass, 1: fail, 77: skipped (transformers or peft missing).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch

try:
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, LlamaForCausalLM, Qwen2ForCausalLM
    import peft
    from peft import LoraConfig, PeftModel, get_peft_model
    import safetensors.torch as st
except ImportError as e:
    print(f"SKIP: {e} (scripts/setup installs transformers and peft into .venv)")
    sys.exit(77)

transformers.utils.logging.disable_progress_bar()

TF_MAJOR = int(transformers.__version__.split(".")[0])
TOL_LOGITS, TOL_GRAD, TOL_LOSS = 1e-4, 1e-4, 1e-5
B, T = 2, 13
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rope_kwargs(theta):
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}} if TF_MAJOR >= 5 else {"rope_theta": theta}


def model_specs():
    common = dict(num_hidden_layers=2, rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False)
    return {
        "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                                num_key_value_heads=2, **rope_kwargs(10000.0), **common)),
        "odd": (LlamaForCausalLM, LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=200, num_attention_heads=3,
                                              num_key_value_heads=1, **rope_kwargs(10000.0), **common)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(vocab_size=151, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                num_key_value_heads=2, **rope_kwargs(1e6), **common)),
    }


# (case, model, mode, r, alpha, use_rslora, target_modules)
CASES = [
    ("a_llama_all", "llama", "save", 8, 16, False, ALL),
    ("b_odd_rslora", "odd", "save", 3, 5.5, True, ["q_proj", "v_proj", "down_proj"]),
    ("c_qwen2_bias", "qwen2", "save", 4, 8, False, ["k_proj", "o_proj", "gate_proj", "up_proj"]),
    ("d_llama_peft_made", "llama", "load", 5, 10, False, "all-linear"),
]


def make_model(cls, cfg, seed):
    torch.manual_seed(seed)
    m = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return m


def load_hf(mdir):
    kw = {"dtype": torch.float32} if TF_MAJOR >= 5 else {"torch_dtype": torch.float32}
    return AutoModelForCausalLM.from_pretrained(mdir, attn_implementation="eager", **kw)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def peft_step(model, ids, labels):
    """logits, loss and the LoRA grads (PEFT's state-dict names) of one training-mode step."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, use_cache=False)
    out.loss.backward()
    grads = {n.replace(".default", ""): p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad and "lora_" in n}
    return out.logits.detach().float(), float(out.loss.detach()), grads


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tests", default="build/qlora_tests", help="the qlora_tests binary (hook [.peft_oracle])")
    ap.add_argument("--keep", default=None, help="keep the checkpoints, adapters and outputs in this directory")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    t0 = time.time()
    print(f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}")
    if a.keep and os.path.exists(a.keep) and os.listdir(a.keep):
        print(f"error: --keep {a.keep}: expected an empty or absent directory")
        sys.exit(1)
    root = a.keep or tempfile.mkdtemp(prefix="qlora_peft_oracle_")
    os.makedirs(root, exist_ok=True)
    models_dir, cases_dir = os.path.join(root, "models"), os.path.join(root, "cases")
    os.makedirs(models_dir)
    os.makedirs(cases_dir)

    specs = model_specs()
    mdirs = {}
    for i, (name, (cls, cfg)) in enumerate(specs.items()):
        mdirs[name] = os.path.join(models_dir, name)
        make_model(cls, cfg, 200 + i).save_pretrained(mdirs[name], safe_serialization=True)

    g = torch.Generator().manual_seed(17)
    inputs = {}
    for ci, (case, mname, mode, r, alpha, rslora, targets) in enumerate(CASES):
        d = os.path.join(cases_dir, case)
        os.makedirs(d)
        vocab = specs[mname][1].vocab_size
        ids = torch.randint(0, vocab, (B, T), generator=g)
        labels = ids.clone()
        labels[0, :4] = -100  # a prompt that is not trained on
        inputs[case] = (ids, labels)
        st.save_file({"input_ids": ids, "labels": labels}, os.path.join(d, "inputs.safetensors"))
        c = {"model": mdirs[mname], "mode": mode}
        if mode == "save":
            c.update(r=r, alpha=alpha, use_rslora=rslora, target_modules=targets, seed=1000 + ci, b_seed=2000 + ci, b_std=0.1)
        else:  # PEFT makes and saves the adapter, with A and B both random
            torch.manual_seed(3000 + ci)
            pm = get_peft_model(load_hf(mdirs[mname]), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=rslora,
                                                                  target_modules=targets, task_type="CAUSAL_LM"))
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "lora_B" in n else p.shape[1] ** -0.5))
            c["adapter"] = os.path.join(d, "peft_adapter")
            pm.save_pretrained(c["adapter"])
            del pm
        with open(os.path.join(d, "case.json"), "w") as f:
            json.dump(c, f)

    t1 = time.time()
    r = subprocess.run([a.tests, "[.peft_oracle]"], env={**os.environ, "QLORA_PEFT_ORACLE_DIR": cases_dir},
                       capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("peft oracle:"):
            print("  " + line)
    if r.returncode != 0 and "peft oracle:" not in r.stdout:
        print(r.stdout[-3000:], r.stderr[-2000:])
    print(f"our hook: {time.time() - t1:.1f} s (exit {r.returncode})\n")

    hdr = f"{'case':<20} {'mode':<5} {'logits rel':>10} {'loss diff':>10} {'grad rel max':>12} {'tensors':>7} {'adapter moves':>13}  pass"
    print(hdr)
    print("-" * len(hdr))
    results, n_fail = [], 0
    for case, mname, mode, *_ in CASES:
        d = os.path.join(cases_dir, case)
        res = {"case": case, "model": mname, "mode": mode}
        ours_p = os.path.join(d, "ours.safetensors")
        if not os.path.exists(ours_p):
            err = os.path.join(d, "error.txt")
            res.update(passed=False, error=open(err).read() if os.path.exists(err) else "no output")
            print(f"{case:<20} {mode:<5} error: {res['error'][:300]}")
            results.append(res)
            n_fail += 1
            continue
        ours = st.load_file(ours_p)
        adapter_dir = os.path.join(d, "adapter") if mode == "save" else json.load(open(os.path.join(d, "case.json")))["adapter"]
        ids, labels = inputs[case]
        base = load_hf(mdirs[mname])
        with torch.no_grad():
            base_logits = base(input_ids=ids, use_cache=False).logits.float()
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        # PEFT only warns about keys it did not use: check that what it holds is our file.
        file_t = st.load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
        held = {n.replace(".default", ""): p.detach() for n, p in model.named_parameters() if "lora_" in n}
        load_ok = set(held) == set(file_t) and all(torch.equal(held[k], file_t[k].float()) for k in file_t)
        logits, loss, grads = peft_step(model, ids, labels)
        lr = rel(ours["logits"], logits)
        ld = abs(float(ours["loss"][0]) - loss)
        grel = {k: rel(ours[k], v) for k, v in grads.items() if k in ours}
        missing = sorted(set(grads) - set(ours))
        gmax = max(grel.values()) if grel else float("nan")
        moves = rel(base_logits, logits)
        ok = load_ok and not missing and lr <= TOL_LOGITS and ld <= TOL_LOSS and gmax <= TOL_GRAD
        res.update(passed=ok, logits_rel=lr, loss_abs_diff=ld, loss=loss, grad_rel_max=gmax, grad_rel=grel,
                   adapter_moves_logits_rel=moves, peft_holds_our_tensors=load_ok, grads_missing=missing)
        results.append(res)
        n_fail += not ok
        print(f"{case:<20} {mode:<5} {lr:10.2e} {ld:10.2e} {gmax:12.2e} {len(grel):7d} {moves:13.2e}  {'ok' if ok else 'FAIL'}")
        if not load_ok:
            print("    PEFT's loaded LoRA tensors differ from the adapter file (names or values)")
        if missing:
            print(f"    no gradient from us for: {missing[:4]}")
        if not ok and grel:
            worst = sorted(grel.items(), key=lambda kv: -kv[1])[:3]
            print("    worst grads: " + ", ".join(f"{k.split('model.model.')[-1]} {v:.1e}" for k, v in worst))
    total = time.time() - t0
    if r.returncode != 0 and n_fail == 0:
        n_fail += 1
        print(f"hook failed without a failing case: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    print(f"\nRESULT: {'PASS' if n_fail == 0 else 'FAIL'}: {len(results) - n_fail} passed, {n_fail} failed "
          f"(tolerances: logits {TOL_LOGITS:.0e} rel, grads {TOL_GRAD:.0e} rel, loss {TOL_LOSS:.0e} abs; {total:.1f} s)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
                       "cases": results, "result": "PASS" if n_fail == 0 else "FAIL", "seconds": total}, f, indent=1)
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if n_fail == 0 else 1)


if __name__ == "__main__":
    main()
