#!/usr/bin/env python3
"""Writes a randomly initialized Llama checkpoint with Hugging Face transformers (test-time only).

  --shape llama3-8b   Llama-3-8B's shape (hidden 4096, intermediate 14336, 32 layers, 32 heads,
                      8 KV heads, vocab 128256, rope theta 500000 with llama3 scaling factor 8 /
                      low 1 / high 4 / original 8192, max_position 131072, untied, bf16): 8.03 B
                      parameters, 16 GB on disk in 5 GB shards. For `qlora bench model` and
                      `qlora inspect` on the GPU box (scripts/device-model), which has no network.
  --shape llama3.2-1b Llama-3.2-1B's shape (hidden 2048, 16 layers, tied embeddings): 1.24 B parameters.
  --shape tiny        the same architecture at toy size, for trying the commands on a laptop.

The weights are created directly in bf16 on the GPU (torch default dtype and device set before
the model is built, so there is never an fp32 copy and transformers' normal(0, 0.02) init runs
there: seconds for 8B), then written with save_pretrained as safetensors. Works with
transformers 4.x (rope_theta + rope_scaling) and 5.x (rope_parameters).
"""
import argparse
import inspect
import os
import shutil
import sys
import time

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                      original_max_position_embeddings=8192),
    # Llama-3.2-1B: 16 layers, hidden 2048, 32 heads / 8 KV heads, head_dim 64, tied embeddings.
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                        original_max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                 original_max_position_embeddings=64),
}


def parameter_count(s):
    """By hand, as `qlora inspect` counts: embeddings, per layer 7 projections + 2 norms, final norm, lm_head."""
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    hd = h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h
    return (1 if s.get("tie_word_embeddings") else 2) * v * h + s["num_hidden_layers"] * per_layer + h


def make_config(transformers, s):
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=s["original_max_position_embeddings"])
    common = {k: v for k, v in s.items() if k not in ("original_max_position_embeddings", "tie_word_embeddings")}
    common.update(rms_norm_eps=1e-5, tie_word_embeddings=bool(s.get("tie_word_embeddings")), bos_token_id=128000 if s["vocab_size"] > 128000 else 1,
                  eos_token_id=128001 if s["vocab_size"] > 128001 else 2, hidden_act="silu",
                  attention_bias=False, mlp_bias=False)
    if int(transformers.__version__.split(".")[0]) >= 5:  # v5: rope_theta lives inside rope_parameters
        return transformers.LlamaConfig(**common, rope_parameters=dict(rope, rope_theta=500000.0))
    return transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling=rope)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    ap.add_argument("--device", default=None, help="where to initialize (default: cuda when available, else cpu)")
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.time()
    import torch
    import transformers
    t_import = time.time() - t0
    s = SHAPES[args.shape]
    n = parameter_count(s)
    need = 2 * n
    parent = os.path.dirname(os.path.abspath(args.out)) or "."
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if os.path.isdir(args.out):
        free += sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"make_llama_checkpoint: {args.shape}, {n:,} parameters, {need / 1e9:.2f} GB bf16; "
          f"{free / 1e9:.1f} GB free under {parent}; transformers {transformers.__version__}, torch {torch.__version__}",
          flush=True)
    if free < need * 1.05 + (1 << 28):
        sys.exit(f"make_llama_checkpoint: not enough disk under {parent}: {need / 1e9:.2f} GB needed, "
                 f"{free / 1e9:.2f} GB free")
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    config = make_config(transformers, s)
    t1 = time.time()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(torch.bfloat16)  # no-op unless a buffer/param escaped the default dtype
    if device == "cuda":
        torch.cuda.synchronize()
    t_init = time.time() - t1
    got = sum(p.numel() for p in model.parameters())
    if got != n:
        sys.exit(f"make_llama_checkpoint: the model has {got:,} parameters, the hand count says {n:,}")

    t2 = time.time()
    kwargs = dict(max_shard_size=args.max_shard_size)
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:  # 4.x; 5.x always writes safetensors
        kwargs["safe_serialization"] = True
    model.save_pretrained(args.out, **kwargs)
    t_save = time.time() - t2
    files = sorted(os.listdir(args.out))
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in files)
    print(f"make_llama_checkpoint: wrote {args.out}: {len(files)} files ({', '.join(files)}), {size / 1e9:.2f} GB; "
          f"import {t_import:.1f} s, init on {device} {t_init:.1f} s, save {t_save:.1f} s, total {time.time() - t0:.1f} s",
          flush=True)


if __name__ == "__main__":
    main()
