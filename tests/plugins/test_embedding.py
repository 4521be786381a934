import pytest
import torch

from moetrt.errors import KernelError
from moetrt.plugins import launch


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_embedding_kernel_matches_float64_reference(dtype, tokens):
    vocab, hidden, max_pos = 1000, 1024 + 8, 64
    wte = torch.randn(vocab, hidden, dtype=dtype, device="cuda")
    wpe = torch.randn(max_pos, hidden, dtype=dtype, device="cuda")
    ids = torch.randint(0, vocab, (tokens,), dtype=torch.int32, device="cuda")
    pos = torch.randint(0, max_pos, (tokens,), dtype=torch.int32, device="cuda")
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype, device="cuda")  # poisoned
    launch.embedding(ids, pos, wte, wpe, out)
    torch.cuda.synchronize()
    want = (wte.double()[ids.long()] + wpe.double()[pos.long()]).to(dtype)
    # one fp32 add, then one rounding to dtype: equal to the float64 sum rounded to dtype
    # except for ties broken differently by the intermediate fp32 rounding (at most 1 ulp)
    torch.testing.assert_close(out, want, rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.gpu
def test_embedding_launcher_rejects_bad_arguments():
    wte = torch.randn(10, 8, dtype=torch.float16, device="cuda")
    wpe = torch.randn(4, 8, dtype=torch.float16, device="cuda")
    ids = torch.zeros(3, dtype=torch.int32, device="cuda")
    out = torch.empty(3, 8, dtype=torch.float16, device="cuda")
    with pytest.raises(KernelError, match="input_ids: expected dtype int32, got"):
        launch.embedding(ids.long(), ids, wte, wpe, out)
    with pytest.raises(KernelError, match=r"out: expected shape \(3, 8\), got \(3, 4\)"):
        launch.embedding(ids, ids, wte, wpe, out[:, :4].contiguous())
    with pytest.raises(KernelError, match="must be contiguous"):
        launch.embedding(ids, ids, wte, wpe, torch.empty(8, 3, dtype=torch.float16, device="cuda").t())
    with pytest.raises(KernelError, match="wpe: expected dtype fp16, got fp32"):
        launch.embedding(ids, ids, wte, wpe.float(), out)
    flat = torch.empty(10 * 8 + 1, dtype=torch.float16, device="cuda")
    with pytest.raises(KernelError, match="wte: device pointer .* is not 16-byte aligned"):
        launch.embedding(ids, ids, flat[1:].view(10, 8), wpe, out)


def test_host_arrays_are_refused():
    with pytest.raises(KernelError, match="input_ids: not a device array"):
        launch.embedding(torch.zeros(3, dtype=torch.int32), None, None, None, None)
