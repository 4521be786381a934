"""Host-side costs of the GPU runtime's decode (on the GPU machine).

    python3 tools/host_profile.py ENGINE [--batch 1]

Prints the host time of a decode-graph launch and of an eager decode step's launches, an event record + wait on an
idle stream, per-token times as generate() delivers them, and generate()'s top functions by own time (a step that
spends host time in planning or in Python shows there)."""
import argparse
import cProfile
import pstats
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    from moetrt.engines.runtime import Runtime
    B = args.batch
    with Runtime(args.engine, device="cuda") as rt:
        e, s = rt.engine, rt.engine.stream
        prompts = np.random.default_rng(0).integers(0, rt.config.vocab_size, (B, 128)).tolist()
        rt.generate(prompts, 4)
        bucket = next(b for b in sorted(rt.graphs) if b >= B)
        graph, plan = rt.graphs[bucket], e.plan(bucket, 1, None)

        def timed(fn, n=1):  # ms of host time for n calls, and until the stream is done with them, each
            s.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            t1 = time.perf_counter()
            s.synchronize()
            return 1e3 * (t1 - t0) / n, 1e3 * (time.perf_counter() - t0) / n
        for n in (1, 20):
            host, done = timed(graph.launch, n)
            print(f"graph launch x{n}: host {host:.3f} ms each; until done {done:.3f} ms each")
        for _ in range(3):
            host, done = timed(plan.run)
            print(f"eager decode step (B={bucket}, {len(plan.launches)} launches): host {host:.3f} ms, "
                  f"until done {done:.3f} ms")
        ev = rt.token_event
        lat = []
        for _ in range(50):
            t0 = time.perf_counter()
            ev.record(s)
            ev.synchronize()
            lat.append(time.perf_counter() - t0)
        print(f"event record + synchronize on an idle stream: median {1e6 * np.median(lat):.1f} us, "
              f"max {1e6 * max(lat):.1f} us")
        lat = []
        for _ in range(20):
            t0 = time.perf_counter()
            graph.launch()
            ev.record(s)
            ev.synchronize()
            lat.append(time.perf_counter() - t0)
        print(f"graph launch + event sync: median {1e3 * np.median(lat):.3f} ms, max {1e3 * max(lat):.3f} ms")
        stamps = []
        rt.generate(prompts, 32, callback=lambda step, tokens: stamps.append(time.perf_counter()))
        d = np.diff(stamps) * 1e3
        print(f"generate: per token median {np.median(d):.3f} ms, min {d.min():.3f}, max {d.max():.3f}")
        prof = cProfile.Profile()
        prof.enable()
        rt.generate(prompts, 32)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
