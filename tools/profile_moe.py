"""Per-kernel GPU times of the MoE launcher at the 350M-64E shapes (torch.profiler), and a check of each case
against a torch float32 computation on the GPU. Diagnostic for tuning; not part of the test suite.

    python3 tools/profile_moe.py            # 1, 8, 32, 512 and 4096 tokens
    python3 tools/profile_moe.py --ncu 8    # 8 tokens only, four calls with the weights cold (a 256 MB write
                                            # before each), no profiler of its own (PROFILE_MOE_EXPERTS=E:
                                            # routed over the first E experts only): for Nsight Compute, e.g.
    ncu --clock-control none -k regex:expert_ --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        python3 tools/profile_moe.py --ncu 8

`--clock-control none` leaves the GPU's clocks alone (ncu's default locks them to base clock while it profiles)."""
import os
import sys

import torch

from moetrt.plugins import launch

E, h, f = 64, 1024, 4096
dt = torch.float16
g = torch.Generator(device="cuda").manual_seed(0)
wg = torch.randn(E, h, device="cuda", generator=g) / h ** 0.5
w1 = (torch.randn(E, f, h, device="cuda", generator=g) / h ** 0.5).to(dt)
b1 = (0.1 * torch.randn(E, f, device="cuda", generator=g)).to(dt)
w2 = (torch.randn(E, h, f, device="cuda", generator=g) / f ** 0.5).to(dt)
b2 = (0.1 * torch.randn(E, h, device="cuda", generator=g)).to(dt)

if sys.argv[1:2] == ["--ncu"]:
    N = int(sys.argv[2])
    wg[int(os.environ.get("PROFILE_MOE_EXPERTS", E)):] = 0  # logits 0 there: the first E experts win
    x = torch.randn(N, h, device="cuda").to(dt)
    out = torch.empty((N, h), device="cuda", dtype=dt)
    ws = torch.zeros(launch.moe_workspace_size(N, h, f, E, 1, "fp16"), dtype=torch.uint8, device="cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(4):
        flush.zero_()
        launch.moe(x, wg, w1, b1, w2, b2, out, ws)
    torch.cuda.synchronize()
    print("experts hit", len(set(torch.argmax(x.float() @ wg.T, -1).tolist())))
    sys.exit()

for N in (1, 8, 32, 512, 4096):
    x = torch.randn(N, h, device="cuda").to(dt)
    out = torch.full((N, h), float("nan"), device="cuda", dtype=dt)
    ws = torch.zeros(launch.moe_workspace_size(N, h, f, E, 1, "fp16"), dtype=torch.uint8, device="cuda")
    for _ in range(3):
        launch.moe(x, wg, w1, b1, w2, b2, out, ws)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            launch.moe(x, wg, w1, b1, w2, b2, out, ws)
        torch.cuda.synchronize()
    print(f"--- N={N}")
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA or getattr(evt, "device_time", 0):
            t = getattr(evt, "device_time", None) or getattr(evt, "cuda_time", 0)
            print(f"  {evt.key[:70]:70s} {t:9.1f} us x{evt.count}")
    # reference in fp32 on the GPU
    p = torch.softmax(x.float() @ wg.T, -1)
    wt, ex = p.max(-1)
    ref = torch.zeros(N, h, device="cuda")
    for e in torch.unique(ex).tolist():
        idx = (ex == e).nonzero()[:, 0]
        a = torch.nn.functional.gelu(x[idx].float() @ w1[e].float().T + b1[e].float(), approximate="tanh")
        ref[idx] = wt[idx, None] * (a @ w2[e].float().T + b2[e].float())
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(f"  rel err vs fp32 torch: {err:.2e}  NaN: {torch.isnan(out).any().item()}  experts hit: {len(torch.unique(ex))}")
