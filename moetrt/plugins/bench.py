"""``moetrt bench kernels``: each kernel against its floor and against PyTorch, measured in one run.

Ceilings measured here, not taken from datasheets: device copy bandwidth (a 2 GiB device-to-device copy,
bytes read + written) and the fp16 matrix rate (8192^3 products on random data). Every timing is the median
of CUDA-graph replays of 8 calls that rotate over 8 independent weight/cache sets (so weights come from
memory, not from L2), divided by 8. PyTorch baselines run the same op on the same data, eagerly as a user
would write it. Needs torch with CUDA (benchmarks only; the runtime does not import torch).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ROTATE = 8


def cuda_torch(what: str = "bench kernels"):
    """torch, with CUDA, or an error saying that ``what`` needs it."""
    import torch
    if not torch.cuda.is_available():
        from moetrt.errors import MoetrtError
        raise MoetrtError(f"{what} needs an NVIDIA GPU and torch with CUDA")
    return torch


def time_ms(fn, reps: int = 20, graph: bool = True) -> float:
    """Median milliseconds per call of ``fn(i)`` for i in 0..ROTATE-1, replayed as one CUDA graph."""
    torch = cuda_torch()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(ROTATE):  # warm-up: module load, workspace first use
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(ROTATE):
                fn(i)
        run = g.replay
    else:
        def run():
            for i in range(ROTATE):
                fn(i)
    run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / ROTATE)
    return statistics.median(times)


def time_ms_without_pdl(fn) -> float:
    """``time_ms(fn)`` with programmatic dependent launch off: what it is worth to a kernel's chain of launches."""
    from moetrt.plugins.kernels import programmatic_launch
    with programmatic_launch(False):
        return time_ms(fn)


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (bytes read + written), median of 10."""
    torch = cuda_torch()
    n = 1 << 30  # 1 Gi elements of fp16 = 2 GiB
    src = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda i: dst.copy_(src), reps=10, graph=False)
    return 2 * src.numel() * 2 / (ms * 1e-3)


def measure_ceilings() -> dict:
    torch = cuda_torch()
    bandwidth = copy_bandwidth()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    ms_mm = time_ms(lambda i: a @ b, reps=10, graph=False)
    return {"copy_bytes_per_s": bandwidth, "fp16_flops_per_s": 2 * 8192 ** 3 / (ms_mm * 1e-3)}


def moe_layers(E: int, h: int, f: int) -> list[tuple]:
    """ROTATE independent fp16 MoE layers (gate fp32, fc1 w/b, fc2 w/b) on the GPU, seeded 0..ROTATE-1."""
    torch = cuda_torch()
    dt = torch.float16
    layers = []
    for i in range(ROTATE):
        g = torch.Generator(device="cuda").manual_seed(i)
        layers.append((torch.randn(E, h, device="cuda", generator=g) / h ** 0.5,
                       (torch.randn(E, f, h, device="cuda", generator=g) / h ** 0.5).to(dt),
                       (0.1 * torch.randn(E, f, device="cuda", generator=g)).to(dt),
                       (torch.randn(E, h, f, device="cuda", generator=g) / f ** 0.5).to(dt),
                       (0.1 * torch.randn(E, h, device="cuda", generator=g)).to(dt)))
    return layers


def bench_moe(ceil: dict, tokens_list=(1, 8, 32, 512, 4096), E=64, h=1024, f=4096) -> list[dict]:
    torch = cuda_torch()
    from moetrt.plugins import launch
    dt = torch.float16
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    layers = moe_layers(E, h, f)
    expert_bytes = (2 * f * h + f + h) * 2
    rows = []
    for N in tokens_list:
        xs = [torch.randn(N, h, device="cuda").to(dt) for _ in range(ROTATE)]
        out = torch.empty(N, h, device="cuda", dtype=dt)
        ws = torch.zeros(launch.moe_workspace_size(N, h, f, E, 1, "fp16"), dtype=torch.uint8, device="cuda")
        hit = statistics.mean(
            len(torch.unique((xs[i].float() @ layers[i][0].T).argmax(-1))) for i in range(ROTATE))
        floor_bytes = hit * expert_bytes + E * h * 4 + 2 * N * h * 2
        call = lambda i: launch.moe(xs[i], *layers[i], out, ws, stream=stream())  # noqa: E731
        ours, ours_no_pdl = time_ms(call), time_ms_without_pdl(call)

        def loop(i):  # the eager model: route on the host, loop over hit experts
            wg, w1, b1, w2, b2 = layers[i]
            x = xs[i]
            p = torch.softmax(x.float() @ wg.T, -1)
            wt, ex = p.max(-1)
            y = torch.zeros(N, h, device="cuda", dtype=torch.float32)
            for e in torch.unique(ex).tolist():
                idx = (ex == e).nonzero()[:, 0]
                a = torch.nn.functional.gelu(x[idx] @ w1[e].T + b1[e], approximate="tanh")
                y.index_add_(0, idx, wt[idx, None] * (a @ w2[e].T + b2[e]).float())
            return y.to(dt)

        def gathered(i):  # gathered-weight bmm: every token reads its expert's weights
            wg, w1, b1, w2, b2 = layers[i]
            x = xs[i]
            p = torch.softmax(x.float() @ wg.T, -1)
            wt, ex = p.max(-1)
            a = torch.nn.functional.gelu(torch.bmm(w1[ex], x[:, :, None])[:, :, 0] + b1[ex], approximate="tanh")
            return (wt[:, None] * (torch.bmm(w2[ex], a[:, :, None])[:, :, 0] + b2[ex]).float()).to(dt)

        base_loop = time_ms(loop, reps=5, graph=False)
        base_gather = time_ms(gathered, reps=5, graph=False) if N <= 64 else float("nan")
        base_grouped = grouped_mm_ms(layers, xs, N) if N > 64 else float("nan")
        floor_ms = floor_bytes / ceil["copy_bytes_per_s"] * 1e3
        flops = 2 * N * 2 * f * h
        rows.append({
            "kernel": "moe", "tokens": N, "experts_hit": hit, "ms": ours, "floor_ms": floor_ms,
            "x_floor": ours / floor_ms, "ms_no_pdl": ours_no_pdl, "GB_per_s": floor_bytes / (ours * 1e-3) / 1e9,
            "TFLOP_per_s": flops / (ours * 1e-3) / 1e12,
            "frac_matrix_rate": flops / (ours * 1e-3) / ceil["fp16_flops_per_s"],
            "torch_loop_ms": base_loop, "torch_gathered_bmm_ms": base_gather,
            "torch_grouped_mm_bf16_ms": base_grouped,
        })
        del xs, out, ws
    return rows


def grouped_mm_ms(layers, xs, N) -> float:
    """The two expert GEMMs (+ bias, GeLU) through ``torch._grouped_mm`` (a CUTLASS grouped GEMM, bf16 on
    Hopper), tokens already sorted by expert: routing and the gather are left out, so this favours it.
    NaN where this torch has no grouped GEMM for the device."""
    torch = cuda_torch()
    if not hasattr(torch, "_grouped_mm"):
        return float("nan")
    E = layers[0][1].shape[0]
    prepared = []
    for i in range(ROTATE):
        wg, w1, b1, w2, b2 = layers[i]
        ex = (xs[i].float() @ wg.T).argmax(-1)
        order = torch.argsort(ex)
        counts = torch.bincount(ex, minlength=E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        prepared.append((xs[i][order].bfloat16().contiguous(), w1.bfloat16().transpose(1, 2).contiguous(),
                         w2.bfloat16().transpose(1, 2).contiguous(), offs, b1.bfloat16()[ex[order]],
                         b2.bfloat16()[ex[order]]))

    def run(i):
        x, w1t, w2t, offs, b1r, b2r = prepared[i]
        a = torch.nn.functional.gelu(torch._grouped_mm(x, w1t, offs=offs) + b1r, approximate="tanh")
        return torch._grouped_mm(a, w2t, offs=offs) + b2r

    try:
        return time_ms(run, reps=5)
    except RuntimeError:
        return float("nan")
    finally:
        del prepared


def bench_attention(ceil: dict, batches=(1, 8, 32), cache_len=2048, H=16, D=64) -> list[dict]:
    torch = cuda_torch()
    from moetrt.plugins import launch
    dt = torch.float16
    rows = []
    for B in batches:
        caches = [torch.randn(2, B, H, cache_len, D, device="cuda").to(dt) for _ in range(ROTATE)]
        qkvs = [torch.randn(B, 1, 3 * H * D, device="cuda").to(dt) for _ in range(ROTATE)]
        past = torch.full((B,), cache_len - 1, dtype=torch.int32, device="cuda")
        out = torch.empty(B, 1, H * D, device="cuda", dtype=dt)
        ws = torch.zeros(launch.attention_workspace_size(B, H, D, cache_len), dtype=torch.uint8, device="cuda")
        call = lambda i: launch.attention(qkvs[i], caches[i], past, out, H, ws,  # noqa: E731
                                          stream=torch.cuda.current_stream().cuda_stream)
        ours, ours_no_pdl = time_ms(call), time_ms_without_pdl(call)

        def sdpa(i):
            q = qkvs[i].view(B, H, 3, D)[:, :, 0, None]  # [B, H, 1, D]
            return torch.nn.functional.scaled_dot_product_attention(q, caches[i][0], caches[i][1])

        base = time_ms(sdpa)
        kv_bytes = 2 * B * H * cache_len * D * 2
        floor_ms = kv_bytes / ceil["copy_bytes_per_s"] * 1e3
        rows.append({"kernel": "attention_decode", "batch": B, "cache_len": cache_len, "ms": ours,
                     "floor_ms": floor_ms, "x_floor": ours / floor_ms, "ms_no_pdl": ours_no_pdl,
                     "GB_per_s": kv_bytes / (ours * 1e-3) / 1e9,
                     "torch_sdpa_ms": base})
        del caches, qkvs
    return rows


def bench_gemv(ceil: dict, rows_list=(1, 4, 8, 16, 32), h=1024, f=4096) -> list[dict]:
    """The decode GEMMs of the 350M preset (qkv, attention out, fc1 + GeLU, fc2) at 1-32 rows: our GEMV, and for
    qkv and fc1 (up to 8 rows) the GEMV with the LayerNorm before it fused in; PyTorch's F.linear (cuBLAS) and
    LayerNorm + F.linear beside them. Floor: the weight bytes / copy bandwidth."""
    torch = cuda_torch()
    from moetrt.plugins import launch
    dt = torch.float16
    F = torch.nn.functional
    out = []
    g, b = torch.ones(h, device="cuda", dtype=dt), torch.zeros(h, device="cuda", dtype=dt)
    for name, N, K, act in (("qkv", 3 * h, h, None), ("out", h, h, None), ("fc1", f, h, "gelu_tanh"),
                            ("fc2", h, f, None)):
        ws = [(torch.randn(N, K, device="cuda") / K ** 0.5).to(dt) for _ in range(ROTATE)]
        bias = torch.randn(N, device="cuda", dtype=dt)
        for M in rows_list:
            xs = [torch.randn(M, K, device="cuda").to(dt) for _ in range(ROTATE)]
            ds = [torch.randn(M, K, device="cuda").to(dt) for _ in range(ROTATE)]
            y, s = torch.empty(M, N, device="cuda", dtype=dt), torch.empty(M, K, device="cuda", dtype=dt)
            st = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
            ours = time_ms(lambda i: launch.gemv(xs[i], ws[i], bias, y, act or "none", stream=st()))
            ref = (lambda z: F.gelu(z, approximate="tanh")) if act else (lambda z: z)
            base = time_ms(lambda i: ref(F.linear(xs[i], ws[i], bias)))
            nbytes = N * K * 2
            fl = nbytes / ceil["copy_bytes_per_s"] * 1e3
            row = {"kernel": "gemv", "gemm": name, "rows": M, "N": N, "K": K, "ms": ours, "floor_ms": fl,
                   "x_floor": ours / fl, "torch_linear_ms": base}
            if name in ("qkv", "fc1") and M <= launch.LAYERNORM_GEMV_MAX_ROWS:
                row["fused_layernorm_ms"] = time_ms(lambda i: launch.add_layernorm_gemv(
                    xs[i], ds[i], g, b, s, ws[i], bias, y, act or "none", stream=st()))
                row["torch_layernorm_linear_ms"] = time_ms(
                    lambda i: ref(F.linear(F.layer_norm(xs[i] + ds[i], (K,), g, b), ws[i], bias)))
            out.append(row)
        del ws
    return out


def bench_elementwise(ceil: dict, rows_n=4096, h=1024, f=4096) -> list[dict]:
    torch = cuda_torch()
    from moetrt.plugins import launch
    dt = torch.float16
    out = []
    xs = [torch.randn(rows_n, h, device="cuda").to(dt) for _ in range(ROTATE)]
    ds = [torch.randn(rows_n, h, device="cuda").to(dt) for _ in range(ROTATE)]
    g, b = torch.ones(h, device="cuda", dtype=dt), torch.zeros(h, device="cuda", dtype=dt)
    s, n = torch.empty_like(xs[0]), torch.empty_like(xs[0])
    ours = time_ms(lambda i: launch.add_layernorm(xs[i], ds[i], g, b, s, n, stream=torch.cuda.current_stream().cuda_stream))
    base = time_ms(lambda i: torch.nn.functional.layer_norm(xs[i] + ds[i], (h,), g, b))
    nbytes = 4 * rows_n * h * 2
    fl = nbytes / ceil["copy_bytes_per_s"] * 1e3
    out.append({"kernel": "add_layernorm", "rows": rows_n, "hidden": h, "ms": ours, "floor_ms": fl,
                "x_floor": ours / fl, "torch_ms": base})
    ys = [torch.randn(rows_n, f, device="cuda").to(dt) for _ in range(ROTATE)]
    bias, y = torch.randn(f, device="cuda", dtype=dt), torch.empty(rows_n, f, device="cuda", dtype=dt)
    ours = time_ms(lambda i: launch.bias_act(ys[i], bias, y, stream=torch.cuda.current_stream().cuda_stream))
    base = time_ms(lambda i: torch.nn.functional.gelu(ys[i] + bias, approximate="tanh"))
    nbytes = 2 * rows_n * f * 2
    fl = nbytes / ceil["copy_bytes_per_s"] * 1e3
    out.append({"kernel": "bias_gelu", "rows": rows_n, "cols": f, "ms": ours, "floor_ms": fl, "x_floor": ours / fl,
                "torch_ms": base})
    return out


def run(output: str | None = None) -> dict:
    torch = cuda_torch()
    ceil = measure_ceilings()
    result = {"device": torch.cuda.get_device_name(), "ceilings": ceil,
              "moe": bench_moe(ceil), "attention": bench_attention(ceil), "gemv": bench_gemv(ceil),
              "elementwise": bench_elementwise(ceil)}
    print(f"device: {result['device']}   copy bandwidth {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s   "
          f"fp16 matrix rate {ceil['fp16_flops_per_s'] / 1e12:.0f} TFLOP/s")
    print(f"{'kernel':18s} {'size':>14s} {'ms':>9s} {'floor ms':>9s} {'x floor':>8s} {'torch ms':>10s} {'torch/ours':>10s}")
    for r in result["moe"]:
        print(f"{'moe':18s} {'N=' + str(r['tokens']):>14s} {r['ms']:9.4f} {r['floor_ms']:9.4f} {r['x_floor']:8.2f} "
              f"{r['torch_loop_ms']:10.4f} {r['torch_loop_ms'] / r['ms']:10.1f}   no-PDL {r['ms_no_pdl']:.4f} ms, "
              f"gathered-bmm {r['torch_gathered_bmm_ms']:.4f} ms, grouped_mm(bf16) {r['torch_grouped_mm_bf16_ms']:.4f} ms, "
              f"{r['TFLOP_per_s']:.0f} TFLOP/s "
              f"({100 * r['frac_matrix_rate']:.0f}% of matrix rate), {r['experts_hit']:.1f} experts hit")
    for r in result["attention"]:
        print(f"{'attention_decode':18s} {'B=' + str(r['batch']) + ' L=' + str(r['cache_len']):>14s} {r['ms']:9.4f} "
              f"{r['floor_ms']:9.4f} {r['x_floor']:8.2f} {r['torch_sdpa_ms']:10.4f} {r['torch_sdpa_ms'] / r['ms']:10.1f}"
              f"   no-PDL {r['ms_no_pdl']:.4f} ms")
    for r in result["gemv"]:
        fused = (f"   LayerNorm fused {r['fused_layernorm_ms']:.4f} ms, torch LayerNorm + linear "
                 f"{r['torch_layernorm_linear_ms']:.4f} ms" if "fused_layernorm_ms" in r else "")
        print(f"{'gemv ' + r['gemm']:18s} {str(r['rows']) + 'x' + str(r['N']) + 'x' + str(r['K']):>14s} {r['ms']:9.4f} "
              f"{r['floor_ms']:9.4f} {r['x_floor']:8.2f} {r['torch_linear_ms']:10.4f} "
              f"{r['torch_linear_ms'] / r['ms']:10.1f}{fused}")
    for r in result["elementwise"]:
        size = f"{r['rows']}x{r.get('hidden', r.get('cols'))}"
        print(f"{r['kernel']:18s} {size:>14s} {r['ms']:9.4f} {r['floor_ms']:9.4f} {r['x_floor']:8.2f} "
              f"{r['torch_ms']:10.4f} {r['torch_ms'] / r['ms']:10.1f}")
    if output:
        Path(output).write_text(json.dumps(result, indent=2))
    return result
