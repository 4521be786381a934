"""Where a decode step's time goes inside its CUDA graph, programmatic launch on (on the GPU machine).

    python3 tools/graph_timeline.py ENGINE [BATCH ...]

Captures the decode graph of each batch size, profiles 20 replays (torch.profiler / CUPTI: kernel start and end
times inside the graph) and charges each kernel the time from the end of the kernel before it to its own end:
with programmatic launch a kernel starts early and waits, so its start says little, but these increments add
up to the step. Prints them summed per kernel name; with TRACE=N also the first N kernels of one replay (start
and end from the replay's first start, in us). Diagnostic; not part of the test suite."""
import os
import sys
from collections import defaultdict

import numpy as np
import torch

from moetrt.engines.runtime import Runtime

engine = sys.argv[1]
batches = [int(b) for b in sys.argv[2:]] or [1, 8]
REPLAYS = 20
with Runtime(engine, device="cuda") as rt:
    rng = np.random.default_rng(0)
    for B in batches:
        rt.generate(rng.integers(0, rt.config.vocab_size, (B, 128)).tolist(), 4)
        graph = rt.graphs[next(b for b in sorted(rt.graphs) if b >= B)]
        for _ in range(5):
            graph.launch()
        rt.engine.stream.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(REPLAYS):
                graph.launch()
            rt.engine.stream.synchronize()
        kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                          if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[1])
        trace = int(os.environ.get("TRACE", "0"))
        if trace:
            first = sorted(kernels[len(kernels) // REPLAYS * (REPLAYS - 1):])  # the last replay, by start
            t0 = first[0][0]
            for start, end, name in first[:trace]:
                print(f"  {start - t0:9.2f} {end - t0:9.2f} {end - start:7.2f}  {name[:90]}")
        per = defaultdict(lambda: [0, 0.0])
        for (_, prev_end, _), (_, end, name) in zip(kernels, kernels[1:]):
            per[name][0] += 1
            per[name][1] += end - prev_end
        step = sum(us for _, us in per.values()) / REPLAYS
        print(f"--- batch {B}: {len(kernels) // REPLAYS} kernels a step, {step:.1f} us a step "
              "(end-to-end increments, summed per kernel)")
        for name, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:16]:
            print(f"  {us / REPLAYS:8.1f} us/step  x{n // REPLAYS:4d}  {us / n:6.2f} us each  {name[:100]}")
