#!/usr/bin/env python3
"""Compile compatibility of the qlora ops (issue 9): what a PyTorch user gets from
`torch.ops.load_library(libqlora_ops.so)` alone.

(a) torch.library.opcheck on every qlora op (schema, autograd registration, fake tensors,
    AOT dispatch with dynamic shapes), odd sizes, requires_grad inputs where differentiable;
(b) a Llama decoder block written here in plain PyTorch on our ops -- qlora.rms_norm, qlora.rope
    (HF half-split rotary), GQA causal SDPA, qlora.nf4_lora_linear for all seven projections (base weights
    from qlora.nf4_quantize), qlora.swiglu -- then the final norm and qlora.fused_linear_cross_entropy
    with an lm_head, compiled with torch.compile(fullgraph=True, dynamic=True) (inductor) and run
    as a training step for sequence lengths 128, 256, 384, 512: 0 graph breaks, <= 30 compilations,
    loss and every LoRA gradient equal to eager within the tolerance below.

Tolerance, compiled vs eager, as max |diff| / max |eager| per tensor (the loss; each LoRA
gradient): fp32 (CPU default) 1e-5; bf16 compute with fp32 LoRA masters (CUDA default) 5e-2
(the LoRA GEMMs and the attention run in bf16; inductor may reorder the elementwise work around them).

    python tests/compile/test_compile.py --lib build/libqlora_ops.so [--device cuda]
Exit status: 0 pass, 1 a check failed, 77 (skipped) when the library or a module is missing.
"""
import argparse
import os
import statistics
import sys
import time

try:
    import torch
    import torch._dynamo
    import torch.nn.functional as F
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx
    from torch.library import opcheck
except ImportError as e:
    print(f"SKIP: {e}")
    sys.exit(77)

SEQ_LENS = [128, 256, 384, 512]
MAX_COMPILES = 30
BLOCKSIZE = 64
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


# ---- (a) opcheck -----------------------------------------------------------------------------

def run_opcheck(name, op, args, kwargs=None):
    try:
        res = opcheck(op, args, kwargs)  # every test_util by default
        bad = {k: v for k, v in res.items() if v != "SUCCESS"}
        check(not bad, f"opcheck {name}: {res if bad else 'all ' + str(len(res)) + ' SUCCESS'}")
    except Exception as e:  # opcheck raises OpCheckError with the failing test and the cause
        check(False, f"opcheck {name}: {type(e).__name__}: {str(e).splitlines()[0]}")


def opchecks(dev, dt):
    q = torch.ops.qlora
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, scale=1.0, dtype=dt, grad=False):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype).requires_grad_(grad)

    out_f, in_f, r, n, vocab = 37, 29, 3, 13, 53  # odd sizes; 37 * 29 elements: a partial last block
    for nested in (True, False):
        w = rnd(out_f, in_f)
        run_opcheck(f"nf4_quantize nested={nested}", q.nf4_quantize.default, (w, BLOCKSIZE, nested))
        # Quantizing a trainable weight (an nn.Parameter): not differentiable, no output claims a gradient.
        wg = w.clone().requires_grad_(True)
        run_opcheck(f"nf4_quantize nested={nested} weight.requires_grad", q.nf4_quantize.default,
                    (wg, BLOCKSIZE, nested))
        check(not any(t.requires_grad for t in q.nf4_quantize(wg, BLOCKSIZE, nested)),
              f"nf4_quantize nested={nested}: no output of a requires_grad weight requires grad")
        pieces = q.nf4_quantize(w, BLOCKSIZE, nested)
        dq = (*pieces, BLOCKSIZE, [out_f, in_f])
        run_opcheck(f"nf4_dequantize nested={nested}", q.nf4_dequantize.default, (*dq, dt))
        out = torch.empty(out_f * in_f, device=dev, dtype=dt)
        run_opcheck(f"nf4_dequantize.out nested={nested}", q.nf4_dequantize.out, (*dq, dt), {"out": out})
        for bias_on in (True, False):
            for lora_on in (True, False):
                x = rnd(2, n, in_f, grad=True)
                bias = rnd(out_f) if bias_on else None
                a = rnd(r, in_f, scale=0.2, dtype=torch.float32, grad=True) if lora_on else None
                b = rnd(out_f, r, scale=0.2, dtype=torch.float32, grad=True) if lora_on else None
                run_opcheck(f"nf4_lora_linear nested={nested} bias={bias_on} lora={lora_on}",
                            q.nf4_lora_linear.default, (x, *dq), {"bias": bias, "lora_a": a, "lora_b": b, "scale": 0.7})
        x2 = rnd(n, in_f)  # 2-D x, only the LoRA masters require grad
        a, b = rnd(r, in_f, dtype=torch.float32, grad=True), rnd(out_f, r, dtype=torch.float32, grad=True)
        run_opcheck(f"nf4_lora_linear nested={nested} 2-D x, grads of A/B only", q.nf4_lora_linear.default,
                    (x2, *dq, None, a, b, 2.0))

    labels = torch.randint(0, vocab, (n * 3,), generator=g).to(dev)
    labels[::4] = -100
    for red in ("mean", "sum", "none"):
        for w_grad in (True, False):
            x, w = rnd(n * 3, in_f, grad=True), rnd(vocab, in_f, scale=0.3, grad=w_grad)
            run_opcheck(f"fused_linear_cross_entropy {red} w.requires_grad={w_grad}",
                        q.fused_linear_cross_entropy.default, (x, w, labels, -100, red, 0.0, 0.9, 3.0, 1e-3, 8))
    x, w = rnd(n * 3, in_f, grad=True), rnd(vocab, in_f, grad=True)
    run_opcheck("fused_linear_cross_entropy mean normalizer=50", q.fused_linear_cross_entropy.default,
                (x, w, labels, -100, "mean", 50.0, 1.0, 0.0, 0.0, 0))
    x, w = x.detach(), w.detach()
    run_opcheck("_fused_linear_cross_entropy_fwd", q._fused_linear_cross_entropy_fwd.default,
                (x, w, labels, -100, 1.0, 0.0, 0.0, 8, True, True))
    run_opcheck("_fused_linear_cross_entropy_bwd", q._fused_linear_cross_entropy_bwd.default,
                (torch.rand(n * 3, device=dev), x, w, labels, -100, 1.0, 0.0, 0.0, 8, True, False))

    # Fused RMSNorm / SwiGLU (odd sizes: the scalar paths; multiples of 8: the vector paths on CUDA).
    for hidden in (37, 64):
        x, w = rnd(3, 5, hidden, grad=True), 1 + 0.1 * rnd(hidden)
        run_opcheck(f"rms_norm hidden={hidden}", q.rms_norm.default, (x, w, 1e-5))
        out, rstd = q._rms_norm_fwd(x.detach(), w, 1e-5)
        run_opcheck(f"_rms_norm_fwd hidden={hidden}", q._rms_norm_fwd.default, (x.detach(), w, 1e-5))
        run_opcheck(f"_rms_norm_bwd hidden={hidden}", q._rms_norm_bwd.default, (rnd(3, 5, hidden), x.detach(), w, rstd))
        gate, up = rnd(3, 5, hidden, scale=3.0, grad=True), rnd(3, 5, hidden, grad=True)
        run_opcheck(f"swiglu n={3 * 5 * hidden}", q.swiglu.default, (gate, up))
        run_opcheck(f"_swiglu_bwd n={3 * 5 * hidden}", q._swiglu_bwd.default,
                    (rnd(3, 5, hidden), gate.detach(), up.detach()))
    for head_dim in (6, 16):
        x = rnd(2, 3, 5, head_dim, grad=True)
        ang = rnd(2, 5, head_dim, scale=3.0, dtype=torch.float32)
        cos, sin = ang.cos().to(dt), ang.sin().to(dt)
        run_opcheck(f"rope head_dim={head_dim}", q.rope.default, (x, cos, sin))
        run_opcheck(f"rope head_dim={head_dim} transposed x", q.rope.default,
                    (rnd(2, 5, 3, head_dim).transpose(1, 2).requires_grad_(True), cos, sin))
        run_opcheck(f"_rope_bwd head_dim={head_dim}", q._rope_bwd.default, (rnd(2, 3, 5, head_dim), cos, sin))


# ---- (b) a Llama decoder block on our ops ------------------------------------------------------

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class NF4LoraLinear(torch.nn.Module):
    """A frozen NF4 base weight (nf4_quantize's pieces as buffers) with fp32 LoRA masters."""

    def __init__(self, out_f, in_f, r, alpha, dev, dt, g):
        super().__init__()
        w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
        names = ["packed", "absmax", "absmax2", "code2", "offset"]
        for k, t in zip(names, torch.ops.qlora.nf4_quantize(w.to(dev, dt), BLOCKSIZE, True)):
            self.register_buffer(k, t)
        self.shape = [out_f, in_f]
        # A float module attribute becomes a SymFloat under dynamic=True; reaching the op's `float scale`
        # it is specialized, and dynamo restarts its analysis once (one extra backend call, one graph).
        self.scale = alpha / r
        self.lora_a = torch.nn.Parameter((torch.rand(r, in_f, generator=g) * 2 - 1).to(dev) / in_f ** 0.5)
        # B != 0 (PEFT starts at 0), so that every gradient is non-trivial.
        self.lora_b = torch.nn.Parameter((torch.randn(out_f, r, generator=g) * 0.05).to(dev))

    def forward(self, x):
        return torch.ops.qlora.nf4_lora_linear(x, self.packed, self.absmax, self.absmax2, self.code2, self.offset,
                                               BLOCKSIZE, self.shape, None, self.lora_a, self.lora_b, self.scale)


def rms_norm(x, w, eps=1e-5):
    return torch.ops.qlora.rms_norm(x, w, eps)


class LlamaBlockLM(torch.nn.Module):
    def __init__(self, dev, dt, hidden=64, heads=4, kv_heads=2, inter=176, vocab=257, r=8, alpha=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        hd = self.head_dim
        sizes = {"q_proj": (heads * hd, hidden), "k_proj": (kv_heads * hd, hidden), "v_proj": (kv_heads * hd, hidden),
                 "o_proj": (hidden, heads * hd), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
                 "down_proj": (hidden, inter)}
        self.proj = torch.nn.ModuleDict({k: NF4LoraLinear(*sizes[k], r, alpha, dev, dt, g) for k in PROJ})
        frozen = lambda t: torch.nn.Parameter(t.to(dev, dt), requires_grad=False)
        self.embed = frozen(torch.randn(vocab, hidden, generator=g))
        self.norm_in = frozen(1 + 0.1 * torch.randn(hidden, generator=g))
        self.norm_post = frozen(1 + 0.1 * torch.randn(hidden, generator=g))
        self.norm_final = frozen(1 + 0.1 * torch.randn(hidden, generator=g))
        self.lm_head = frozen(torch.randn(vocab, hidden, generator=g) / hidden ** 0.5)
        self.register_buffer("inv_freq", 1.0 / 10000.0 ** (torch.arange(0, hd, 2, device=dev).float() / hd))

    def forward(self, ids, labels):
        bsz, t = ids.shape
        p = self.proj
        h = F.embedding(ids, self.embed)
        x = rms_norm(h, self.norm_in)
        q = p["q_proj"](x).view(bsz, t, self.heads, self.head_dim).transpose(1, 2)
        k = p["k_proj"](x).view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = p["v_proj"](x).view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
        freqs = torch.arange(t, device=ids.device, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        cos, sin = cos.expand(bsz, t, -1), sin.expand(bsz, t, -1)
        q, k = torch.ops.qlora.rope(q, cos, sin), torch.ops.qlora.rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + p["o_proj"](a.transpose(1, 2).reshape(bsz, t, -1))
        x = rms_norm(h, self.norm_post)
        h = h + p["down_proj"](torch.ops.qlora.swiglu(p["gate_proj"](x), p["up_proj"](x)))
        x = rms_norm(h, self.norm_final)
        return torch.ops.qlora.fused_linear_cross_entropy(x.reshape(bsz * t, -1), self.lm_head, labels.reshape(-1))


def train_step(fn, model, ids, labels):
    for prm in model.parameters():
        prm.grad = None
    loss = fn(ids, labels)
    loss.backward()
    return loss.detach().float(), {n: prm.grad.detach().float().clone() for n, prm in model.named_parameters()
                                   if prm.requires_grad}


def rel_diff(a, b):
    """max |a - b| / max |b|: the compiled result's error relative to the eager tensor's scale."""
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def median_step_s(fn, model, ids, labels, dev, warmup=3, steps=10):
    for _ in range(warmup):
        train_step(fn, model, ids, labels)
    times = []
    for _ in range(steps):
        sync(dev)
        t0 = time.perf_counter()
        train_step(fn, model, ids, labels)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compiled_block(dev, dt, batch, tol):
    torch._dynamo.reset()
    counters.clear()
    model = LlamaBlockLM(dev, dt)
    n_lora = sum(1 for n, prm in model.named_parameters() if prm.requires_grad)
    check(n_lora == 14, f"block: 7 projections x (lora_a, lora_b) = {n_lora} trainable tensors")

    compiles = []

    def counting_inductor(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, backend=counting_inductor, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(2)
    worst_loss = worst_grad = 0.0
    t_compile = 0.0
    for t in SEQ_LENS:
        ids = torch.randint(0, 257, (batch, t), generator=g).to(dev)
        labels = torch.randint(0, 257, (batch, t), generator=g).to(dev)
        labels[:, :7] = -100
        loss_e, grads_e = train_step(model, model, ids, labels)
        n_before = len(compiles)
        t0 = time.perf_counter()
        loss_c, grads_c = train_step(compiled, model, ids, labels)
        sync(dev)
        dt_step = time.perf_counter() - t0
        if len(compiles) > n_before:
            t_compile += dt_step
        dl = rel_diff(loss_c, loss_e)
        dg = max(rel_diff(grads_c[n], grads_e[n]) for n in grads_e)
        worst_loss, worst_grad = max(worst_loss, dl), max(worst_grad, dg)
        check(dl <= tol and dg <= tol and set(grads_c) == set(grads_e),
              f"block T={t}: loss {loss_e.item():.6f}, compiled - eager: loss {dl:.2e}, LoRA grads {dg:.2e} "
              f"(tol {tol:g}), step {dt_step:.1f} s{' incl. compile' if len(compiles) > n_before else ''}")
    breaks = sum(counters["graph_break"].values())
    unique = counters["stats"]["unique_graphs"]
    check(breaks == 0, f"graph breaks: {breaks} {dict(counters['graph_break'])}")
    check(0 < len(compiles) <= MAX_COMPILES, f"inductor compilations: {len(compiles)} (<= {MAX_COMPILES}); "
          f"dynamo unique graphs {unique}")
    summary = (f"SUMMARY device={dev} dtype={str(dt).replace('torch.', '')} T={SEQ_LENS} batch={batch}: "
               f"graph breaks {breaks}, compiles {len(compiles)}, max |diff| / max |eager| "
               f"loss {worst_loss:.2e} grads {worst_grad:.2e} (tol {tol:g}), compile wall {t_compile:.1f} s")
    ids = torch.randint(0, 257, (batch, SEQ_LENS[-1]), generator=g).to(dev)
    labels = torch.randint(0, 257, (batch, SEQ_LENS[-1]), generator=g).to(dev)
    t_e = median_step_s(model, model, ids, labels, dev)
    t_c = median_step_s(compiled, model, ids, labels, dev)
    check(len(compiles) <= MAX_COMPILES, f"compilations after the timing runs: {len(compiles)}")
    summary += f", step T={SEQ_LENS[-1]} eager {t_e * 1e3:.2f} ms compiled {t_c * 1e3:.2f} ms ({t_e / t_c:.2f}x)"
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", required=True, help="path of libqlora_ops.so")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="block compute dtype (default: fp32 cpu, bf16 cuda)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--skip-opcheck", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(args.lib):
        print(f"SKIP: {args.lib} not found")
        return 77
    torch.ops.load_library(args.lib)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: --device cuda but torch sees no CUDA device")
        return 77
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    tol = 1e-5 if dt == torch.float32 else 5e-2
    if not args.skip_opcheck:
        t0 = time.perf_counter()
        opchecks(args.device, torch.float32)
        if args.device == "cuda":
            opchecks(args.device, torch.bfloat16)
        print(f"opcheck: {time.perf_counter() - t0:.1f} s")
    summary = compiled_block(args.device, dt, args.batch, tol)
    print(summary)
    if failures:
        print(f"{len(failures)} check(s) failed:", *failures, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
