"""A/B of kernel-library builds on the decode GEMVs of the 350M preset (on the GPU machine).

    [GEMV_AB_ROWS=8,16,32] python3 tools/gemv_ab.py LIB [LIB ...]

Per library (each in its own process, MOETRT_KERNELS_LIB): qkv 3072 x 1024, out 1024 x 1024, fc1 4096 x 1024 (+
GeLU) and fc2 1024 x 4096 at each row count, timed as `moetrt bench kernels` times them (CUDA-graph replays of 8
calls over 8 weight sets, so that the weights come from DRAM), and F.linear beside them once. Also checks each
output against F.linear in fp32 (max abs error). A kernel-level A/B only: check a winner in an engine."""

SHAPES = (("qkv", 3072, 1024, "none"), ("out", 1024, 1024, "none"), ("fc1", 4096, 1024, "gelu_tanh"),
          ("fc2", 1024, 4096, "none"))


def child(rows):
    import torch
    from moetrt.plugins import launch
    from moetrt.plugins.bench import ROTATE, time_ms
    F = torch.nn.functional
    dt = torch.float16
    torch.manual_seed(0)
    res = {}
    st = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    for name, N, K, act in SHAPES:
        ws = [(torch.randn(N, K, device="cuda") / K ** 0.5).to(dt) for _ in range(ROTATE)]
        bias = torch.randn(N, device="cuda", dtype=dt)
        for M in rows:
            xs = [torch.randn(M, K, device="cuda").to(dt) for _ in range(ROTATE)]
            y = torch.empty(M, N, device="cuda", dtype=dt)
            us = 1e3 * time_ms(lambda i: launch.gemv(xs[i], ws[i], bias, y, act, stream=st()))
            launch.gemv(xs[0], ws[0], bias, y, act, stream=st())
            ref = F.linear(xs[0].float(), ws[0].float(), bias.float())
            ref = F.gelu(ref, approximate="tanh") if act != "none" else ref
            err = (y.float() - ref).abs().max().item()
            lin = 1e3 * time_ms(lambda i: F.linear(xs[i], ws[i], bias))
            res[f"{name} {M}x{N}x{K}"] = {"us": us, "err": err, "linear_us": lin}
        del ws
    return res


if __name__ == "__main__":
    from lib_ab import main
    for lib, result in main(__file__, child, "GEMV_AB_ROWS", "8,16,32", __doc__):
        for key, r in (result or {}).items():
            print(f"{lib:28s} {key:22s} {r['us']:7.2f} us  (F.linear {r['linear_us']:6.2f})  max err {r['err']:.3g}")
