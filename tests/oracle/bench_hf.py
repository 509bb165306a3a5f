#!/usr/bin/env python3
"""Baseline for `qlora train` speed (issues 7 and 11): HF transformers + PEFT + bitsandbytes 4-bit
QLoRA on the same checkpoint, shapes, rank, batch and gradient checkpointing, timed the same way.

The model is loaded with BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute bf16) (or bf16
with --no-4bit), LoRA r/alpha on the seven projections (dropout 0), gradient checkpointing on
(use_reentrant=False), torch AdamW on the LoRA parameters, random token ids [batch, seq], labels =
input ids (transformers shifts them; --prompt-fraction F sets the first F of each row to -100, a
masked prompt, as `qlora bench train --prompt-fraction F`). Each step: forward + loss + backward + optimizer step,
synchronized; tokens/s = batch * seq / step time, median over the steps after --warmup; peak =
torch.cuda.max_memory_allocated over the run.

    python tests/oracle/bench_hf.py --model DIR --seq 2048 --batch 2 --rank 16 --steps 12 --out hf.json
Exit 77 when CUDA, transformers, peft or bitsandbytes is missing.
"""
import argparse
import json
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-4bit", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--memory-limit-gib", type=float, default=0,
                    help="cap the caching allocator (torch.cuda.set_per_process_memory_fraction), e.g. 79 for an "
                         "80 GB card's budget on a larger one; out of memory then exits 3")
    ap.add_argument("--prompt-fraction", type=float, default=0,
                    help="the first fraction of each row is a prompt with no loss (labels -100), in [0, 1)")
    a = ap.parse_args()
    if not 0 <= a.prompt_fraction < 1:
        print(f"bench_hf: --prompt-fraction must be in [0, 1), found {a.prompt_fraction}")
        return 2
    prompt = int(a.prompt_fraction * a.seq)
    try:
        import torch
        import transformers
        import peft
        if not a.no_4bit:
            import bitsandbytes  # noqa: F401
    except ImportError as e:
        print(f"bench_hf: {e}: skipped")
        return 77
    if not torch.cuda.is_available():
        print("bench_hf: no CUDA device: skipped")
        return 77
    if a.memory_limit_gib > 0:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_limit_gib * 2**30 / total), 0)
    quant = None
    if not a.no_4bit:
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    t0 = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, quantization_config=quant, dtype=torch.bfloat16,
                                                              device_map={"": 0})
    load_s = time.time() - t0
    model.config.use_cache = False
    # from_pretrained leaves the model in eval mode, and transformers checkpoints a layer only while
    # training: without train() the gradient checkpointing asked for below never happens.
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg = peft.LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.reset_peak_memory_stats()

    def run_steps():
        times, losses = [], []
        for step in range(a.steps):
            ids = torch.randint(0, min(vocab, 128000), (a.batch, a.seq), device="cuda", generator=g)
            labels = ids.clone()
            labels[:, :prompt] = -100
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            losses.append(float(out.loss))
            if step >= a.warmup:
                times.append(dt)
            print(f"hf step {step + 1}/{a.steps}: loss {losses[-1]:.4f}, {a.batch * a.seq / dt:.0f} tok/s", flush=True)
        med = statistics.median(times)
        res = {"stack": f"transformers {transformers.__version__} + peft {peft.__version__}" +
                        ("" if a.no_4bit else f" + bitsandbytes {bitsandbytes.__version__} nf4"),
               "model": a.model, "seq": a.seq, "batch": a.batch, "rank": a.rank, "load_s": load_s,
               "prompt_fraction": a.prompt_fraction,
               "trainable_params": sum(p.numel() for p in params), "median_step_s": med,
               "gradient_checkpointing": bool(model.base_model.model.is_gradient_checkpointing and model.training),
               "tokens_per_s": a.batch * a.seq / med, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
               "losses": losses}
        print("bench_hf: " + json.dumps({k: v for k, v in res.items() if k != "losses"}))
        if a.out:
            json.dump(res, open(a.out, "w"), indent=1)
        return 0

    try:
        return run_steps()
    except torch.OutOfMemoryError as e:
        print(f"bench_hf: out of memory at seq {a.seq}, batch {a.batch}: {str(e).splitlines()[0][:120]}")
        return 3


if __name__ == "__main__":
    sys.exit(main())
