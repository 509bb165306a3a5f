#!/usr/bin/env python3
"""scripts/soak.py — the driver behind scripts/soak (run that; it snapshots the binaries first).

Trains a small random Llama on the CPU (fp32, one thread) while killing it: SIGKILL after random
delays, SIGKILL aimed at checkpoint writes (the moment the .checkpoint-*.tmp-PID directory appears),
and now and then SIGTERM (expected: a checkpoint, exit 0). Every restart resumes with
resume_from_checkpoint=auto. An uninterrupted reference run with the same config runs alongside.
At the end: the killed run's loss per step against the reference (exactly, by default), every
checkpoint left checked against its manifest (size + CRC-32, here in Python) and loaded by qlora
(resume from it and train one step, whose loss must equal the reference's), the final adapters
compared byte for byte. Rounds repeat until the killed runs have taken --minutes of wall time (one
round normally fills them; when the machine gets faster than calibrated, a further round tops up).
Python standard library only.
"""
import argparse
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zlib

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- checkpoints, metrics --------------------------------------------------------------------

def checkpoint_dirs(out):
    """[(step, path)] of checkpoint-<step> directories, oldest first."""
    res = []
    if os.path.isdir(out):
        for name in os.listdir(out):
            m = CKPT_RE.match(name)
            if m and os.path.isdir(os.path.join(out, name)):
                res.append((int(m.group(1)), os.path.join(out, name)))
    return sorted(res)


def verify_manifest(d):
    """None when every file the manifest lists has its size and CRC-32; else the reason."""
    mp = os.path.join(d, "manifest.json")
    try:
        with open(mp, "rb") as f:
            m = json.loads(f.read())
    except (OSError, ValueError) as e:
        return f"manifest.json unreadable ({e.__class__.__name__}: {e})"
    if m.get("format") != "qlora-checkpoint" or not isinstance(m.get("files"), dict) or not m["files"]:
        return "manifest.json is not a qlora checkpoint manifest"
    if "step" in m and os.path.basename(d) != f"checkpoint-{m['step']}":
        return f"manifest step {m['step']} does not match the directory name"
    for name, rec in m["files"].items():
        p = os.path.join(d, name)
        try:
            size = os.path.getsize(p)
            if size != rec["size"]:
                return f"{name}: {size} bytes, manifest says {rec['size']}"
            crc = 0
            with open(p, "rb") as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    crc = zlib.crc32(b, crc)
            if f"{crc:08x}" != rec["crc32"]:
                return f"{name}: CRC-32 {crc:08x}, manifest says {rec['crc32']}"
        except OSError as e:
            return f"{name}: {e}"
    return None


def read_metrics(path):
    """[(step, record)] of the training lines (those with a loss) of a metrics.jsonl."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    j = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if isinstance(j, dict) and "loss" in j and "step" in j:
                    out.append((int(j["step"]), j))
    except OSError:
        pass
    return out


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


# ---- running qlora ---------------------------------------------------------------------------

class Runner:
    def __init__(self, args):
        self.bin = os.path.join(args.bin, "qlora")
        self.env = dict(os.environ, LD_LIBRARY_PATH=args.bin + (":" + os.environ["LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH") else ""),
                        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.config = args.config

    def start(self, overrides, log_path):
        logf = open(log_path, "ab")
        logf.write(f"\n=== {time.strftime('%H:%M:%S')} qlora train {self.config} {' '.join(overrides)}\n".encode())
        logf.flush()
        p = subprocess.Popen([self.bin, "train", self.config] + overrides, stdout=logf, stderr=subprocess.STDOUT,
                             env=self.env, start_new_session=True)
        p.log_offset = logf.tell()
        logf.close()
        return p


def log_since(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def calibrate(runner, args, work):
    """Seconds per step and to the first step, from a short uninterrupted run."""
    out = os.path.join(work, "calibration")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    p = runner.start([f"output_dir={out}", "max_steps=12", "save_steps=0", "resume_from_checkpoint=false"],
                     os.path.join(work, "calibration.log"))
    first = None
    while p.poll() is None:
        if first is None and read_metrics(os.path.join(out, "metrics.jsonl")):
            first = time.time() - t0
        time.sleep(0.05)
    if p.returncode != 0:
        sys.exit(f"[soak] calibration run failed (exit {p.returncode}); see {work}/calibration.log")
    steps = [r["tokens"] / r["tokens_per_s"] for _, r in read_metrics(os.path.join(out, "metrics.jsonl"))[2:]]
    return statistics.median(steps), first or 2.0


# ---- one round: reference + killed run -------------------------------------------------------

def kill_loop(runner, args, rng, rdir, total_steps, t_step, t_start, stats):
    """Runs the killed run to completion; returns [(attempt, step, loss)] for every logged step."""
    out = os.path.join(rdir, "killed")
    logp = os.path.join(rdir, "killed.log")
    events = open(os.path.join(rdir, "attempts.jsonl"), "a")
    logged = []
    attempt = 0
    no_progress = 0
    while True:
        attempt += 1
        checked = [(s, d, verify_manifest(d)) for s, d in checkpoint_dirs(out)]
        before = [s for s, d, why in checked if why is None]
        bad_before = {d for s, d, why in checked if why}
        expect_resume = before[-1] if before else None
        # The kill plan for this attempt (seeded: the same seed gives the same sequence of plans).
        u = rng.random()
        if no_progress >= 6:
            mode, k, delay = "save", 2, rng.uniform(0.0, 0.02)  # make progress: let two saves start
        elif u < args.p_term:
            mode, k, delay = "term", 0, rng.uniform(0.0, 2 * args.save_steps * t_step)
        elif u < args.p_term + args.p_save:
            # k-th save of this attempt; killed 0-20 ms after its temp dir appears (mostly while the
            # tensors are written), or 20-300 ms (fsync, the rename, pruning old checkpoints, or the
            # next step)
            mode, k = "save", rng.randint(1, 3)
            delay = rng.uniform(0.0, 0.02) if rng.random() < 0.5 else rng.uniform(0.02, 0.3)
        else:
            mode, k, delay = "random", 0, rng.uniform(0.0, t_start + 3 * args.save_steps * t_step)
        p = runner.start([f"output_dir={out}", f"max_steps={total_steps}", "resume_from_checkpoint=auto"], logp)
        t0 = time.time()
        pid = p.pid
        tmp_pat = re.compile(rf"^\.checkpoint-\d+\.tmp-{pid}$")
        sent = None
        seen_tmp = set()
        step_seen_at = None
        last_progress = t0
        last_count = -1
        while p.poll() is None:
            now = time.time()
            if mode == "random" and now - t0 >= delay:
                sent = "KILL"
            elif mode == "save":
                try:
                    for n in os.listdir(out):
                        if tmp_pat.match(n):
                            seen_tmp.add(n)
                except OSError:
                    pass
                if len(seen_tmp) >= k:
                    if delay > 0:
                        time.sleep(delay)
                    sent = "KILL"
            elif mode == "term":
                if step_seen_at is None and "| loss" in log_since(logp, p.log_offset):
                    step_seen_at = now
                if step_seen_at is not None and now - step_seen_at >= delay:
                    sent = "TERM"
            if sent:
                try:
                    os.kill(pid, signal.SIGKILL if sent == "KILL" else signal.SIGTERM)
                except ProcessLookupError:
                    sent = None  # it ended on its own first
                break
            # A hang guard: no new step line for a long time while alive.
            c = log_since(logp, p.log_offset).count("| loss")
            if c != last_count:
                last_count, last_progress = c, now
            elif now - last_progress > args.hang_s:
                stats["problems"].append(f"round {stats['round']} attempt {attempt}: no progress for {args.hang_s} s (hang?); SIGKILLed")
                os.kill(pid, signal.SIGKILL)
                sent = "KILL(hang)"
                break
            time.sleep(0.002 if mode == "save" else 0.01)
        try:
            rc = p.wait(timeout=args.hang_s)
        except subprocess.TimeoutExpired:
            stats["problems"].append(f"round {stats['round']} attempt {attempt}: did not exit {args.hang_s} s after SIGTERM; SIGKILLed")
            os.kill(pid, signal.SIGKILL)
            rc = p.wait()
        elapsed = time.time() - t0
        text = log_since(logp, p.log_offset)
        m = re.search(r"resumed from (\S+) at step (\d+)", text)
        resumed_at = int(m.group(2)) if m else None
        if resumed_at is not None:
            stats["resumes"] += 1
        # Resume must pick the newest valid checkpoint (when the process got that far).
        if m and resumed_at != expect_resume:
            stats["problems"].append(f"round {stats['round']} attempt {attempt}: resumed at step {resumed_at}, newest valid checkpoint was {expect_resume}")
        if not m and expect_resume is not None and "| loss" in text:
            stats["problems"].append(f"round {stats['round']} attempt {attempt}: trained without resuming although checkpoint-{expect_resume} was valid")
        # What the kill interrupted.
        leftovers = [n for n in os.listdir(out) if re.match(rf"^\.checkpoint-\d+\.(tmp|old)-{pid}$", n)] if os.path.isdir(out) else []
        bad = {d: why for s, d in checkpoint_dirs(out) for why in [verify_manifest(d)] if why}
        during_save = bool(leftovers) or bool(set(bad) - bad_before)
        for d, why in bad.items():
            stats["transient_bad"].append(f"round {stats['round']} attempt {attempt} ({sent}): {os.path.basename(d)}: {why}")
        # Every step this attempt logged (full precision, from metrics.jsonl).
        base = resumed_at or 0
        for s, r in read_metrics(os.path.join(out, "metrics.jsonl")):
            if s > base:
                logged.append((attempt, s, r["loss"], r.get("grad_norm")))
        after = [s for s, d in checkpoint_dirs(out) if verify_manifest(d) is None]
        progress = (after[-1] if after else 0) - (before[-1] if before else 0)
        no_progress = 0 if progress > 0 else no_progress + 1
        done = rc == 0 and "done:" in text
        rec = {"attempt": attempt, "mode": mode, "k": k, "delay": round(delay, 4), "pid": pid, "signal": sent, "rc": rc,
               "seconds": round(elapsed, 3), "resumed_at": resumed_at, "newest_checkpoint": after[-1] if after else None,
               "leftover_temp_dirs": leftovers, "bad_checkpoints": bad, "done": done}
        events.write(json.dumps(rec) + "\n")
        events.flush()
        if sent == "KILL":
            stats["sigkill"] += 1
            if during_save:
                stats["kill_in_save"] += 1
        elif sent == "TERM":
            stats["sigterm"] += 1
            stopped = re.search(r"stopped after step (\d+)", text)
            # A SIGTERM that lands after the last step finds the run already finishing: exit 0 with
            # its "done:" line and no stop is right too.
            if rc != 0 or not (stopped or done):
                stats["problems"].append(f"round {stats['round']} attempt {attempt}: SIGTERM -> exit {rc}, {'a' if stopped else 'no'} 'stopped after step' line")
            elif int(stopped.group(1)) not in after:
                stats["problems"].append(f"round {stats['round']} attempt {attempt}: SIGTERM stopped after step {stopped.group(1)} but checkpoint-{stopped.group(1)} is not valid")
        elif sent == "KILL(hang)":
            stats["sigkill"] += 1
        elif not done:
            stats["problems"].append(f"round {stats['round']} attempt {attempt}: exited {rc} on its own before finishing (see {logp})")
            if rc != 0 and attempt > 3 and no_progress > 3:
                sys.exit(f"[soak] qlora keeps failing; see {logp}")
        if attempt % 25 == 0 or done:
            log(f"round {stats['round']}: attempt {attempt}, newest checkpoint {after[-1] if after else '-'} of {total_steps}, "
                f"{stats['sigkill']} SIGKILL / {stats['sigterm']} SIGTERM so far, {stats['kill_in_save']} during saves")
        if done:
            events.close()
            return logged, attempt


def verify_checkpoint_loads(runner, args, rdir, ckpt_dir, step, total_steps, ref):
    """qlora resumes from the checkpoint and trains (at most) a step; its losses must equal ref's."""
    out = os.path.join(rdir, "verify", os.path.basename(os.path.dirname(ckpt_dir)) + "-" + os.path.basename(ckpt_dir))
    shutil.rmtree(out, ignore_errors=True)
    logp = os.path.join(rdir, "verify.log")
    p = runner.start([f"output_dir={out}", f"max_steps={total_steps}", f"resume_from_checkpoint={ckpt_dir}",
                      f"dataset_prepared_path={os.path.join(rdir, 'killed', 'prepared')}"], logp)
    deadline = time.time() + args.hang_s
    while p.poll() is None and time.time() < deadline:
        if "| loss" in log_since(logp, p.log_offset):
            p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    try:
        rc = p.wait(timeout=args.hang_s)
    except subprocess.TimeoutExpired:
        p.kill()
        return f"{ckpt_dir}: qlora did not finish"
    text = log_since(logp, p.log_offset)
    if rc != 0:
        return f"{ckpt_dir}: resume exited {rc}: " + " | ".join(l for l in text.splitlines() if "error" in l.lower())[:300]
    if f"at step {step}" not in text:
        return f"{ckpt_dir}: the log does not say it resumed at step {step}"
    for s, r in read_metrics(os.path.join(out, "metrics.jsonl")):
        if s > step and (s not in ref or r["loss"] != ref[s]["loss"]):
            return f"{ckpt_dir}: step {s} after resuming: loss {r['loss']!r}, reference {ref.get(s, {}).get('loss')!r}"
    shutil.rmtree(out, ignore_errors=True)
    return None


def run_round(runner, args, rng, work, rnd, total_steps, t_step, t_start, stats):
    rdir = os.path.join(work, f"round-{rnd}")
    shutil.rmtree(rdir, ignore_errors=True)
    os.makedirs(rdir)
    stats["round"] = rnd
    log(f"round {rnd}: {total_steps} steps; reference and killed run side by side in {rdir}")
    ref_p = runner.start([f"output_dir={os.path.join(rdir, 'reference')}", f"max_steps={total_steps}", "resume_from_checkpoint=false"],
                         os.path.join(rdir, "reference.log"))
    t_round = time.time()
    logged, attempts = kill_loop(runner, args, rng, rdir, total_steps, t_step, t_start, stats)
    killed_seconds = time.time() - t_round
    ref_rc = ref_p.wait()
    if ref_rc != 0:
        sys.exit(f"[soak] the reference run failed (exit {ref_rc}); see {rdir}/reference.log")
    ref = dict(read_metrics(os.path.join(rdir, "reference", "metrics.jsonl")))
    fin = read_metrics(os.path.join(rdir, "killed", "metrics.jsonl"))
    steps_fin = [s for s, _ in fin]
    if sorted(ref) != list(range(1, total_steps + 1)):
        stats["problems"].append(f"round {rnd}: the reference logged steps {min(ref)}..{max(ref)} ({len(ref)} lines), expected 1..{total_steps}")
    if steps_fin != list(range(1, total_steps + 1)):
        stats["problems"].append(f"round {rnd}: the killed run's metrics.jsonl has {len(steps_fin)} step lines, not 1..{total_steps} once each")
    # Last value logged per step (the final metrics.jsonl), and every value any attempt logged.
    diff_final = max((abs(r["loss"] - ref[s]["loss"]) for s, r in fin if s in ref), default=float("inf"))
    diff_all = max((abs(l - ref[s]["loss"]) for _, s, l, _ in logged if s in ref), default=float("inf"))
    gdiff = max((abs((g or 0) - (ref[s].get("grad_norm") or 0)) for _, s, _, g in logged if s in ref), default=float("inf"))
    first_bad = next((s for s, r in fin if s in ref and r["loss"] != ref[s]["loss"]), None)
    if first_bad is not None:
        stats["problems"].append(f"round {rnd}: first differing step {first_bad}: killed {fin[steps_fin.index(first_bad)][1]['loss']!r}, reference {ref[first_bad]['loss']!r}")
    same_adapter = sha256(os.path.join(rdir, "killed", "adapter_model.safetensors")) == sha256(os.path.join(rdir, "reference", "adapter_model.safetensors"))
    # Every checkpoint left: manifest (Python CRC-32) and a qlora resume + one step.
    verified, corrupt = 0, []
    for side in ("killed", "reference"):
        for s, d in checkpoint_dirs(os.path.join(rdir, side)):
            why = verify_manifest(d) or verify_checkpoint_loads(runner, args, rdir, d, s, total_steps, ref)
            if why:
                corrupt.append(why)
            else:
                verified += 1
    stray = [n for n in os.listdir(os.path.join(rdir, "killed")) if n.startswith(".checkpoint-")]
    if stray:
        stats["problems"].append(f"round {rnd}: temp checkpoint dirs left at the end: {stray}")
    r = {"round": rnd, "steps": total_steps, "killed_seconds": round(killed_seconds, 1), "attempts": attempts, "steps_logged": len(logged),
         "max_loss_diff_final": diff_final, "max_loss_diff_all_logged": diff_all, "max_grad_norm_diff": gdiff,
         "adapter_identical": same_adapter, "checkpoints_verified": verified, "checkpoints_corrupt": corrupt}
    log(f"round {rnd}: {json.dumps(r)}")
    return r


def main():
    ap = argparse.ArgumentParser(description="soak driver (use scripts/soak)")
    ap.add_argument("--bin", required=True, help="folder with the snapshot of qlora and its .so files")
    ap.add_argument("--work", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0, help="steps of the first round (0: fill --minutes, from a calibration)")
    ap.add_argument("--save-steps", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=0.0)
    ap.add_argument("--p-term", type=float, default=0.12, help="share of attempts stopped by SIGTERM")
    ap.add_argument("--p-save", type=float, default=0.45, help="share of SIGKILLs aimed at a checkpoint write")
    ap.add_argument("--overhead", type=float, default=3.4, help="killed-run seconds per step / calibrated seconds per step (sizes the first round)")
    ap.add_argument("--hang-s", type=float, default=180)
    args = ap.parse_args()

    runner = Runner(args)
    rng = random.Random(args.seed)
    t_begin = time.time()
    t_step, t_start = calibrate(runner, args, args.work)
    log(f"calibration: {t_step:.3f} s per step, {t_start:.1f} s to the first step (one thread)")
    stats = {"sigkill": 0, "sigterm": 0, "kill_in_save": 0, "resumes": 0, "problems": [], "transient_bad": [], "round": 0}
    rounds = []
    # The killed runs (not the calibration, not the checks after each round) fill --minutes.
    while not rounds or sum(r["killed_seconds"] for r in rounds) < args.minutes * 60:
        left = args.minutes * 60 - sum(r["killed_seconds"] for r in rounds)
        # Seconds per final step of the killed run: from the last round, else the calibrated step
        # time times the overhead seen in development (the reference shares the CPU; kills redo
        # steps and restart the process): about 3.4 on 2 busy cores.
        per_step = rounds[-1]["killed_seconds"] / rounds[-1]["steps"] if rounds else args.overhead * t_step
        steps = args.steps if (args.steps and not rounds) else max(4 * args.save_steps, int(left / per_step))
        rounds.append(run_round(runner, args, rng, args.work, len(rounds) + 1, steps, t_step, t_start, stats))
    minutes = (time.time() - t_begin) / 60
    diff_final = max(r["max_loss_diff_final"] for r in rounds)
    diff_all = max(r["max_loss_diff_all_logged"] for r in rounds)
    verified = sum(r["checkpoints_verified"] for r in rounds)
    corrupt = [c for r in rounds for c in r["checkpoints_corrupt"]]
    adapters = all(r["adapter_identical"] for r in rounds)
    ok = diff_final <= args.tolerance and diff_all <= args.tolerance and not corrupt and adapters and not stats["problems"]
    summary = (f"soak {'PASS' if ok else 'FAIL'}: {minutes:.1f} min on {os.cpu_count()} cores "
               f"(killed run {sum(r['killed_seconds'] for r in rounds) / 60:.1f} min), {len(rounds)} round(s), "
               f"{sum(r['steps'] for r in rounds)} steps ({sum(r['steps_logged'] for r in rounds)} run incl. redone), "
               f"kills {stats['sigkill'] + stats['sigterm']} ({stats['sigkill']} SIGKILL / {stats['sigterm']} SIGTERM), "
               f"resumes {stats['resumes']}, SIGKILLs during a checkpoint write {stats['kill_in_save']}, "
               f"max |loss diff| {diff_final:g} (last value per step) / {diff_all:g} (every logged value; tolerance {args.tolerance:g}), "
               f"adapters {'identical' if adapters else 'DIFFER'}, checkpoints verified {verified}/{verified + len(corrupt)} "
               f"(CRC-32 + qlora resume + 1 step), problems {len(stats['problems'])}")
    with open(os.path.join(args.work, "summary.json"), "w") as f:
        json.dump({"summary": summary, "ok": ok, "minutes": minutes, "rounds": rounds, **stats}, f, indent=2)
    with open(os.path.join(args.work, "summary.txt"), "w") as f:
        f.write(summary + "\n")
        for p in stats["problems"] + corrupt:
            f.write("problem: " + p + "\n")
        for p in stats["transient_bad"]:
            f.write("seen right after a kill (not fatal unless still there at the end): " + p + "\n")
    for p in stats["problems"] + corrupt:
        print("[soak] problem: " + p)
    if stats["transient_bad"]:
        print(f"[soak] {len(stats['transient_bad'])} checkpoint dir(s) failed verification right after a kill (see summary.txt)")
    print(summary, flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
