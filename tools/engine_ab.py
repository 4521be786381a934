"""A/B of runtime settings on an engine's decode graphs (on the GPU machine).

    python3 tools/engine_ab.py ENGINE [--batch 1,8,32] [--rounds 2] SETTING [SETTING ...]

A SETTING is a space-separated list of environment assignments (e.g. "MOETRT_KERNELS_LIB=/path/lib.so"; "-" for
none; "ENGINE_AB_ENGINE=DIR" runs that engine directory instead, e.g. a copy re-tuned with another library),
optionally followed by "PY:" and a Python statement the child runs before it opens the runtime (e.g.
"PY:from moetrt.engines.cuda_backend import CudaEngine as C; C.fuse_layernorm = False"). Rounds alternate the settings, each in its own process: the
runtime generates from 128-token prompts to capture the decode graph of each batch size, then times 200 replays
of it. Prints the milliseconds per replay of every round and JSON of the medians."""
import argparse
import json
import os
import subprocess
import sys


def child(engine: str, batches: list[int]) -> None:
    import numpy as np

    if os.environ.get("ENGINE_AB_PY"):
        exec(os.environ["ENGINE_AB_PY"])

    from moetrt.engines import cuda
    from moetrt.engines.runtime import Runtime
    res = {}
    with Runtime(os.environ.get("ENGINE_AB_ENGINE", engine), device="cuda") as rt:
        rng = np.random.default_rng(0)
        for B in batches:
            prompts = rng.integers(0, rt.config.vocab_size, (B, 128)).tolist()
            rt.generate(prompts, 4)
            graph = rt.graphs[next(b for b in sorted(rt.graphs) if b >= B)]
            res[B] = cuda.elapsed_ms(rt.engine.stream, graph.launch, 200) / 200
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine")
    ap.add_argument("settings", nargs="+")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    times: dict[str, dict[str, list[float]]] = {s: {} for s in a.settings}
    for r in range(a.rounds):
        for s in a.settings:
            env = dict(os.environ)
            assignments, _, py = s.partition("PY:")
            env.update(kv.split("=", 1) for kv in assignments.split() if kv != "-")
            if py:
                env["ENGINE_AB_PY"] = py
            p = subprocess.run([sys.executable, __file__, "--child", a.engine, a.batch], env=env, text=True,
                               capture_output=True)
            line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"round {r} {s!r} failed:\n{p.stdout[-2000:]}{p.stderr[-4000:]}")
                continue
            for B, ms in json.loads(line[7:]).items():
                times[s].setdefault(B, []).append(ms)
            print(f"round {r} {s:40s} " + "  ".join(f"B{B} {v[-1]:.4f}" for B, v in times[s].items()), flush=True)
    med = {s: {B: sorted(v)[len(v) // 2] for B, v in t.items()} for s, t in times.items()}
    print("MEDIANS " + json.dumps(med))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], [int(b) for b in sys.argv[3].split(",")])
    else:
        main()
