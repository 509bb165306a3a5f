#!/usr/bin/env python3
"""Oracle (CPU): our learning-rate schedules against HF transformers' schedulers.

The hidden Catch test "[.schedule_oracle]" writes our lr for a grid of schedules (constant,
constant_with_warmup, linear, cosine; warmup_steps or warmup_ratio; short and long runs; steps past
the end) to $QLORA_SCHEDULE_ORACLE_DIR/ours.json. Here transformers' get_scheduler(...) drives a
dummy optimizer through the same steps (LambdaLR: the lr of optimizer step k is read before
scheduler.step()), warmup from a ratio is resolved by TrainingArguments.get_warmup_steps, and
every lr must be equal to the last bit.

Usage: .venv/bin/python tests/oracle/schedule_hf.py --tests build/qlora_tests
Exit 0: pass, 1: fail, 77: skipped (transformers missing).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

try:
    import torch
    from transformers import get_scheduler
except ImportError as e:
    print(f"SKIP: {e} (pip install torch transformers)")
    sys.exit(77)


def hf_warmup(warmup_steps, warmup_ratio, total, tmp):
    # transformers.TrainingArguments.get_warmup_steps itself. In v5 warmup_ratio is folded into
    # warmup_steps (a value < 1 is a ratio); v4 has both arguments.
    value = warmup_steps if warmup_steps > 0 else warmup_ratio
    try:
        from transformers import TrainingArguments
        try:
            args = TrainingArguments(output_dir=tmp, warmup_steps=value, report_to=[])
        except (TypeError, ValueError):
            args = TrainingArguments(output_dir=tmp, warmup_steps=int(warmup_steps), warmup_ratio=warmup_ratio, report_to=[])
        return args.get_warmup_steps(total)
    except ImportError:  # TrainingArguments needs accelerate: the rule written out
        return int(warmup_steps) if warmup_steps > 0 else math.ceil(total * warmup_ratio)


def hf_lrs(kind, base_lr, warmup, total, n):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", default="build/qlora_tests")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([a.tests, "[.schedule_oracle]"], env={**os.environ, "QLORA_SCHEDULE_ORACLE_DIR": tmp},
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"FAIL: qlora_tests [.schedule_oracle] exited {r.returncode}\n{r.stdout[-3000:]}{r.stderr[-2000:]}")
            return 1
        with open(os.path.join(tmp, "ours.json")) as f:
            cases = json.load(f)
        warmups = [hf_warmup(c["warmup_steps"], c["warmup_ratio"], c["total_steps"], tmp) for c in cases]
    failures = 0
    compared = 0
    for c, warmup in zip(cases, warmups):
        what = f'{c["kind"]} warmup_steps={c["warmup_steps"]} ratio={c["warmup_ratio"]} total={c["total_steps"]}'
        if warmup != c["resolved_warmup"]:
            print(f"FAIL: {what}: warmup {c['resolved_warmup']} (HF: {warmup})")
            failures += 1
            continue
        theirs = hf_lrs(c["kind"], c["base_lr"], warmup, c["total_steps"], len(c["lrs"]))
        for step, (o, t) in enumerate(zip(c["lrs"], theirs)):
            compared += 1
            if o != t:
                print(f"FAIL: {what} step {step}: ours {o!r}, HF {t!r}")
                failures += 1
    print(f"schedule oracle: {len(cases)} schedules, {compared} lr values compared, {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
