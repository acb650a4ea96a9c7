#!/usr/bin/env python3
"""torch SDPA decode attention (flash and cuDNN backends) for the shapes kernels_bench times.

Same shapes (Llama-3-8B: 32 q heads, 8 kv heads, head_dim 128, bf16, one query token), KV
contiguous [batch, kv_heads, context, 128] with enable_gqa, cold L2 (KV sets rotated, > 2x L2 in
all); GPU time per call from CUDA graph replays (as kernels_bench times kvdn) and, for
reference, one eager call timed with CUDA events (Python and launch overhead included). With
--ours (kernels_bench --json), prints the merged table: kvdn (auto) beside the faster SDPA backend.

  python3 sdpa_peer.py [--quick] [--json out.json] [--ours kernels.json]
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

QH, KVH, D = 32, 8, 128


def time_us(fn, reps=30, warmup=5):
    times = []
    for i in range(reps + warmup):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        if i >= warmup:
            times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    return times[len(times) // 2]


def graph_us(fn, pools, reps=20):
    """GPU microseconds per call from CUDA graph replays: max(pools, 10) calls (KV sets rotated)
    captured in one graph, median over `reps` replays (kernels_bench times kvdn the same way)."""
    per_graph = max(pools, 10)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (backend plans, workspaces)
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(per_graph):
            fn(i)
    return time_us(lambda i: g.replay(), reps=reps, warmup=3) / per_graph


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--ours")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    batches = [1, 8, 64] if args.quick else [1, 8, 32, 64, 128]
    contexts = [1024, 32768] if args.quick else [1024, 4096, 16384, 32768]
    print(f"# sdpa_peer on {props.name}, torch {torch.__version__}")
    rows = []
    for b in batches:
        for ctx in contexts:
            kv_bytes = 2 * b * KVH * ctx * D * 2
            pools = max(1, min(64, math.ceil(2.5 * l2 / kv_bytes)))
            if pools == 1 and kv_bytes < 4 * l2:
                pools = 2
            q = torch.randn(b, QH, 1, D, device="cuda", dtype=torch.bfloat16)
            ks = [torch.randn(b, KVH, ctx, D, device="cuda", dtype=torch.bfloat16) for _ in range(pools)]
            vs = [torch.randn(b, KVH, ctx, D, device="cuda", dtype=torch.bfloat16) for _ in range(pools)]
            row = {"batch": b, "context": ctx, "kv_bytes": kv_bytes}
            ref = None
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel([backend]):
                        out = F.scaled_dot_product_attention(q, ks[0], vs[0], enable_gqa=True)
                        if ref is None:
                            ref = out.float()
                        else:
                            err = ((out.float() - ref).norm() / ref.norm()).item()
                            if err > 1e-2:
                                raise RuntimeError(f"{name} disagrees with flash: {err:.2e}")
                        call = lambda i: F.scaled_dot_product_attention(
                            q, ks[i % pools], vs[i % pools], enable_gqa=True)
                        row[name + "_eager_us"] = time_us(call)
                        row[name + "_us"] = graph_us(call, pools)
                except Exception as e:  # a backend that does not take this shape
                    row[name + "_us"] = None
                    row[name + "_error"] = str(e).splitlines()[0][:120]
            rows.append(row)
            f, c = row.get("flash_us"), row.get("cudnn_us")
            print(f"batch {b:4d} ctx {ctx:6d}: flash {f if f is None else round(f, 1)} us, "
                  f"cudnn {c if c is None else round(c, 1)} us", flush=True)
            del ks, vs, q
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    if args.ours:
        ours = {(r["batch"], r["context"]): r for r in json.load(open(args.ours)) if r["kind"] == "decode"}
        print("\n| batch | context | KV MiB | kvdn auto us | flash us | cuDNN us | faster SDPA / kvdn | KV >= 64 MB "
              "| kvdn eager us | faster SDPA eager us |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            o = ours.get((r["batch"], r["context"]))
            if not o:
                continue
            peers = [x for x in (r.get("flash_us"), r.get("cudnn_us")) if x]
            best = min(peers) if peers else None
            fmt = lambda x: "n/a" if x is None else f"{x:.1f}"
            ratio = "n/a" if best is None else f"{best / o['auto_us']:.2f}"
            print(f"| {r['batch']} | {r['context']} | {r['kv_bytes'] / 2**20:.0f} | {o['auto_us']:.1f} | "
                  f"{fmt(r.get('flash_us'))} | {fmt(r.get('cudnn_us'))} | {ratio} | "
                  f"{'yes' if r['kv_bytes'] >= 64e6 else 'no'} | {fmt(o.get('auto_eager_us'))} | "
                  f"{fmt(min([x for x in (r.get('flash_eager_us'), r.get('cudnn_eager_us')) if x], default=None))} |")


if __name__ == "__main__":
    main()
