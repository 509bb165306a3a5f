#!/usr/bin/env python3
"""scripts/soak_model.py OUT_DIR TOKENIZER_DIR [--seed N] — write a small random Llama checkpoint
(Hugging Face layout: config.json, model.safetensors in bf16, the tokenizer files copied from
TOKENIZER_DIR) for scripts/soak. Python standard library only: no torch, no transformers.

Shape: hidden 256, 4 layers, 8 heads of 32 (4 KV heads), intermediate 688, tied embeddings, the
tokenizer's vocabulary (llama2: 32000). About 11 M parameters: a CPU training step takes well under
a second, so a 30-minute soak gets hundreds of steps and checkpoints. Same seed -> same bytes.
"""
import argparse
import array
import json
import os
import random
import shutil
import struct
import sys

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 256, 4, 8, 4, 688


def bf16_bytes(values):
    """float list -> little-endian bf16 bytes (the upper half of each float32, truncated)."""
    f32 = array.array("f", values)
    if sys.byteorder != "little":
        f32.byteswap()
    raw = f32.tobytes()
    out = bytearray(len(raw) // 2)
    out[0::2] = raw[2::4]
    out[1::2] = raw[3::4]
    return bytes(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("tokenizer_dir")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    with open(os.path.join(args.tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    vocab = len(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab = max(vocab, added["id"] + 1)

    rng = random.Random(args.seed)
    head_dim = HIDDEN // HEADS
    shapes = [("model.embed_tokens.weight", [vocab, HIDDEN], 0.02)]
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        shapes += [
            (p + "input_layernorm.weight", [HIDDEN], None),
            (p + "post_attention_layernorm.weight", [HIDDEN], None),
            (p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN], 0.05),
            (p + "self_attn.k_proj.weight", [KV_HEADS * head_dim, HIDDEN], 0.05),
            (p + "self_attn.v_proj.weight", [KV_HEADS * head_dim, HIDDEN], 0.05),
            (p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN], 0.05),
            (p + "mlp.gate_proj.weight", [INTER, HIDDEN], 0.05),
            (p + "mlp.up_proj.weight", [INTER, HIDDEN], 0.05),
            (p + "mlp.down_proj.weight", [HIDDEN, INTER], 0.05),
        ]
    shapes.append(("model.norm.weight", [HIDDEN], None))

    header, blobs, offset = {}, [], 0
    for name, shape, std in shapes:
        n = 1
        for d in shape:
            n *= d
        if std is None:  # RMSNorm weights: ones
            vals = [1.0] * n
        else:  # uniform with the given standard deviation (fast; the distribution does not matter here)
            a = std * 3 ** 0.5
            r = rng.random
            vals = [(2.0 * r() - 1.0) * a for _ in range(n)]
        b = bf16_bytes(vals)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    header["__metadata__"] = {"format": "pt"}
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)

    os.makedirs(args.out_dir, exist_ok=True)
    tmp = os.path.join(args.out_dir, "model.safetensors.part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    os.replace(tmp, os.path.join(args.out_dir, "model.safetensors"))

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    }
    with open(os.path.join(args.out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = os.path.join(args.tokenizer_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(args.out_dir, name))
    print(f"[soak] random Llama: {sum(1 for _ in shapes)} tensors, vocab {vocab}, {offset / 2 / 1e6:.1f} M parameters -> {args.out_dir}")


if __name__ == "__main__":
    main()
