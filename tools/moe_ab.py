"""A/B of kernel-library builds on the MoE layer at decode sizes (on the GPU machine).

    [MOE_AB_TOKENS=1,8,16] [MOE_AB_EXPERTS=E] [MOE_AB_PROFILE=1] python3 tools/moe_ab.py LIB [LIB ...]

Per library (each in its own process, MOETRT_KERNELS_LIB): the 64-expert h1024 f4096 fp16 layer at 1, 8 and 16
tokens (or MOE_AB_TOKENS), timed as `moetrt bench kernels` times it (CUDA-graph replays of 8 calls over 8 weight
sets), with and without programmatic launch. Routing is uniform over all experts, or with MOE_AB_EXPERTS=E over
the first E only (the other gate rows zeroed), as the skewed routing of an engine's random-weight gate hits fewer
experts. Prints the experts hit (mean over the 8 weight sets) and their weights' bytes per microsecond of the layer;
with MOE_AB_PROFILE=1 also each kernel's mean duration (start to end, torch.profiler over graph replays). A
kernel-level A/B only: check a winner in an engine (`moetrt bench ENGINE`) before landing it: a one-kernel MoE that
won here by 6-13% (8 and 16 tokens) lost by 11-22% inside the 350M decode step (docs/bench/log.md)."""


def child(tokens=(1, 8, 16), E=64, h=1024, f=4096):
    import os

    import torch
    from moetrt.plugins import launch
    from moetrt.plugins.bench import ROTATE, moe_layers, time_ms, time_ms_without_pdl
    dt = torch.float16
    torch.manual_seed(0)  # the same tokens (and experts hit) for every library
    layers = moe_layers(E, h, f)
    only = int(os.environ.get("MOE_AB_EXPERTS", E))
    for layer in layers:
        layer[0][only:] = 0  # logits 0 there: one of the first `only` experts wins (almost surely)
    res = {}
    for N in tokens:
        xs = [torch.randn(N, h, device="cuda").to(dt) for _ in range(ROTATE)]
        out = torch.empty(N, h, device="cuda", dtype=dt)
        ws = torch.zeros(launch.moe_workspace_size(N, h, f, E, 1, "fp16"), dtype=torch.uint8, device="cuda")
        call = lambda i: launch.moe(xs[i], *layers[i], out, ws, stream=torch.cuda.current_stream().cuda_stream)  # noqa
        hit = sum(len(torch.unique((x.float() @ layer[0].t()).argmax(1))) for x, layer in zip(xs, layers)) / ROTATE
        res[N] = {"us": 1e3 * time_ms(call), "us_no_pdl": 1e3 * time_ms_without_pdl(call), "hit": hit,
                  "mb": hit * 2 * (2 * f * h + f + h) / 1e6}
        if os.environ.get("MOE_AB_PROFILE"):
            res[N]["kernels"] = kernel_durations(call)
    return res


def kernel_durations(call, replays=10):
    """Mean microseconds from start to end per kernel name over graph replays of call(0..ROTATE-1)."""
    from collections import defaultdict

    import torch
    from moetrt.plugins.bench import ROTATE
    g = torch.cuda.CUDAGraph()
    for i in range(ROTATE):
        call(i)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for i in range(ROTATE):
            call(i)
    g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    spans = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name.replace("void ", "").replace("(anonymous namespace)::", "")
            spans[name[:name.find("(")] if "(" in name else name[:80]].append(e.time_range.end - e.time_range.start)
    return {name: sum(v) / len(v) for name, v in spans.items()}


if __name__ == "__main__":
    from lib_ab import main
    for lib, result in main(__file__, child, "MOE_AB_TOKENS", "1,8,16", __doc__):
        for N, r in (result or {}).items():
            print(f"{lib:28s} N={N:>3} {r['us']:7.1f} us  (no PDL {r['us_no_pdl']:7.1f})  experts {r['hit']:5.1f}"
                  f"  {r['mb'] / r['us']:5.2f} TB/s")
            for name, us in r.get("kernels", {}).items():
                print(f"      {us:7.2f} us  {name}")
