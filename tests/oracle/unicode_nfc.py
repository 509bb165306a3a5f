#!/usr/bin/env python3
"""Oracle (CPU): our Unicode NFC (src/data/unicode.cpp, unicode_nfc) against Python's unicodedata.

Writes test strings to $QLORA_NFC_ORACLE_DIR/in.txt (one a line, UTF-8 bytes in hex): every code
point 0..0x10FFFF except the surrogates, alone and followed by U+0301 and by U+0323, plus 20,000
random strings mixing Latin, combining marks, Hangul (jamo and syllables), Devanagari and CJK. The
hidden Catch test "[.nfc_oracle]" writes our NFC of each to out.txt; every one must equal
unicodedata.normalize("NFC", s).

Usage: python3 tests/oracle/unicode_nfc.py --tests build/qlora_tests
Exit 0: pass, 1: fail, 77: skipped (this Python's Unicode version is not the tables').
"""
import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import unicodedata

TABLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src", "data", "unicode_tables.cpp")


def tables_version():
    with open(TABLES, encoding="utf-8") as f:
        m = re.search(r'kUnicodeVersion = "([0-9.]+)"', f.read())
    return m.group(1) if m else None


def random_strings(n, rng):
    marks = [0x300, 0x301, 0x302, 0x303, 0x304, 0x306, 0x307, 0x308, 0x30A, 0x30B, 0x30C, 0x31B, 0x323,
             0x327, 0x328, 0x331, 0x345, 0x344, 0x340, 0x0F73, 0x05B0, 0x05BC, 0x0591, 0x1DCE, 0x20D2]
    pools = [
        list(range(0x41, 0x5B)) + list(range(0x61, 0x7B)) + [0x20, 0xC0, 0xC5, 0xE9, 0x1EA1, 0x212B, 0x2126],
        marks,
        list(range(0x1100, 0x1113)) + list(range(0x1161, 0x1176)) + list(range(0x11A7, 0x11C3)),
        [0xAC00, 0xAC01, 0xAC1C, 0xD7A3, 0xB098, 0x3131],
        list(range(0x900, 0x980)) + [0x0958, 0x0929, 0x0931, 0x0934],
        list(range(0x4E00, 0x4E10)) + [0xF900, 0xFA10, 0x2F800, 0x3000],
        [0x0B47, 0x0B3E, 0x0B56, 0x0B57, 0x0CC6, 0x0CC2, 0x0CD5, 0x0DD9, 0x0DCF, 0x0DDF, 0x1025, 0x102E],
    ]
    out = []
    for _ in range(n):
        k = rng.randint(1, 12)
        out.append("".join(chr(rng.choice(pools[rng.randrange(len(pools))])) for _ in range(k)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", default="build/qlora_tests")
    a = ap.parse_args()
    want_version = tables_version()
    if unicodedata.unidata_version != want_version:
        print(f"SKIP: this Python's unicodedata is Unicode {unicodedata.unidata_version}, "
              f"the tables are {want_version}")
        sys.exit(77)

    strings = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        strings += [c, c + "\u0301", c + "\u0323"]
    strings += random_strings(20000, random.Random(1234))

    with tempfile.TemporaryDirectory(prefix="qlora_nfc_oracle") as tmp:
        with open(os.path.join(tmp, "in.txt"), "w", encoding="ascii") as f:
            f.write("".join(s.encode("utf-8").hex() + "\n" for s in strings))
        env = dict(os.environ, QLORA_NFC_ORACLE_DIR=tmp)
        r = subprocess.run([a.tests, "[.nfc_oracle]"], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-4000:], r.stderr[-4000:])
            print("FAIL: the [.nfc_oracle] hook failed")
            sys.exit(1)
        with open(os.path.join(tmp, "out.txt"), encoding="ascii") as f:
            lines = f.read().split("\n")
    if len(lines) < len(strings) + 1 or lines[len(strings)] != "#version " + want_version:
        print(f"FAIL: the hook wrote {len(lines)} lines for {len(strings)} strings")
        sys.exit(1)
    bad = 0
    for s, ours in zip(strings, lines):
        want = unicodedata.normalize("NFC", s).encode("utf-8").hex()
        if ours != want:
            bad += 1
            if bad <= 10:
                print("DIFF %s: ours %s, unicodedata %s" % (
                    " ".join("U+%04X" % ord(c) for c in s), ours, want))
    if bad:
        print(f"FAIL: {bad} of {len(strings)} strings differ")
        sys.exit(1)
    print(f"OK: {len(strings)} strings, NFC equal to unicodedata (Unicode {want_version})")


if __name__ == "__main__":
    main()
