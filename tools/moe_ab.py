"""A/B of kernel-library builds on the MoE layer at decode sizes (on the GPU machine).

    [MOE_AB_TOKENS=1,8,16] python3 tools/moe_ab.py LIB [LIB ...]

Per library (each in its own process, MOETRT_KERNELS_LIB): the 64-expert h1024 f4096 fp16 layer at 1, 8 and 16
tokens (or MOE_AB_TOKENS), timed as `moetrt bench kernels` times it (CUDA-graph replays of 8 calls over 8 weight sets), with and
without programmatic launch. A kernel-level A/B only: check a winner in an engine (`moetrt bench ENGINE`) before
landing it: a one-kernel MoE that won here by 6-13% (8 and 16 tokens) lost by 11-22% inside the 350M decode step
(docs/performance.md)."""


def child(tokens=(1, 8, 16), E=64, h=1024, f=4096):
    import torch
    from moetrt.plugins import launch
    from moetrt.plugins.bench import ROTATE, moe_layers, time_ms, time_ms_without_pdl
    dt = torch.float16
    torch.manual_seed(0)  # the same tokens (and experts hit) for every library
    layers = moe_layers(E, h, f)
    res = {}
    for N in tokens:
        xs = [torch.randn(N, h, device="cuda").to(dt) for _ in range(ROTATE)]
        out = torch.empty(N, h, device="cuda", dtype=dt)
        ws = torch.zeros(launch.moe_workspace_size(N, h, f, E, 1, "fp16"), dtype=torch.uint8, device="cuda")
        call = lambda i: launch.moe(xs[i], *layers[i], out, ws, stream=torch.cuda.current_stream().cuda_stream)  # noqa
        res[N] = {"us": 1e3 * time_ms(call), "us_no_pdl": 1e3 * time_ms_without_pdl(call)}
    return res


if __name__ == "__main__":
    from lib_ab import main
    for lib, result in main(__file__, child, "MOE_AB_TOKENS", "1,8,16", __doc__):
        for N, r in (result or {}).items():
            print(f"{lib:28s} N={N:>3} {r['us']:7.1f} us  (no PDL {r['us_no_pdl']:7.1f})")
