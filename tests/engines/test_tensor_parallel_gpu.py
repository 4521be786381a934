"""Tensor-parallel engines on several GPUs: one process per GPU over NCCL, against the same engine at tp=1.

fp32 engines: tp=2 sums each row-parallel projection in two halves plus an all-reduce, a different order than
tp=1, so logits agree to summation-order accuracy (1e-3 absolute on O(1) logits) and greedy tokens are
identical. Needs 2 GPUs (nvidia-h200-x2), 4 for the tp=4 test; skipped otherwise.
"""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from moetrt.compiler.pipeline import compile
from moetrt.engines.runtime import Runtime
from moetrt.errors import MoetrtError

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    try:
        from moetrt.engines.cuda import device_count
        return device_count()
    except Exception:
        return 0


needs2 = pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
needs4 = pytest.mark.skipif(_gpus() < 4, reason="needs 4 GPUs")


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("tp")
    return {tp: compile(tiny_checkpoints["moetrt"], root / f"tp{tp}", tp=tp, dtype="fp32", max_batch=4, max_seq=96)
            for tp in (1, 2)}


@needs2
def test_tp2_logits_and_greedy_tokens_equal_tp1(engines, tiny_config):
    ids = np.random.default_rng(0).integers(0, tiny_config.vocab_size, (3, 21))
    prompts = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6, 7]]
    with Runtime(engines[1], device="cuda") as one:
        want_logits, want_tokens = one.logits(ids), one.generate(prompts, 48)
    with Runtime(engines[2], device="cuda") as two:
        np.testing.assert_allclose(two.logits(ids), want_logits, rtol=0, atol=1e-3)
        assert two.generate(prompts, 48) == want_tokens
        seen = []
        assert two.generate(prompts[:1], 8, callback=lambda s, t: seen.append(t[0])) == [seen]
        assert two.generate(prompts, 8, temperature=1.0, top_p=0.9, seed=3) == \
            two.generate(prompts, 8, temperature=1.0, top_p=0.9, seed=3)


@needs4
def test_tp4_logits_and_greedy_tokens_equal_tp1(engines, tiny_checkpoints, tiny_config, tmp_path):
    """The tiny preset's 4 heads split one per rank; every projection is summed over 4 ranks."""
    four = compile(tiny_checkpoints["moetrt"], tmp_path / "tp4", tp=4, dtype="fp32", max_batch=4, max_seq=96)
    ids = np.random.default_rng(1).integers(0, tiny_config.vocab_size, (2, 17))
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    with Runtime(engines[1], device="cuda") as one:
        want_logits, want_tokens = one.logits(ids), one.generate(prompts, 40)
    with Runtime(four, device="cuda") as rt:
        np.testing.assert_allclose(rt.logits(ids), want_logits, rtol=0, atol=1e-3)
        assert rt.generate(prompts, 40) == want_tokens


@needs2
def test_tp2_validates_against_onnx_runtime(engines):
    from moetrt.compiler.validate import validate
    assert validate(engines[2], verbose=False, device="cuda")


@needs2
def test_a_dead_rank_stops_every_rank_with_an_error(engines):
    rt = Runtime(engines[2], device="cuda", timeout=60)
    rt.generate([[1, 2]], 4)
    rt._kill_rank_for_test(1)
    start = time.perf_counter()
    with pytest.raises(MoetrtError, match="rank 1 exited"):
        rt.generate([[1, 2]], 4)
    assert time.perf_counter() - start < 60
    assert not any(p.is_alive() for p in rt.procs)


@needs2
def test_a_mismatched_rank_fails_at_start(engines, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(engines[2], bad)
    (bad / "rank1" / "model.onnx").unlink()
    start = time.perf_counter()
    with pytest.raises(MoetrtError, match="rank1"):
        Runtime(bad, device="cuda", timeout=60)
    assert time.perf_counter() - start < 90


@needs2
def test_cli_generate_starts_the_ranks(engines, capsys):
    from moetrt.compiler.cli import main
    assert main(["generate", str(engines[1]), "--prompt-ids", "3,4,5", "--max-new-tokens", "6"]) == 0
    one = capsys.readouterr().out
    assert main(["generate", str(engines[2]), "--prompt-ids", "3,4,5", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == one


@needs2
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun")
def test_mpirun_path_on_one_node(engines):
    script = ("from moetrt.engines.distributed import mpi_runtime\n"
              f"rt = mpi_runtime({str(engines[2])!r})\n"
              "print('TOKENS', rt.generate([[5, 9, 2]], 12)[0], flush=True)\n"
              "rt.close()\n")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = subprocess.run(["mpirun", "-n", "2", "--oversubscribe", sys.executable, "-c", script], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith("TOKENS")]
    with Runtime(engines[1], device="cuda") as one:
        want = one.generate([[5, 9, 2]], 12)[0]
    assert lines == [f"TOKENS {want}"] * 2
