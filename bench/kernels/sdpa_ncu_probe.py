"""Two cuDNN and two flash SDPA decode calls at one shape, nothing else: the torch side of an ncu
comparison with kvdn's decode (`kernels_bench --profile-decode B,CTX`). On the GPU machine:

  ncu --metrics gpu__time_duration.sum,dram__bytes_read.sum,\
dram__throughput.avg.pct_of_peak_sustained_elapsed --csv \
      --kernel-name regex:"cudnn|flash_fwd" python3 bench/kernels/sdpa_ncu_probe.py [B CTX]

Shapes as sdpa_peer.py (Llama-3-8B heads: 32 q / 8 kv, head_dim 128, bf16, contiguous KV).
bench/results/kernels-2026-12-01-hints.md has a run.
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

b, ctx = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) == 3 else (64, 32768)
QH, KVH, D = 32, 8, 128
q = torch.randn(b, QH, 1, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, KVH, ctx, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn(b, KVH, ctx, D, device="cuda", dtype=torch.bfloat16)
for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
    with sdpa_kernel([backend]):
        for _ in range(2):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
torch.cuda.synchronize()
print(f"batch {b} context {ctx}: kv bytes {2 * k.numel() * 2}")
