#!/usr/bin/env python3
"""Oracle (CPU): our ggml dequantization (src/quant/ggml_dequant.cpp) against gguf-py's
gguf.quants.dequantize, on random blocks of every type we read.

For each type (f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_K, q5_K, q6_K) the script makes
random raw blocks (random quant bytes; the fp16 scale fields set to finite random values so that
no NaN/inf hides a difference), in two shapes (a matrix whose rows are several blocks, and odd
row counts), writes them into blocks.gguf with gguf.GGUFWriter (raw_dtype), runs the hidden Catch
test "[.ggml_dequant_oracle]" (QLORA_GGML_DEQUANT_DIR), which reads the file with our reader and
writes ours.safetensors via gguf_tensor_to_float, and compares with gguf.quants.dequantize of the
same bytes: shapes equal, values bit-identical or, failing that, within 1e-6 relative (counted
and reported separately).

Usage: .venv/bin/python tests/oracle/ggml_dequant.py --tests build/qlora_tests
Exit 0: pass, 1: fail, 77: skipped (numpy, gguf or safetensors missing).
"""
import argparse
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize
    from safetensors.numpy import load_file
except ImportError as e:
    print(f"SKIP: {e} (needs numpy, safetensors and gguf: pip install gguf)")
    sys.exit(77)

# (type, byte offsets of its fp16 fields within a block)
TYPES = [
    (Q.F32, None), (Q.F16, None), (Q.BF16, None),
    (Q.Q4_0, [0]), (Q.Q4_1, [0, 2]), (Q.Q5_0, [0]), (Q.Q5_1, [0, 2]), (Q.Q8_0, [0]),
    (Q.Q4_K, [0, 2]), (Q.Q5_K, [0, 2]), (Q.Q6_K, [208]),
]
SHAPES = [(3, 2), (7, 1), (5, 3)]  # (rows, blocks per row) -- odd row counts, multi-block rows


def make(qt, halves, rows, blocks, rng):
    block, size = gguf.GGML_QUANT_SIZES[qt]
    n = blocks * block
    if qt == Q.F32:
        return rng.standard_normal((rows, n)).astype(np.float32), np.float32
    if qt == Q.F16:
        return (rng.standard_normal((rows, n)) * 3).astype(np.float16), np.float16
    if qt == Q.BF16:
        f = (rng.standard_normal((rows, n)) * 3).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16), None
    raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    for off in halves:
        h = (rng.standard_normal((rows, blocks)) * 0.05).astype(np.float16)
        raw[:, :, off:off + 2] = h.view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, blocks * size), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", required=True, help="the qlora_tests binary")
    args = ap.parse_args()
    rng = np.random.default_rng(1234)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "blocks.gguf")
        w = gguf.GGUFWriter(path, "llama")
        expected = {}
        for qt, halves in TYPES:
            for rows, blocks in SHAPES:
                name = f"{qt.name.lower()}_{rows}x{blocks}"
                data, native = make(qt, halves, rows, blocks, rng)
                n = blocks * gguf.GGML_QUANT_SIZES[qt][0]
                if native is not None:
                    w.add_tensor(name, data)
                    raw = data
                else:
                    byte_shape = data.shape if qt != Q.BF16 else (rows, n * 2)
                    raw = data.view(np.uint8).reshape(byte_shape)
                    w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qt)
                expected[name] = np.asarray(dequantize(raw if native is None else data, qt), dtype=np.float32).reshape(rows, n)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        env = dict(os.environ, QLORA_GGML_DEQUANT_DIR=tmp)
        r = subprocess.run([args.tests, "[.ggml_dequant_oracle]"], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-4000:], r.stderr[-4000:])
            print("FAIL: the hook failed")
            return 1
        ours = load_file(os.path.join(tmp, "ours.safetensors"))
        for name, want in expected.items():
            got = ours.get(name)
            if got is None:
                failures.append(f"{name}: missing from ours")
                continue
            if got.shape != want.shape:
                failures.append(f"{name}: shape {got.shape} != gguf-py {want.shape}")
                continue
            exact = np.array_equal(got.view(np.uint32), want.view(np.uint32))
            close = np.allclose(got, want, rtol=1e-6, atol=1e-7 * float(np.abs(want).max() + 1e-30))
            diff = float(np.abs(got - want).max())
            print(f"{name:14s} {str(got.shape):10s} {'bit-exact' if exact else f'max |diff| {diff:.3g}'}")
            if not close:
                failures.append(f"{name}: max |diff| {diff:.3g} (max |x| {float(np.abs(want).max()):.3g})")
    for f in failures:
        print("FAIL:", f)
    print("PASS" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
