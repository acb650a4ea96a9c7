# Temporary: one cuDNN and one flash SDPA decode call at batch 64 x 32K for ncu (not committed).
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
b, QH, KVH, ctx, D = 64, 32, 8, 32768, 128
q = torch.randn(b, QH, 1, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, KVH, ctx, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn(b, KVH, ctx, D, device="cuda", dtype=torch.bfloat16)
for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
    with sdpa_kernel([backend]):
        for _ in range(2):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
torch.cuda.synchronize()
print("kv bytes", 2 * k.numel() * 2)
