"""The MoE layer of the 350M-64E shapes at N tokens, for Nsight Compute (on the GPU machine): weights cold in DRAM
(a 256 MB flush before each call), four calls.

    ncu --clock-control none -k regex:expert_ --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy python3 tools/ncu_moe.py 8

`--clock-control none` leaves the GPU's clocks alone (ncu's default locks them to base clock while it profiles).
Kernels profiled one at a time run without their neighbours' overlap, so durations differ from a graph's; the
throughput percentages and stall figures are what this is for."""
import sys

import torch

from moetrt.plugins import launch

E, h, f = 64, 1024, 4096
N = int(sys.argv[1]) if len(sys.argv) > 1 else 8
dt = torch.float16
g = torch.Generator(device="cuda").manual_seed(0)
wg = torch.randn(E, h, device="cuda", generator=g) / h ** 0.5
w1 = (torch.randn(E, f, h, device="cuda", generator=g) / h ** 0.5).to(dt)
b1 = (0.1 * torch.randn(E, f, device="cuda", generator=g)).to(dt)
w2 = (torch.randn(E, h, f, device="cuda", generator=g) / f ** 0.5).to(dt)
b2 = (0.1 * torch.randn(E, h, device="cuda", generator=g)).to(dt)
x = torch.randn(N, h, device="cuda").to(dt)
out = torch.empty((N, h), device="cuda", dtype=dt)
ws = torch.zeros(launch.moe_workspace_size(N, h, f, E, 1, "fp16"), dtype=torch.uint8, device="cuda")
flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
for _ in range(4):
    flush.zero_()
    launch.moe(x, wg, w1, b1, w2, b2, out, ws)
torch.cuda.synchronize()
print("experts hit", len(set(torch.argmax(x.float() @ wg.T, -1).tolist())))
