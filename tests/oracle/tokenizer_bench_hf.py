#!/usr/bin/env python3
"""Baseline for `qlora bench tokenizer`: HF `tokenizers` (Rust) encoding the same text file, one
thread and all threads (RAYON_NUM_THREADS), so the two MB/s figures come from the same machine
and text. The text is cut as `qlora bench tokenizer --text` cuts it (64 KiB, extended to the end of
the line) and encoded with encode_batch, no special tokens; median of 3 runs. Also per line (encode_batch over
the lines), HF's faster mode on this text, so the baseline is its best.

    for t in 1 2; do RAYON_NUM_THREADS=$t .venv/bin/python tests/oracle/tokenizer_bench_hf.py \
        ../shared/assets/tokenizers/llama3/tokenizer.json kjv.txt; done
Prints MB/s and the token count (which must equal ours: a cheap cross-check of the whole text).
"""
import os
import sys
import time

try:
    from tokenizers import Tokenizer
except ImportError:
    print("tokenizer_bench_hf: the tokenizers package is missing: skipped")
    sys.exit(77)

if len(sys.argv) != 3:
    print(__doc__)
    sys.exit(2)
tok = Tokenizer.from_file(sys.argv[1])
data = open(sys.argv[2], "rb").read()
chunks, pos = [], 0
while pos < len(data):
    nl = data.find(b"\n", min(len(data), pos + (64 << 10)))
    end = len(data) if nl < 0 else nl + 1
    chunks.append(data[pos:end].decode("utf-8"))
    pos = end
text = data


def timed(pieces):
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        enc = tok.encode_batch(pieces, add_special_tokens=False)
        times.append(time.perf_counter() - t0)
    times.sort()
    return len(text) / times[1] / 1e6, sum(len(e.ids) for e in enc)


threads = os.environ.get("RAYON_NUM_THREADS", "all")
for name, pieces in (("64 KiB chunks", chunks), ("lines", data.decode("utf-8").splitlines(keepends=True))):
    mbs, tokens = timed(pieces)
    print(f"HF tokenizers, {threads} thread(s), {name}: {mbs:.2f} MB/s, {tokens} tokens, {len(pieces)} pieces")
