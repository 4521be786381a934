"""The batch-1 decode step as one persistent kernel (csrc/decode_step.cu) against the kernel-per-op plan and the
CPU reference executor.

Both GPU paths round the same intermediates to fp16 and differ only in fp32 summation order (each block of the
step kernel sums its rows' dot products in another order than the GEMV kernels and cuBLASLt), so against the
reference (the same engine on the CPU) the step kernel must be as accurate as the kernel-per-op plan: its largest
logit error at most twice the plan's plus 2e-3 (a few fp16 ulps of logits of O(1)). A wrong weight, expert,
LayerNorm input or cache slot gives errors of O(1). The cache outputs (the new token's K and V written in place,
every other slot untouched) are checked the same way.
"""

import numpy as np
import pytest
import torch

from moetrt.compiler.pipeline import compile
from moetrt.engines.cuda_backend import CudaEngine
from moetrt.engines.runtime import Runtime
from moetrt.models.checkpoints import init_checkpoint
from moetrt.models.config import ModelConfig

pytestmark = pytest.mark.gpu

# Weights over 1 MiB stay [out, in] (the fold pass's threshold; the step kernel takes no other layout): hidden 768
# keeps the attention projection's.
CONFIGS = {
    "top1-d64": ModelConfig(vocab_size=1024, hidden_size=768, num_layers=3, num_heads=12, ffn_hidden_size=2048,
                            max_position_embeddings=512, num_experts=4, moe_layers=(1,), top_k=1),
    "top2-d32": ModelConfig(vocab_size=1024, hidden_size=768, num_layers=2, num_heads=24, ffn_hidden_size=1024,
                            max_position_embeddings=512, num_experts=8, moe_layers=(0, 1), top_k=2),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def engine(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = init_checkpoint(root / "c", CONFIGS[request.param], "moetrt", torch.float32, seed=11)
    return compile(ckpt, root / "e", dtype="fp16", max_batch=2, max_seq=512), CONFIGS[request.param]


def _feeds(config, past: int, seed: int):
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, config.vocab_size, (1, 1)).astype(np.int32),
             "past_lengths": np.array([past], np.int32)}
    feeds["position_ids"] = feeds["past_lengths"][:, None].astype(np.int32)
    D = config.hidden_size // config.num_heads
    for l in range(config.num_layers):
        feeds[f"kv_cache_{l}"] = (0.5 * rng.standard_normal((2, 2, config.num_heads, 512, D))).astype(np.float16)
    return feeds


def _run(engine_dir, feeds, use_step: bool, monkeypatch):
    monkeypatch.setattr(CudaEngine, "use_decode_step", use_step)
    with Runtime(engine_dir, device="cuda") as rt:
        whats = [getattr(fn, "what", "") for fn in rt.engine.plan(1, 1).launches]
        assert ("decode_step" in whats) == use_step, (whats, rt.engine.decode_step_reason)
        return rt.run(dict(feeds))


# past 0: the cache is empty; 37: one chunk of keys; 300: several chunks, combined by the head's last block
@pytest.mark.parametrize("past", [0, 37, 300])
def test_step_kernel_is_as_accurate_as_the_kernel_per_op_plan(engine, past, monkeypatch):
    engine_dir, config = engine
    feeds = _feeds(config, past, seed=past + 1)
    want = Runtime(engine_dir).run(dict(feeds))
    step = _run(engine_dir, feeds, True, monkeypatch)
    ops = _run(engine_dir, feeds, False, monkeypatch)
    for name in want:
        ref = want[name].astype(np.float64)
        err_step = np.abs(step[name].astype(np.float64) - ref).max()
        err_ops = np.abs(ops[name].astype(np.float64) - ref).max()
        assert err_step <= 2 * err_ops + 2e-3, (name, err_step, err_ops)
    for l in range(config.num_layers):  # the step kernel wrote the new token's slot and nothing else
        before, after = feeds[f"kv_cache_{l}"], step[f"kv_cache_{l}_out"]
        changed = np.argwhere((before != after).any(-1))
        assert set(changed[:, 3]) <= {past} and set(changed[:, 1]) <= {0}, changed[:5]


def test_generation_through_the_step_kernel_replays_in_cuda_graphs(engine):
    """Greedy tokens of a batch-1 generation with the step kernel captured in CUDA graphs equal eager steps'
    (the same kernel: the grid barrier's counters are left at zero by every launch)."""
    engine_dir, config = engine
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    with Runtime(engine_dir, device="cuda") as a, Runtime(engine_dir, device="cuda", use_graphs=False) as b:
        assert "decode_step" in [getattr(fn, "what", "") for fn in a.engine.plan(1, 1).launches]
        assert a.generate(prompt, 40) == b.generate(prompt, 40)
        assert a.graphs and not b.graphs
