#!/usr/bin/env python3
"""Oracle (CPU): our GGUF files against llama.cpp's `gguf` package (gguf-py), both directions.

A. qlora -> gguf: the hidden Catch test "[.gguf_oracle]" writes qlora.gguf and qlora_a64.gguf
   (every metadata value type, arrays of each, every ggml type qlora knows; alignment 32 and 64)
   with <name>.json saying what they hold; gguf.GGUFReader must read the same keys in the same
   order, the same value types and values, the same tensor names, types, dims and bytes.
B. gguf -> qlora: gguf.GGUFWriter writes py.gguf and py_a64.gguf; the same hidden test reads them
   with our reader into <name>.read.json, which must hold what was written.

Usage: PYTHONPATH=<dir with gguf> .venv/bin/python tests/oracle/gguf_read.py --tests build-b/qlora_tests
Exit 0: pass, 1: fail, 77: skipped (the gguf package is missing).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as Q, GGUFValueType as V
except ImportError as e:
    print(f"SKIP: {e} (pip install --target DIR gguf; PYTHONPATH=DIR)")
    sys.exit(77)

failures = []
Q8_1_STALE = {q for q, (block, size) in gguf.GGML_QUANT_SIZES.items() if q == Q.Q8_1 and size != 36}


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)


def field_json(field):
    """A GGUFReader field as {type, array_type?, value} (the shape our JSON dump has)."""
    t = field.types[0]
    out = {"type": "bool" if t == V.BOOL else t.name.lower()}
    if t == V.ARRAY:
        sub = field.types[-1] if len(field.types) > 1 else V.UINT8  # an empty array has no element type here
        out["array_type"] = "bool" if sub == V.BOOL else sub.name.lower()
    out["value"] = field.contents()
    return out


def part_a(tmp):
    for name in ("qlora", "qlora_a64"):
        path = os.path.join(tmp, name + ".gguf")
        with open(os.path.join(tmp, name + ".json")) as f:
            want = json.load(f)
        r = gguf.GGUFReader(path)
        check(r.alignment == want["alignment"], f"A {name}: alignment {r.alignment} != {want['alignment']}")
        keys = [k for k in r.fields if not k.startswith("GGUF.")]
        check(keys == [m["key"] for m in want["metadata"]], f"A {name}: keys {keys}")
        check(r.fields["GGUF.version"].contents() == 3, f"A {name}: version")
        for m in want["metadata"]:
            if m["key"] not in r.fields:
                continue
            got = field_json(r.fields[m["key"]])
            exp = {k: v for k, v in m.items() if k != "key"}
            check(got == exp, f"A {name}: {m['key']}: gguf reads {got}, we wrote {exp}")
        check(len(r.tensors) == len(want["tensors"]), f"A {name}: {len(r.tensors)} tensors")
        for t, w in zip(r.tensors, want["tensors"]):
            tag = f"A {name}: tensor {w['name']}"
            check(t.name == w["name"], f"{tag}: name {t.name}")
            check(t.tensor_type.name == w["type"].upper(), f"{tag}: type {t.tensor_type.name} != {w['type']}")
            check([int(d) for d in t.shape] == w["dims"], f"{tag}: dims {list(t.shape)} != {w['dims']}")
            if w["type"] == "q8_1" and Q.Q8_1 in Q8_1_STALE:
                # gguf-py's GGML_QUANT_SIZES still has q8_1 as float d, float s (40 bytes); ggml's
                # block_q8_1 is two fp16 (36 bytes, ggml-common.h). q8_1 is an activation type no
                # model file stores: names, dims and offsets are still checked.
                continue
            check(int(t.n_bytes) == w["nbytes"], f"{tag}: n_bytes {t.n_bytes} != {w['nbytes']}")
            check(t.data.tobytes() == bytes.fromhex(w["data_hex"]), f"{tag}: bytes differ")
            check(t.data_offset % r.alignment == 0, f"{tag}: data offset {t.data_offset} not aligned")
        print(f"A {name}: {len(keys)} keys and {len(r.tensors)} tensors read by gguf.GGUFReader")


# What part B writes: key -> (value type, array element type, value)
B_META = [
    ("s.uint8", V.UINT8, None, 250), ("s.int8", V.INT8, None, -3), ("s.uint16", V.UINT16, None, 65000),
    ("s.int16", V.INT16, None, -2), ("s.uint32", V.UINT32, None, 4000000000), ("s.int32", V.INT32, None, -7),
    ("s.uint64", V.UINT64, None, 2**64 - 1), ("s.int64", V.INT64, None, -(2**63)), ("s.float32", V.FLOAT32, None, 0.5),
    ("s.float64", V.FLOAT64, None, 0.1), ("s.bool", V.BOOL, None, True), ("s.string", V.STRING, None, "h\u00e9llo \u2581"),
    ("a.string", V.ARRAY, V.STRING, ["<s>", "", "\u0120the"]), ("a.int32", V.ARRAY, V.INT32, [1, -2, 2**31 - 1]),
    ("a.uint8", V.ARRAY, V.UINT8, [0, 255]), ("a.uint64", V.ARRAY, V.UINT64, [2**64 - 1, 5]),
    ("a.float32", V.ARRAY, V.FLOAT32, [0.25, -1.5]), ("a.float64", V.ARRAY, V.FLOAT64, [0.1, 1e300]),
    ("a.bool", V.ARRAY, V.BOOL, [True, False, True]),
]


def b_tensors():
    g = np.random.default_rng(3)
    f32 = g.standard_normal((3, 5)).astype(np.float32)          # numpy shape (3, 5): ggml dims [5, 3]
    f16 = g.standard_normal((7,)).astype(np.float16)
    q8 = g.integers(0, 256, (2, 2 * 34), dtype=np.uint8)       # 2 rows of 64 q8_0 elements
    q4k = g.integers(0, 256, (1, 144), dtype=np.uint8)         # one q4_K super-block
    return [("w.f32", f32, None, [5, 3], "f32"), ("w.f16", f16, None, [7], "f16"),
            ("w.q8_0", q8, Q.Q8_0, [64, 2], "q8_0"), ("w.q4_k", q4k, Q.Q4_K, [256, 1], "q4_K")]


def write_b(path, alignment):
    w = gguf.GGUFWriter(path, arch="llama")  # writes general.architecture first
    if alignment != 32:
        w.add_custom_alignment(alignment)
    for key, t, sub, val in B_META:
        w.add_key_value(key, val, t, sub_type=sub)
    for name, arr, raw, _, _ in b_tensors():
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def part_b(tmp):
    for name, alignment in (("py", 32), ("py_a64", 64)):
        with open(os.path.join(tmp, name + ".read.json")) as f:
            got = json.load(f)
        check(got["alignment"] == alignment, f"B {name}: alignment {got['alignment']}")
        meta = {m["key"]: m for m in got["metadata"]}
        check(meta.get("general.architecture", {}).get("value") == "llama", f"B {name}: general.architecture")
        for key, t, sub, val in B_META:
            m = meta.get(key)
            if m is None:
                check(False, f"B {name}: {key} missing")
                continue
            exp = {"type": "bool" if t == V.BOOL else t.name.lower(), "value": val}
            if sub is not None:
                exp["array_type"] = "bool" if sub == V.BOOL else sub.name.lower()
            if t == V.FLOAT32:
                exp["value"] = float(np.float32(val))
            if sub == V.FLOAT32:
                exp["value"] = [float(np.float32(x)) for x in val]
            check({k: v for k, v in m.items() if k != "key"} == exp, f"B {name}: {key}: we read {m}, gguf wrote {exp}")
        tensors = {t["name"]: t for t in got["tensors"]}
        for tname, arr, _, dims, tt in b_tensors():
            t = tensors.get(tname)
            if t is None:
                check(False, f"B {name}: tensor {tname} missing")
                continue
            check(t["dims"] == dims, f"B {name}: {tname} dims {t['dims']} != {dims}")
            check(t["type"] == tt, f"B {name}: {tname} type {t['type']} != {tt}")
            check(bytes.fromhex(t["data_hex"]) == arr.tobytes(), f"B {name}: {tname} bytes differ")
        print(f"B {name}: {len(got['metadata'])} keys and {len(got['tensors'])} tensors written by gguf.GGUFWriter read by qlora")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", required=True, help="the qlora_tests binary")
    args = ap.parse_args()
    try:
        from importlib.metadata import version
        ver = version("gguf")
    except Exception:  # noqa: BLE001 (a source checkout has no metadata)
        ver = "?"
    print(f"gguf package {ver} from {os.path.dirname(gguf.__file__)}")
    with tempfile.TemporaryDirectory(prefix="qlora_gguf_oracle_") as tmp:
        write_b(os.path.join(tmp, "py.gguf"), 32)
        write_b(os.path.join(tmp, "py_a64.gguf"), 64)
        r = subprocess.run([args.tests, "[.gguf_oracle]"], env={**os.environ, "QLORA_GGUF_ORACLE_DIR": tmp},
                           capture_output=True, text=True)
        for line in r.stdout.splitlines():
            if line.startswith("gguf oracle:"):
                print(line)
        if r.returncode != 0:
            check(False, f"[.gguf_oracle] failed: {r.stdout[-3000:]}{r.stderr[-2000:]}")
        else:
            part_a(tmp)
            part_b(tmp)
    if failures:
        print(f"{len(failures)} failure(s)")
        return 1
    print("gguf oracle: pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
