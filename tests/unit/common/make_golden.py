#!/usr/bin/env python3
"""Computes kvdn's golden hash vectors independently of kvdn's C++ code.

Builds each hash input byte-for-byte as ARCHITECTURE.md / chunk_key.h specify and hashes it with
`xxhsum` (Debian package `xxhash`, the reference xxHash CLI): -H3 = XXH3-64, -H2 = XXH3-128 printed
in canonical big-endian hex. Prints the values that golden_test.cc pins. Re-run after a deliberate
change of the format only.
"""
import struct
import subprocess
import tempfile

FORMAT_VERSION = 1
DTYPES = {"float16": 1, "bfloat16": 2, "float32": 3}


def xxh(data: bytes, algo: str) -> str:
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        out = subprocess.run(["xxhsum", algo, f.name], capture_output=True, text=True, check=True)
    line = out.stdout.strip()
    return line.split("=")[-1].strip() if "=" in line else line.split()[0]


def fingerprint(name, layers, heads, dim, dtype, tpc):
    b = struct.pack("<I", len(name)) + name.encode()
    b += struct.pack("<IIIIII", layers, heads, dim, DTYPES[dtype], tpc, FORMAT_VERSION)
    return xxh(b, "-H3")


def chain(ns, fp_hex, tokens, tpc, tail):
    h = xxh(struct.pack("<I", len(ns)) + ns.encode() + struct.pack("<Q", int(fp_hex, 16)), "-H2")
    keys = []
    n = len(tokens) // tpc + (1 if tail and len(tokens) % tpc else 0)
    for i in range(n):
        chunk = tokens[i * tpc:(i + 1) * tpc]
        h = xxh(bytes.fromhex(h) + struct.pack("<%di" % len(chunk), *chunk), "-H2")
        keys.append(f"{ns}/{fp_hex}/{h}")
    return keys


specs = [
    ("meta-llama/Meta-Llama-3-8B", 32, 8, 128, "bfloat16", 256),
    ("kvdn-golden", 2, 2, 8, "float16", 4),
]
for s in specs:
    print("fingerprint", s, fingerprint(*s))
fp = fingerprint(*specs[1])
tokens = [1, 2, 3, 4, 128000, 6, -1, 8, 9, 10]
for ns in ["default", "tenant-b"]:
    print("chain", ns, chain(ns, fp, tokens, 4, tail=True))
print("xxh3_64('kvdn')", xxh(b"kvdn", "-H3"))
print("xxh3_128('kvdn')", xxh(b"kvdn", "-H2"))

# A whole encoded chunk: fp16, 1 layer, 1 kv head, head_dim 2, 1 token -> payload of 2*1*1*2*2 = 8 bytes.
payload = bytes(range(1, 9))
hdr = struct.pack("<IHBBIIIIQQ", 0x4E44564B, FORMAT_VERSION, DTYPES["float16"], 0, 1, 1, 2, 1,
                  len(payload), int(xxh(payload, "-H3"), 16)) + bytes(16)
hdr += struct.pack("<Q", int(xxh(hdr, "-H3"), 16))
print("encoded_chunk", (hdr + payload).hex())
