"""py_connector_bench: kvdn's Python connector (python/kvdn, ctypes over libkvdn_c.so) loading a
request's KV from a real kvdnd into a vLLM-layout paged cache on the GPU, layer by layer, as a
PyTorch engine would call it; beside, in the same run, the ceilings (a device-to-device copy and a
host-to-device copy from page-locked memory of the same bytes, through torch). The peer, the same
load through the C++ KvConnector, is connector_bench (same shapes): run it in the same session.

Llama-3-8B shapes: 32 layers, 8 kv heads, head_dim 128, bf16, 256-token chunks (32 MiB), vLLM's
FlashAttention layout [2, num_blocks, 16, 8, 128] per layer, shuffled block tables.

  PYTHONPATH=python:tests/python KVDN_C_LIBRARY=build/default/lib/libkvdn_c.so \\
    python3 bench/connector/py_connector_bench.py --kvdnd build/default/bin/kvdnd \\
    [--contexts 8192,32768] [--rounds 5] [--gpu-tier-mib 0]
"""

import argparse
import os
import random
import statistics
import sys
import time

import torch

import kvdn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "python"))
from kvdnd_process import KvdndProcess  # noqa: E402

LAYERS, HEADS, DIM, BLOCK, CHUNK = 32, 8, 128, 16, 256
BYTES_PER_TOKEN = 2 * LAYERS * HEADS * DIM * 2


def cache(num_blocks, fill):
    shape = (2, num_blocks, BLOCK, HEADS, DIM)
    if fill:
        return [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    return [torch.empty(shape, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]


def table(ctx, num_blocks, seed):
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    return torch.tensor(ids[:ctx // BLOCK], dtype=torch.int32, device="cuda")


def timed(fn, rounds):
    out = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvdnd", required=True)
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gpu-tier-mib", type=int, default=0)
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    os.environ["KVDN_KVDND"] = args.kvdnd
    total = sum(contexts) * BYTES_PER_TOKEN
    extra = ["--gpu-tier-bytes", str(args.gpu_tier_mib << 20)] if args.gpu_tier_mib else []
    daemon = KvdndProcess(extra_args=extra, host_tier=str(total + (2 << 30)),
                          disk_tier=str(1 << 30))
    print(f"GPU: {torch.cuda.get_device_name()}; kvdnd GPU tier {args.gpu_tier_mib} MiB; "
          f"{args.rounds} rounds, median (min) ms")
    print("| context | KV MiB | python load ms | GB/s | GPU-tier chunks | d2d copy ms (GB/s) | "
          "h2d pinned ms (GB/s) | load / d2d | load / h2d |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        model = kvdn.ModelSpec("llama-3-8b-bench", LAYERS, HEADS, DIM, "bfloat16", CHUNK)
        with kvdn.Client(model, target=daemon.unix_target, namespace="bench",
                         receive_pool_bytes=1 << 30) as client:
            conn = kvdn.KvConnector(client, use_gpu_tier=args.gpu_tier_mib > 0)
            for ctx in contexts:
                nbytes = ctx * BYTES_PER_TOKEN
                num_blocks = ctx // BLOCK + 64
                tokens = [random.Random(ctx).randrange(128000) for _ in range(ctx)]
                a, b = cache(num_blocks, True), cache(num_blocks, False)
                va = kvdn.PagedKvView.from_vllm(a, table(ctx, num_blocks, 1))
                vb = kvdn.PagedKvView.from_vllm(b, table(ctx, num_blocks, 2))
                saved = conn.save(tokens, va)
                assert saved.chunks_stored == ctx // CHUNK, saved
                stats = []

                def load():
                    ld = conn.start_load(tokens, vb)
                    stream = torch.cuda.current_stream()
                    for layer in range(LAYERS):
                        ld.wait_layer(layer, stream)
                    r = ld.wait()
                    assert r.tokens == ctx, r
                    stats.append(ld.stats().gpu_tier_chunks)
                    ld.close()

                load()  # untimed: the first load promotes chunks into the GPU tier when it has one
                t = timed(load, args.rounds)
                src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
                dst = torch.empty_like(src)
                d2d = timed(lambda: dst.copy_(src), args.rounds)
                del src, dst
                pinned_bytes = min(nbytes, 1 << 30)
                host = torch.empty(pinned_bytes, dtype=torch.uint8, pin_memory=True)
                dev = torch.empty(pinned_bytes, dtype=torch.uint8, device="cuda")
                h2d = [s * nbytes / pinned_bytes for s in
                       timed(lambda: dev.copy_(host, non_blocking=True), args.rounds)]
                del host, dev
                m, d, h = statistics.median(t), statistics.median(d2d), statistics.median(h2d)
                print(f"| {ctx} | {nbytes >> 20} | {m * 1e3:.1f} ({min(t) * 1e3:.1f}) | "
                      f"{nbytes / m / 1e9:.1f} | {stats[-1]} of {ctx // CHUNK} | "
                      f"{d * 1e3:.2f} ({nbytes / d / 1e9:.0f}) | {h * 1e3:.1f} "
                      f"({nbytes / h / 1e9:.1f}) | {d / m:.2f} | {h / m:.2f} |", flush=True)
                del a, b, va, vb
                torch.cuda.empty_cache()
            conn.close()
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()
