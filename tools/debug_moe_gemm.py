"""Dump the MoE routing workspace after one grouped-GEMM call (diagnostic)."""
import numpy as np
import torch

from moetrt.plugins import launch

N, E, h, f, k = 200, 8, 64, 256, 1
dt = torch.float16
wg = torch.randn(E, h, device="cuda") / h ** 0.5
w1 = (torch.randn(E, f, h, device="cuda") / h ** 0.5).to(dt)
b1 = torch.zeros(E, f, device="cuda", dtype=dt)
w2 = (torch.randn(E, h, f, device="cuda") / f ** 0.5).to(dt)
b2 = torch.zeros(E, h, device="cuda", dtype=dt)
x = torch.randn(N, h, device="cuda").to(dt)
out = torch.full((N, h), float("nan"), device="cuda", dtype=dt)
ws = torch.zeros(launch.moe_workspace_size(N, h, f, E, k, "fp16"), dtype=torch.uint8, device="cuda")
launch.moe(x, wg, w1, b1, w2, b2, out, ws)
torch.cuda.synchronize()
raw = ws.cpu().numpy()
A = N * k
sizes = [("logits", N * E * 4), ("expert_of", A * 4), ("prob", A * 4), ("loc", A * 4), ("pos_of", A * 4),
         ("perm", A * 4), ("counts", E * 4), ("offsets", (E + 1) * 4), ("active", (E + 1) * 4),
         ("tile_start", (E + 1) * 4)]
off = 0
for name, size in sizes:
    arr = raw[off:off + size].view(np.float32 if name in ("logits", "prob") else np.int32)
    if name not in ("logits", "prob", "loc", "pos_of", "perm"):
        print(name, arr.tolist())
    off += (size + 255) // 256 * 256
print("expert_of head", raw[256 * ((N * E * 4 + 255) // 256):][:40].view(np.int32).tolist())
print("out nan:", torch.isnan(out).any().item(), "out abs mean", out.float().abs().mean().item())
