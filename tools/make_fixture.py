#!/usr/bin/env python3
"""Derive the small test fixture from the full MiniLM Q/K/V file.

Reads ../shared/data/minilm_qkv.safetensors (keys `<text>.q|k|v` F16
[layers=6, heads=12, seq=512, head_dim=32] and `<text>.tokens` I32 [512]) and
writes tests/fixtures/minilm_small.safetensors with texts gpl3 and
json_decoder_py, layers 0, 3, 5, heads 0..4 and the first 256 tokens, keeping
the key names and dtypes. Pure Python 3 standard library (no numpy): the
safetensors header is parsed with struct/json and the raw bytes are sliced.

Usage (from the crate root):
    python3 tools/make_fixture.py [SOURCE] [DEST]
"""

import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_SRC = os.path.join(ROOT, "..", "shared", "data", "minilm_qkv.safetensors")
DEFAULT_DST = os.path.join(ROOT, "tests", "fixtures", "minilm_small.safetensors")

TEXTS = ["gpl3", "json_decoder_py"]
LAYERS = [0, 3, 5]
HEADS = [0, 1, 2, 3]
SEQ = 256
MAX_BYTES = 2 * 1024 * 1024
DTYPE_SIZE = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8}


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        sys.exit(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    return header, raw[8 + n :]


def tensor_bytes(header, data, name):
    info = header.get(name)
    if info is None:
        sys.exit(f"source lacks tensor `{name}`")
    start, end = info["data_offsets"]
    return info, data[start:end]


def slice_qkv(info, buf):
    """Select LAYERS x HEADS x first SEQ tokens of a [L, H, S, D] tensor."""
    if info["dtype"] not in ("F16", "BF16", "F32"):
        sys.exit(f"unexpected dtype {info['dtype']}")
    esize = DTYPE_SIZE[info["dtype"]]
    layers, heads, seq, dim = info["shape"]
    if max(LAYERS) >= layers or max(HEADS) >= heads or SEQ > seq:
        sys.exit(f"source shape {info['shape']} too small for the fixture selection")
    row = dim * esize
    out = bytearray()
    for l in LAYERS:
        for h in HEADS:
            base = ((l * heads + h) * seq) * row
            out += buf[base : base + SEQ * row]
    return bytes(out), [len(LAYERS), len(HEADS), SEQ, dim]


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SRC
    dst = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_DST
    header, data = read_safetensors(src)
    src_meta = header.get("__metadata__", {}) or {}

    tensors = []  # (name, dtype, shape, bytes)
    for text in TEXTS:
        info, buf = tensor_bytes(header, data, f"{text}.tokens")
        if info["dtype"] != "I32":
            sys.exit(f"{text}.tokens: expected I32, got {info['dtype']}")
        tensors.append((f"{text}.tokens", "I32", [SEQ], buf[: SEQ * 4]))
        for part in ("q", "k", "v"):
            info, buf = tensor_bytes(header, data, f"{text}.{part}")
            sliced, shape = slice_qkv(info, buf)
            tensors.append((f"{text}.{part}", info["dtype"], shape, sliced))

    # The safetensors convention: tensors laid out in sorted key order.
    tensors.sort(key=lambda t: t[0])
    out_header = {
        "__metadata__": {
            "model": src_meta.get("model", "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0)"),
            "scale": src_meta.get("scale", "1/sqrt(head_dim)"),
            "layout": src_meta.get("layout", "[layers, heads, seq, head_dim]"),
            "layer_ids": ",".join(str(l) for l in LAYERS),
            "head_ids": ",".join(str(h) for h in HEADS),
            "source": "derived from ../shared/data/minilm_qkv.safetensors by tools/make_fixture.py",
        }
    }
    offset = 0
    for name, dtype, shape, buf in tensors:
        out_header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(buf)]}
        offset += len(buf)
    hbytes = json.dumps(out_header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)  # pad the header to 8 bytes with spaces

    blob = struct.pack("<Q", len(hbytes)) + hbytes + b"".join(t[3] for t in tensors)
    if len(blob) > MAX_BYTES:
        sys.exit(f"fixture would be {len(blob)} bytes, over the {MAX_BYTES}-byte budget")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as f:
        f.write(blob)
    print(f"wrote {dst}: {len(blob)} bytes, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
