#!/usr/bin/env python3
"""Oracle (CPU): `qlora generate` (KV-cache greedy decoding) and `qlora eval` against transformers.

Tiny random checkpoints written by transformers (fp32, save_pretrained), weights re-drawn so that
the next-token distributions are peaked (a greedy near-tie would make the comparison meaningless):
  llama    Llama, GQA 4:2, vocab 120
  mistral  Mistral, GQA 4:1, sliding_window 6 (shorter than prompt + generation: the window is used)
  odd      Llama, hidden 96, 3 heads, 1 KV head, vocab 97
and, with peft installed, `llama` plus a PEFT adapter (A and B random, made by get_peft_model).
Cases:
  greedy  our binary `qlora generate DIR --prompt-ids ... --temperature 0 --max-new-tokens 24 --json`
          against model.generate(do_sample=False) (transformers' own DynamicCache decoding): the
          token lists must be equal.
  eval    `qlora eval DIR --data ids.jsonl --type input_ids --json` (three documents) against
          transformers' loss (labels = input_ids) over the same documents, summed by target count:
          <= 1e-5 relative.
With --gguf (SmolLM2-135M-Instruct.Q4_1.gguf, skipped when absent): transformers loads the GGUF
(gguf_file=, dequantized to fp32) and its tokenizer; `qlora generate GGUF --chat --prompt ...
--json` must render the same prompt ids as tokenizer.apply_chat_template(add_generation_prompt)
and generate the same greedy tokens; `qlora eval GGUF --data text.txt --seq 64` equals
transformers' loss over the same 64-token chunks.

Usage: .venv/bin/python tests/oracle/generate_hf.py --qlora build/qlora [--gguf PATH] [--keep DIR]
Exit 0: pass, 1: fail, 77: skipped (torch, transformers or safetensors missing).
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
except ImportError as e:
    print(f"SKIP: {e} (scripts/setup installs transformers into .venv)")
    sys.exit(77)
try:
    import peft
    from peft import LoraConfig, get_peft_model
except ImportError:
    peft = None

transformers.utils.logging.disable_progress_bar()
TF_MAJOR = int(transformers.__version__.split(".")[0])
NEW_TOKENS = 24
TOL_LOSS = 1e-5
DOCS = [9, 31, 17]  # eval documents (token counts)
CHAT_PROMPT = "What is the capital of France?"
TEXT = ("The Project Gutenberg eBook of the King James Bible. In the beginning God created the heaven and the "
        "earth. And the earth was without form, and void; and darkness was upon the face of the deep. And the "
        "Spirit of God moved upon the face of the waters. And God said, Let there be light: and there was light. "
        "And God saw the light, that it was good: and God divided the light from the darkness.\n")

failures = []


def check(cond, what):
    print(("ok:   " if cond else "FAIL: ") + what)
    if not cond:
        failures.append(what)


def rope_kwargs(theta):
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}} if TF_MAJOR >= 5 else {"rope_theta": theta}


def model_specs():
    common = dict(num_hidden_layers=2, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return {
        "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                                num_key_value_heads=2, **rope_kwargs(10000.0), **common)),
        "mistral": (MistralForCausalLM, MistralConfig(vocab_size=110, hidden_size=64, intermediate_size=96,
                                                      num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                                      sliding_window=6, **rope_kwargs(1e6), **common)),
        "odd": (LlamaForCausalLM, LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=200, num_attention_heads=3,
                                              num_key_value_heads=1, **rope_kwargs(10000.0), **common)),
    }


def make_model(cls, cfg, seed):
    torch.manual_seed(seed)
    m = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "q_proj" in name or "k_proj" in name:  # sharp attention: a wrong mask or position shows
                p.copy_(2 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lm_head" in name:  # peaked next-token distributions: no greedy near-ties
                p.copy_(4 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return m


def load_hf(path, **kw):
    kw.update({"dtype": torch.float32} if TF_MAJOR >= 5 else {"torch_dtype": torch.float32})
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kw).eval()


def run_json(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-2000:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {r.returncode}")
    line = next(l for l in r.stdout.splitlines() if l.startswith("{"))
    return json.loads(line), r.stderr


def hf_greedy(model, ids, max_new, eos=None):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, num_beams=1,
                             eos_token_id=eos, pad_token_id=eos[0] if eos else 0, temperature=None, top_p=None,
                             top_k=None)
    return out[0, len(ids):].tolist()


def hf_doc_loss(model, docs):
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            x = torch.tensor([ids])
            loss = model(input_ids=x, labels=x).loss.double().item()
            total += loss * (len(ids) - 1)
            count += len(ids) - 1
    return total / count, count


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def tiny_cases(qlora, root):
    g = torch.Generator().manual_seed(5)
    specs = model_specs()
    models = []
    for i, (name, (cls, cfg)) in enumerate(specs.items()):
        d = os.path.join(root, name)
        m = make_model(cls, cfg, 100 + i)
        m.save_pretrained(d, safe_serialization=True)
        models.append((name, d, None, load_hf(d)))
    if peft is not None:
        d = os.path.join(root, "llama")
        torch.manual_seed(7)
        pm = get_peft_model(load_hf(d), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_B" in n else p.shape[1] ** -0.5))
        adir = os.path.join(root, "llama_adapter")
        pm.save_pretrained(adir)
        models.append(("llama+peft", d, adir, pm.eval()))
    else:
        print("note: peft missing, the adapter case is skipped")

    for name, d, adapter, ref in models:
        vocab = ref.config.vocab_size
        adapter_args = ["--adapter", adapter] if adapter else []
        for p_len in (1, 7):
            prompt = torch.randint(0, vocab, (p_len,), generator=g).tolist()
            ours, log = run_json([qlora, "generate", d, *adapter_args, "--prompt-ids", ",".join(map(str, prompt)),
                                  "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", "--json"])
            want = hf_greedy(ref, prompt, NEW_TOKENS)
            same = ours["tokens"] == want
            check(same, f"{name}: greedy {NEW_TOKENS} tokens after a {p_len}-token prompt equal transformers.generate"
                        + ("" if same else f" (ours {ours['tokens']}, transformers {want})"))
        docs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in DOCS]
        data = os.path.join(root, f"{name.replace('+', '_')}_docs.jsonl")
        with open(data, "w") as f:
            for ids in docs:
                f.write(json.dumps({"input_ids": ids}) + "\n")
        ours, _ = run_json([qlora, "eval", d, *adapter_args, "--data", data, "--type", "input_ids", "--seq", "64",
                            "--device", "cpu", "--json"])
        want, count = hf_doc_loss(ref, docs)
        r = rel(ours["loss"], want)
        check(ours["target_tokens"] == count and r <= TOL_LOSS,
              f"{name}: eval loss {ours['loss']:.9f} vs transformers {want:.9f} (rel {r:.2e}, {ours['target_tokens']} "
              f"targets, want {count})")


def gguf_cases(qlora, gguf_path, root):
    try:
        import gguf  # noqa: F401  (transformers needs it for gguf_file=)
        from transformers import AutoTokenizer
    except ImportError as e:
        print(f"note: GGUF cases skipped ({e})")
        return
    d, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    ref = load_hf(d, gguf_file=name)
    t0 = time.time()
    ours, log = run_json([qlora, "generate", gguf_path, "--chat", "--prompt", CHAT_PROMPT, "--temperature", "0",
                          "--max-new-tokens", "32", "--device", "cpu", "--json"])
    t1 = time.time()
    prompt = tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    check(ours["prompt"] == list(prompt), f"SmolLM2 GGUF: chat prompt ids equal apply_chat_template's ({len(prompt)} tokens)")
    eos = sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id} - {None})
    want = hf_greedy(ref, list(prompt), 32, eos=eos)
    same = ours["tokens"] == want
    check(same, f"SmolLM2 GGUF: greedy answer tokens equal transformers.generate ({len(want)} tokens)"
                + ("" if same else f" (ours {ours['tokens']}, transformers {want})"))
    print(f"  answer: {ours['text']!r} ({ours['decode_tokens_per_s']:.1f} decode tok/s; run {t1 - t0:.1f} s)")

    text = os.path.join(root, "text.txt")
    with open(text, "w") as f:
        f.write(TEXT)
    ours, _ = run_json([qlora, "eval", gguf_path, "--data", text, "--seq", "64", "--device", "cpu", "--json"])
    ids = tok(TEXT)["input_ids"]
    chunks = [ids[i:i + 64] for i in range(0, len(ids), 64)]
    chunks = [c for c in chunks if len(c) >= 2]
    want, count = hf_doc_loss(ref, chunks)
    r = rel(ours["loss"], want)
    check(ours["target_tokens"] == count and r <= TOL_LOSS,
          f"SmolLM2 GGUF: eval loss of a text in 64-token chunks {ours['loss']:.7f} vs transformers {want:.7f} "
          f"(rel {r:.2e}, {ours['target_tokens']} targets, want {count})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qlora", default="build/qlora", help="the qlora binary")
    ap.add_argument("--gguf", default="", help="SmolLM2-135M-Instruct.Q4_1.gguf (skipped when absent)")
    ap.add_argument("--keep", default=None, help="keep the checkpoints and data in this directory")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, peft {peft.__version__ if peft else 'missing'}")
    root = a.keep or tempfile.mkdtemp(prefix="qlora_generate_oracle_")
    os.makedirs(root, exist_ok=True)
    try:
        tiny_cases(a.qlora, root)
        if a.gguf and os.path.isfile(a.gguf):
            gguf_cases(a.qlora, a.gguf, root)
        else:
            print(f"note: no GGUF at {a.gguf!r}: the SmolLM2 cases are skipped")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("PASS" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
