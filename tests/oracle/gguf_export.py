#!/usr/bin/env python3
"""Oracle: `qlora export --format gguf` read by llama.cpp's `gguf` package (gguf-py) and by transformers.

A tiny random Llama (transformers, fp32; some up_proj rows hand-set to edge cases: an all-zero block,
round-half ties, a negative maximum, tiny and large values) with a byte-level BPE tokenizer trained by
the `tokenizers` package (vocab below the model's, so ids are padded), exported by the real binary:
  (1) no adapter, --type f32: gguf.GGUFReader reads every key the converter writes; every tensor equals
      the HF weight exactly (q/k rows permuted as convert_hf_to_gguf.py's LlamaModel.permute does, in
      numpy here); norms in f32; no output.weight only when tied; tokens = the vocab by id + [PAD<id>],
      merges = tokenizer.json's, token types, bos/eos ids;
  (2) --type f16, bf16, q8_0, q4_0: every 2-D tensor's bytes equal gguf.quants.quantize(<the f32 file's
      tensor>, type) bit for bit (the quantizers' oracle, on ~1000 blocks including the edge cases);
      1-D tensors stay f32;
  (3) with a PEFT adapter and --base-16bit: the f32 file's tensors equal PEFT's merge_and_unload()
      weights (relative error <= 1e-6), and transformers' own GGUF loader (from_pretrained(gguf_file=))
      gives the logits of PEFT's base + adapter (relative error <= 1e-5).

Usage: .venv/bin/python tests/oracle/gguf_export.py --qlora build/qlora [--keep DIR]
Exit 0: pass, 1: fail, 77: skipped (gguf, transformers, peft or tokenizers missing).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

try:
    import numpy as np
    import torch
    import gguf
    from gguf import GGMLQuantizationType as Q
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, PeftModel, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
except ImportError as e:
    print(f"SKIP: {e} (scripts/setup installs gguf, transformers, peft and tokenizers into .venv)")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle_common import check, failures  # noqa: E402

transformers.utils.logging.disable_progress_bar()
TF_MAJOR = int(transformers.__version__.split(".")[0])
TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
HEADS, KV_HEADS, VOCAB = 4, 2, 320


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf):
    m = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in m:
        return m[hf]
    layer, rest = hf[len("model.layers."):].split(".", 1)
    mod, suffix = rest.rsplit(".", 1)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    return f"blk.{layer}.{names[mod]}.{suffix}"


def expected_gguf(state):
    out = {}
    for n, t in state.items():
        w = t.detach().float().numpy()
        if "q_proj" in n:
            w = permute(w, HEADS)
        elif "k_proj" in n:
            w = permute(w, KV_HEADS)
        out[gguf_name(n)] = w
    return out


def read(path):
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    return r, tensors


def as_float(t):
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)


def make_model(root):
    base = os.path.join(root, "base")
    kw = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}} if TF_MAJOR >= 5 else {"rope_theta": 10000.0}
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, num_hidden_layers=2, rms_norm_eps=1e-5, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **kw)
    torch.manual_seed(3)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn(p.shape))
        w = m.model.layers[0].mlp.up_proj.weight  # [96, 64]: rows of two 32-blocks
        w[0, :32] = 0                                                   # an all-zero block
        w[1, :32] = torch.tensor([127.0, 0.5, -0.5, 2.5, -63.5] + [1.5] * 27)  # q8_0: d = 1, ties at .5
        w[2, :32] = torch.tensor([-8.0, 8.0, 7.0, 0.4, -0.6] + [-7.5] * 27)    # q4_0: negative max, clip to 15
        w[3, :32] = 1e-30                                               # d underflows fp16
        w[4, :32] = torch.linspace(-3e4, 3e4, 32)                       # large values
    m.save_pretrained(base, safe_serialization=True)
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello llama", "abc abc abd 123 4567"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(base, "tokenizer.json"))
    with open(os.path.join(base, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "chat_template": "{{ messages }}"}, f)
    return base, m, tok


def export(qlora, base, out, typ, extra=()):
    cmd = [qlora, "export", "--format", "gguf", base, "--out", out, "--type", typ, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print("command failed:", " ".join(cmd), "\n", r.stdout[-2000:], r.stderr[-2000:])
    return r.returncode == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qlora", default="build/qlora")
    ap.add_argument("--keep", default=None)
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print(f"gguf-py (gguf package), transformers {transformers.__version__}, torch {torch.__version__}")
    root = a.keep or tempfile.mkdtemp(prefix="qlora_gguf_export_oracle_")
    os.makedirs(root, exist_ok=True)
    base, model, tok = make_model(root)
    want = expected_gguf(model.state_dict())

    # (1) f32, no adapter
    f32 = os.path.join(root, "f32.gguf")
    if not export(a.qlora, base, f32, "f32"):
        check(False, "export f32 failed")
        sys.exit(1)
    r, ts = read(f32)
    keys = ["general.architecture", "general.name", "general.file_type", "general.quantization_version", "llama.context_length",
            "llama.embedding_length", "llama.block_count", "llama.feed_forward_length", "llama.rope.dimension_count",
            "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon",
            "llama.rope.freq_base", "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]
    for k in keys:
        check(k in r.fields, f"(1) key {k} missing")
    f = lambda k: r.fields[k].contents()  # noqa: E731
    check(f("general.architecture") == "llama" and f("general.file_type") == 0 and f("general.quantization_version") == 2,
          "(1) general.* values")
    check(f("llama.block_count") == 2 and f("llama.embedding_length") == 64 and f("llama.feed_forward_length") == 96
          and f("llama.attention.head_count") == HEADS and f("llama.attention.head_count_kv") == KV_HEADS
          and f("llama.rope.dimension_count") == 16 and f("llama.vocab_size") == VOCAB and f("llama.context_length") == 128,
          "(1) llama.* values")
    check(abs(f("llama.attention.layer_norm_rms_epsilon") - 1e-5) < 1e-9 and f("llama.rope.freq_base") == 10000.0, "(1) eps/theta")
    check(set(ts) == set(want), f"(1) tensor names differ: {sorted(set(ts) ^ set(want))}")
    exact = sum(int(np.array_equal(as_float(ts[n]), w)) for n, w in want.items() if n in ts)
    print(f"(1) f32: {exact}/{len(want)} tensors equal the HF weights exactly; {len(r.fields)} keys")
    check(exact == len(want), "(1) f32 tensors differ from the HF weights")
    for n, t in ts.items():
        if len(t.shape) == 1:
            check(t.tensor_type == Q.F32, f"(1) {n} is not f32")
    vocab = {i: s for s, i in json.load(open(os.path.join(base, "tokenizer.json")))["model"]["vocab"].items()}
    tokens = f("tokenizer.ggml.tokens")
    check(len(tokens) == VOCAB, f"(1) {len(tokens)} tokens, expected {VOCAB}")
    check(all(tokens[i] == vocab.get(i, f"[PAD{i}]") for i in range(VOCAB)), "(1) tokens differ from the vocab")
    types = f("tokenizer.ggml.token_type")
    check(types[tok.token_to_id("<|endoftext|>")] == 3 and types[VOCAB - 1] == 5 and types[1] == 1, "(1) token types")
    merges = json.load(open(os.path.join(base, "tokenizer.json")))["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    check(f("tokenizer.ggml.merges") == merges, "(1) merges differ from tokenizer.json's")
    check(f("tokenizer.ggml.bos_token_id") == tok.token_to_id("<|endoftext|>"), "(1) bos id")
    check(f("tokenizer.ggml.pre") == "gpt-2", f"(1) pre {f('tokenizer.ggml.pre')}")
    f32_tensors = {n: as_float(t) for n, t in ts.items()}

    # (2) the quantized types against gguf.quants.quantize of the f32 file's tensors
    for name, q in TYPES.items():
        if name == "f32":
            continue
        path = os.path.join(root, name + ".gguf")
        if not export(a.qlora, base, path, name):
            check(False, f"(2) export {name} failed")
            continue
        rq, tq = read(path)
        blocks, bad = 0, []
        for n, t in tq.items():
            ref = f32_tensors[n]
            if ref.ndim == 1:
                check(t.tensor_type == Q.F32 and np.array_equal(as_float(t), ref), f"(2) {name}: {n} not f32 as is")
                continue
            check(t.tensor_type == q, f"(2) {name}: {n} has type {t.tensor_type.name}")
            mine = np.asarray(t.data).view(np.uint8).reshape(-1)
            theirs = gguf.quants.quantize(ref.astype(np.float32), q).view(np.uint8).reshape(-1)
            blocks += ref.size // (32 if q in (Q.Q8_0, Q.Q4_0) else 1)
            if not np.array_equal(mine, theirs):
                bad.append(n)
        print(f"(2) {name}: {len(tq)} tensors, {blocks} blocks/elements; bytes differing from gguf.quants.quantize: {bad or 'none'}")
        check(not bad, f"(2) {name}: {bad}")
        check(rq.fields["general.file_type"].contents() == {"f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[name], f"(2) {name} file_type")

    # (3) with a PEFT adapter, 16-bit base
    torch.manual_seed(9)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                                task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = os.path.join(root, "adapter")
    pm.save_pretrained(adapter)
    ids = torch.randint(0, 300, (2, 9), generator=g)
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        ref_logits = peft_model(input_ids=ids).logits.float()
        merged = expected_gguf(peft_model.merge_and_unload().state_dict())
    mf32 = os.path.join(root, "merged_f32.gguf")
    if export(a.qlora, base, mf32, "f32", ["--adapter", adapter, "--base-16bit"]):
        _, tm = read(mf32)
        worst = max(rel(as_float(tm[n]), w) for n, w in merged.items())
        print(f"(3) merged f32 tensors vs PEFT merge_and_unload: worst rel {worst:.2e}")
        check(worst <= 1e-6, f"(3) merged tensors rel {worst:.2e} > 1e-6")
        try:
            kw = {"dtype": torch.float32} if TF_MAJOR >= 5 else {"torch_dtype": torch.float32}
            hf = AutoModelForCausalLM.from_pretrained(root, gguf_file="merged_f32.gguf", **kw).eval()
            with torch.no_grad():
                e = rel(hf(input_ids=ids).logits.float().numpy(), ref_logits.numpy())
            print(f"(3) transformers' GGUF loader on our file: logits rel {e:.2e} vs PEFT base + adapter")
            check(e <= 1e-5, f"(3) transformers GGUF logits rel {e:.2e} > 1e-5")
        except ImportError as ex:  # transformers' GGUF loader needs packages we may lack: not our file's fault
            print(f"(3) transformers' GGUF loader unavailable: {ex}")
        except Exception as ex:
            check(False, f"(3) transformers could not load our GGUF: {type(ex).__name__}: {str(ex)[:300]}")
    else:
        check(False, "(3) export with adapter failed")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    print("PASS" if not failures else f"FAIL ({len(failures)})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
