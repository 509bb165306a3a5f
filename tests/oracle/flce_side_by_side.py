#!/usr/bin/env python3
"""Side by side: qlora's fused linear cross-entropy against Liger-Kernel's and Apple's
cut-cross-entropy, one GEMM and the unfused torch loss, in one Python process on one GPU (issue 5).

Every implementation gets the same X [N, H] bf16 (requires grad), W [V, H] bf16 (frozen, or
trainable) and labels (5 % ignored), and is timed the same way: the median over --iters samples
(after 2 warm-up calls) of one forward + backward bracketed by CUDA events, gradients dropped
before each sample so that each one allocates them afresh. "Extra peak" is
torch.cuda.max_memory_allocated during the sample minus what was allocated just before it (the
inputs are not counted; logits, chunk buffers, dX and dW are). Each implementation's loss and dX
are compared with the unfused fp32-logits reference of the same inputs.

Implementations:
  qlora           torch.ops.qlora.fused_linear_cross_entropy (gradients made in the forward)
  qlora-recompute the same op with reduction="none" then .sum()/n: the logits are recomputed in
                  the backward instead (the alternative design of issue 5 (3), timed here)
  liger           liger_kernel LigerFusedLinearCrossEntropyFunction (accum_dtype fp32, as ours)
  cce             cut_cross_entropy.linear_cross_entropy (impl "cce")
  torch           X @ W^T -> float -> cross_entropy -> backward (unfused)
  gemm            one X @ W^T in bf16 without grad (the yardstick)

Usage on the GPU box (wheels on PYTHONPATH):
    python tests/oracle/flce_side_by_side.py --lib build-gpu/libqlora_ops.so --out flce_sbs.json
Exit status: 0 when every implementation that could run agrees with the reference, 1 on a
disagreement, 2 on a setup error, 77 without CUDA.
"""
import argparse
import json
import sys
import traceback

import torch

CASES = [(4096, 4096, 128256), (16384, 4096, 128256), (8192, 2304, 256000)]


def load_impls(lib):
    torch.ops.load_library(lib)
    impls = {}

    def qlora_fused(x, w, y):
        return torch.ops.qlora.fused_linear_cross_entropy(x, w, y)

    def qlora_recompute(x, w, y):
        per_token = torch.ops.qlora.fused_linear_cross_entropy(x, w, y, reduction="none")
        return per_token.sum() / (y != -100).sum()

    impls["qlora"] = qlora_fused
    impls["qlora-recompute"] = qlora_recompute
    notes = {}
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        def liger(x, w, y):
            out = LigerFusedLinearCrossEntropyFunction.apply(x, w, y, None, None, -100, 0.0, 0.0, "mean", None,
                                                             False, torch.float32)
            return out[0] if isinstance(out, tuple) else out

        impls["liger"] = liger
        import liger_kernel
        notes["liger"] = getattr(liger_kernel, "__version__", "?")
    except Exception as e:  # the wheel missing or not importable here: reported, not fatal
        notes["liger"] = f"unavailable: {type(e).__name__}: {e}"
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce(x, w, y):
            return linear_cross_entropy(x, w, y, impl="cce")

        impls["cce"] = cce
        notes["cce"] = "cut-cross-entropy"
    except Exception as e:
        notes["cce"] = f"unavailable: {type(e).__name__}: {e}"

    def unfused(x, w, y):
        return torch.nn.functional.cross_entropy((x @ w.t()).float(), y, ignore_index=-100)

    impls["torch"] = unfused
    return impls, notes


# The paired yardstick: this many GEMMs back to back (a load as long as a fused step), per GEMM.
PAIR_GEMMS = 3


def measure(fn, x, w, y, iters, trainable, want_grad=True, yard=None):
    """Median ms, max extra peak, loss, dX, and (with `yard`, one GEMM run PAIR_GEMMS times back to back
    right before every sample, in the same state of the GPU's clocks) the median of the per-sample
    ratios to its time per GEMM."""
    times, peaks, ratios = [], [], []
    loss = dx = None
    for i in range(iters + 2):
        x.grad = None
        w.grad = None
        yard_ms = None
        if yard is not None:
            torch.cuda.synchronize()
            ys, ye = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ys.record()
            with torch.no_grad():
                for _ in range(PAIR_GEMMS):
                    yard()
            ye.record()
            torch.cuda.synchronize()
            yard_ms = ys.elapsed_time(ye) / PAIR_GEMMS
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if want_grad:
            loss = fn(x, w, y)
            loss.backward()
        else:
            with torch.no_grad():
                loss = fn(x, w, y)
        stop.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(stop))
            peaks.append(torch.cuda.max_memory_allocated() - base)
            if yard_ms is not None:
                ratios.append(times[-1] / yard_ms)
    if want_grad:
        dx = x.grad.detach().clone()
        if trainable and w.grad is None:
            raise RuntimeError("W is trainable but no dW was produced")
    times.sort()
    ratios.sort()
    paired = ratios[len(ratios) // 2] if ratios else None
    return times[len(times) // 2], max(peaks), float(loss.detach().float()) if loss.numel() == 1 else None, dx, paired


def reference(x, w, y):
    """Unfused, logits in fp32: the loss and dX every implementation is compared with."""
    xr = x.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(xr.float() @ w.detach().float().t(), y, ignore_index=-100)
    loss.backward()
    return float(loss), xr.grad.float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", required=True, help="path to libqlora_ops.so")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--cases", default="all", help="all | small (only the 4096-token case)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("flce_side_by_side: no CUDA device: skipped")
        return 77
    try:
        impls, notes = load_impls(a.lib)
    except Exception as e:
        print(f"flce_side_by_side: setup failed: {e}")
        return 2
    dev = torch.cuda.get_device_properties(0)
    print(f"device: {dev.name}; torch {torch.__version__}; " + "; ".join(f"{k}: {v}" for k, v in notes.items()))
    rows, failures = [], []
    cases = CASES[:1] if a.cases == "small" else CASES
    for (N, H, V) in cases:
        for trainable in (False, True):
            g = torch.Generator(device="cuda").manual_seed(N + H + V)
            x = (torch.randn(N, H, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_(True)
            w = (torch.randn(V, H, device="cuda", generator=g) * (H ** -0.5)).bfloat16().requires_grad_(trainable)
            y = torch.randint(0, V, (N,), device="cuda", generator=g)
            y[torch.rand(N, device="cuda", generator=g) < 0.05] = -100
            ref_loss, ref_dx = reference(x, w, y)
            gemm_ms, _, _, _, _ = measure(lambda x, w, y: x @ w.t(), x, w, y, a.iters, trainable, want_grad=False)
            torch.cuda.empty_cache()
            tag = f"N={N} H={H} V={V} W {'trainable' if trainable else 'frozen'}"
            print(f"\n{tag}: one GEMM {gemm_ms:.2f} ms; reference loss {ref_loss:.6f}")
            print(f"  {'impl':16s} {'ms':>8s} {'x GEMM':>7s} {'x pair':>7s} {'extra GB':>9s} {'loss rel err':>13s} "
                  f"{'dX rel err':>11s}")
            for name, fn in impls.items():
                try:
                    ms, peak, loss, dx, paired = measure(fn, x, w, y, a.iters, trainable, yard=lambda: x @ w.t())
                except Exception as e:
                    print(f"  {name:16s} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    rows.append({"case": tag, "impl": name, "error": f"{type(e).__name__}: {e}"})
                    traceback.print_exc(limit=2)
                    torch.cuda.empty_cache()
                    continue
                loss_err = abs(loss - ref_loss) / abs(ref_loss)
                dx_err = float((dx.float() - ref_dx).abs().max() / ref_dx.abs().max())
                print(f"  {name:16s} {ms:8.2f} {ms / gemm_ms:7.2f} {paired:7.2f} {peak / 1e9:9.2f} {loss_err:13.2e} "
                      f"{dx_err:11.2e}")
                rows.append({"case": tag, "N": N, "H": H, "V": V, "trainable": trainable, "impl": name, "ms": ms,
                             "x_gemm": ms / gemm_ms, "x_gemm_paired": paired, "gemm_ms": gemm_ms, "extra_peak_gb": peak / 1e9,
                             "loss": loss, "ref_loss": ref_loss, "loss_rel_err": loss_err, "dx_rel_err": dx_err})
                # bf16 logits and gradients: the loss to ~1e-3, dX to a few % of its largest value.
                if loss_err > 2e-3 or dx_err > 5e-2:
                    failures.append(f"{tag} {name}: loss rel err {loss_err:.2e}, dX rel err {dx_err:.2e}")
                del dx
                x.grad = None
                w.grad = None
                torch.cuda.empty_cache()
            del x, w, y, ref_dx
            torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": dev.name, "torch": torch.__version__, "notes": notes, "iters": a.iters,
                       "rows": rows, "failures": failures}, f, indent=1)
    for f in failures:
        print("DISAGREES:", f)
    print(f"\nflce_side_by_side: {len(rows)} measurements, {len(failures)} disagreements")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
