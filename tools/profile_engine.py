"""Where a step's GPU time goes: per-kernel times (torch.profiler / CUPTI) of eager decode and prefill steps of
an engine on the GPU runtime, and the host time to enqueue a step. Diagnostic; not part of the test suite.

    python tools/profile_engine.py ENGINE [B,T ...]
"""

import sys
import time
from collections import defaultdict

import numpy as np
import torch

from moetrt.engines.runtime import Runtime

engine = sys.argv[1]
shapes = [tuple(int(v) for v in s.split(",")) for s in sys.argv[2:]] or [(1, 1), (8, 1), (1, 128), (1, 512)]
rt = Runtime(engine, device="cuda", use_graphs=False)
rng = np.random.default_rng(0)
for B, T in shapes:
    ids = rng.integers(0, rt.config.vocab_size, (B, T)).astype(np.int32)
    past = np.full(B, 128 if T == 1 else 0, np.int32)
    rows = None if T == 1 else (np.arange(B) * T + T - 1).astype(np.int32)
    for _ in range(3):
        rt._enqueue(ids, past, rows)
    rt.engine.stream.synchronize()
    plan = rt.engine.plan(B, T, None if rows is None else len(rows))
    t = time.perf_counter()
    for _ in range(5):
        plan.run()
    host_ms = (time.perf_counter() - t) * 1e3 / 5
    rt.engine.stream.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            plan.run()
        rt.engine.stream.synchronize()
    per = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += 1
            per[e.name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(v[1] for v in per.values()) / 5
    print(f"--- B={B} T={T}: {len(plan.launches)} launches, host enqueue {host_ms:.2f} ms, kernel time {total / 1e3:.3f} ms/step")
    for name, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:14]:
        print(f"  {us / 5:9.1f} us/step  x{n // 5:4d}  {name[:110]}")
rt.close()
