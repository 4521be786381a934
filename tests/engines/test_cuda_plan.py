"""The CUDA backend's launch plans, built on the CPU: the device calls (allocation, copies, streams, cuBLASLt) are
replaced by a fake that hands out addresses and launches nothing, so that the planning logic (which kernels a step
runs, and which buffers they read and write) is checked without a GPU. The kernels themselves are tested on the GPU
(tests/plugins/test_kernels.py, test_cuda_runtime.py)."""

import types

import pytest
import torch

from moetrt.compiler.pipeline import compile
from moetrt.engines import cuda, cuda_backend
from moetrt.engines.program import analyze
from moetrt.plugins import launch


class _Buffer:
    next_ptr = 1 << 32

    def __init__(self, nbytes, what="buffer"):
        self.nbytes, self.what = max(int(nbytes), 1), what
        self.ptr = _Buffer.next_ptr
        _Buffer.next_ptr += (self.nbytes + 4095) // 4096 * 4096 + 4096

    def view(self, shape, dtype, offset=0):
        v = cuda.View(self.ptr + offset, tuple(int(s) for s in shape), dtype)
        assert offset + v.nbytes <= self.nbytes, (self.what, offset, v.nbytes)
        return v

    def free(self):
        pass


class _Stream:
    ptr, handle = 0, None

    def memset(self, *args):
        pass

    def synchronize(self):
        pass

    def destroy(self):
        pass


class _Gemm:  # a cuBLASLt GEMM's place in the plan
    def __init__(self, *args, **kwargs):
        self.launch = types.SimpleNamespace(what="cublaslt")

    def destroy(self):
        pass


@pytest.fixture
def fake_device(monkeypatch):
    runtime = types.SimpleNamespace(cudaMemcpy=lambda *a: None,
                                    cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1))
    monkeypatch.setattr(cuda, "DeviceBuffer", _Buffer)
    monkeypatch.setattr(cuda, "Stream", _Stream)
    monkeypatch.setattr(cuda, "device_info", lambda: types.SimpleNamespace(arch=90, name="a fake sm_90 GPU"))
    monkeypatch.setattr(cuda, "runtime_api", lambda: runtime)
    monkeypatch.setattr(cuda, "call", lambda *a, **k: 0)
    monkeypatch.setattr(cuda_backend, "check_arch", lambda *a: None)
    monkeypatch.setattr(cuda_backend, "GemmContext", lambda *a: types.SimpleNamespace(gemv={}, destroy=lambda: None))
    monkeypatch.setattr(cuda_backend, "Gemm", _Gemm)
    set_up, real = [], launch._launch

    def record_set_up(name, args, what, defer):  # set-up kernels run at once; the fake records their arguments
        if name == "moetrt_fold_layernorm":
            return set_up.append(args)
        return real(name, args, what, defer)
    monkeypatch.setattr(launch, "_launch", record_set_up)
    return set_up


@pytest.fixture(scope="module")
def three_layer_program(tmp_path_factory):
    """Dense, MoE, dense; hidden 1024, so that every decode GEMM but the LM head is [out, in] (GEMV-eligible)."""
    from moetrt.models.checkpoints import init_checkpoint
    from moetrt.models.config import ModelConfig
    config = ModelConfig(vocab_size=1024, hidden_size=1024, num_layers=3, num_heads=16, ffn_hidden_size=4096,
                         max_position_embeddings=128, num_experts=4, moe_layers=(1,), top_k=1)
    tmp = tmp_path_factory.mktemp("plan")
    ckpt = init_checkpoint(tmp / "c", config, "moetrt", torch.float32, seed=7)
    return analyze(compile(ckpt, tmp / "e", dtype="fp16", max_batch=4, max_seq=64) / "rank0" / "model.onnx")


def _whats(plan):
    return [getattr(fn, "what", "") for fn in plan.launches]


def test_layernorm_folds_in_decode_plans(fake_device, three_layer_program, monkeypatch):
    """Four LayerNorms fold (out-projection -> FC1 and FC2 -> next QKV in both dense layers' reach, and MoE -> next
    QKV): the producer's output is the consumer's input, written into neither of the producer's inputs; prefill
    plans, decode plans outside [fold_layernorm_min_rows, fold_layernorm_max_rows] and fold_layernorm = False keep
    every LayerNorm, as kernels or (up to fuse_layernorm_max_rows) as the next GEMV's prologue."""
    p = three_layer_program
    engine = cuda_backend.CudaEngine(p, 4, 64, 256, 256)
    assert engine.fold_layernorm_min_rows == 1
    monkeypatch.setattr(engine, "fold_layernorm_min_rows", 3)
    assert "gemv_folded" not in _whats(engine.plan(2, 1, gemv=True))
    monkeypatch.setattr(engine, "fold_layernorm_min_rows", 1)
    engine.plans.clear()
    kinds = [(p.ops[a].kind, p.ops[b].kind, p.ops[c].kind) for a, b, c in engine.fold_triples]
    assert kinds == [("gemm", "add_layernorm", "gemm")] * 2 + [("moe", "add_layernorm", "gemm"),
                                                                ("gemm", "add_layernorm", "gemm")]
    # set-up: each consumer's weights folded on the device from the uploaded weights, gamma and beta
    assert len(fake_device) == len(engine.fold_triples)
    for (_, i, j), args in zip(engine.fold_triples, fake_device):
        views = engine.weight_views
        assert args[:3] == (views[p.ops[j].inputs[1]].ptr, *(views[n].ptr for n in p.ops[i].inputs[2:4]))
        assert args[4:7] == tuple(v.ptr for v in engine.folds[j][:3])
    folded = {v[0].ptr for v in engine.folds.values()}
    for B in (1, 2, 3, 4):
        launches = engine.plan(B, 1, gemv=True).launches
        whats = [getattr(fn, "what", "") for fn in launches]
        assert whats.count("gemv_residual") == 3 and whats.count("gemv_folded") == 4, whats
        assert {fn.args[1] for fn in launches if fn.what == "gemv_folded"} == folded
        assert sum(w.startswith("add_layernorm") for w in whats) == 3, whats  # embedding's, MoE's, final
        for k, fn in enumerate(launches):
            if fn.what not in ("gemv_residual", "moe", "add_layernorm_moe"):
                continue
            consumer = next(g for g in launches[k + 1:] if getattr(g, "what", "") == "gemv_folded")
            if fn.what == "gemv_residual":
                x, _, _, residual, y = fn.args[:5]
                assert y == consumer.args[0] and y not in (x, residual)
            else:  # moetrt_moe's residual and out (arguments 6, 7; 12, 13 with the LayerNorm's 6 and epsilon)
                residual, out = fn.args[12:14] if fn.what == "add_layernorm_moe" else fn.args[6:8]
                assert out == consumer.args[0] and residual not in (None, out)
    assert "gemv_folded" not in _whats(engine.plan(2, 16))
    # past fold_layernorm_max_rows the LayerNorm stays: a kernel, or up to fuse_layernorm_max_rows the consumer
    # GEMV's prologue
    monkeypatch.setattr(engine, "fold_layernorm_max_rows", 2)
    engine.plans.clear()
    assert "gemv_folded" not in _whats(engine.plan(3, 1, gemv=True))
    monkeypatch.setattr(engine, "fold_layernorm_max_rows", 0)
    engine.plans.clear()
    whats = _whats(engine.plan(engine.fuse_layernorm_max_rows, 1, gemv=True))
    assert "gemv_folded" not in whats and whats.count("add_layernorm_gemv") == 5, whats  # and the embedding's
    engine.close()
    monkeypatch.setattr(cuda_backend.CudaEngine, "fold_layernorm", False)
    plain = cuda_backend.CudaEngine(p, 4, 64, 256, 256)
    assert plain.fold_triples == [] and sum(w.startswith("add_layernorm") for w in _whats(plain.plan(3, 1))) == 7
    plain.close()


def test_lm_head_runs_as_a_gemv_where_tuned_so(fake_device, three_layer_program, monkeypatch):
    """The LM head is a GEMV candidate: tuning times it (plan.gemv_candidates), the GEMV kernel runs it where the
    tuning says so or the plan forces GEMVs, cuBLASLt otherwise (also when the tuning has no entry for it, as in
    engines tuned before), and head_gemv = False keeps it off the candidates."""
    engine = cuda_backend.CudaEngine(three_layer_program, 4, 64, 256, 256)
    key = f"head:2x{engine.vocab}x{engine.hidden}:fp16:none"
    plan = engine.plan(2, 1)
    assert _whats(plan)[-1] == "cublaslt" and key in [k for k, _, _ in plan.gemv_candidates]
    head = engine.plan(2, 1, gemv=True).launches[-1]
    assert head.what == "gemv" and head.args[3] == engine.logits_buf.ptr
    assert head.args[5:7] == (engine.vocab, engine.hidden)
    engine.gemm_ctx.gemv[key] = True
    engine.plans.clear()
    assert _whats(engine.plan(2, 1))[-1] == "gemv"
    assert _whats(engine.plan(4, 16, rows=40, gemv=True))[-1] == "cublaslt"  # past the GEMV's 32 rows
    engine.close()
    monkeypatch.setattr(cuda_backend.CudaEngine, "head_gemv", False)
    plain = cuda_backend.CudaEngine(three_layer_program, 4, 64, 256, 256)
    plain.gemm_ctx.gemv[key] = True
    plan = plain.plan(2, 1)
    assert _whats(plan)[-1] == "cublaslt" and key not in [k for k, _, _ in plan.gemv_candidates]
    plain.close()


def test_a_plan_is_made_once_per_step_shape(fake_device, three_layer_program, monkeypatch):
    """engine.plan returns the plan made for the same (B, T, rows[, gemv]) before: a decode step does no planning
    (each plan re-propagates the shapes and creates its cuBLASLt GEMMs; an earlier bug keyed the cache by the LM
    head's tuning key and remade every step's plan, ~10 ms of host time a token for the 350M model)."""
    engine = cuda_backend.CudaEngine(three_layer_program, 4, 64, 256, 256)
    made = []
    make = engine._make_plan
    monkeypatch.setattr(engine, "_make_plan", lambda *a: made.append(a) or make(*a))
    shapes = [(1, 1, None, None), (4, 1, None, None), (1, 16, 1, None), (2, 1, None, True), (2, 1, None, False)]
    first = [engine.plan(*s) for s in shapes]
    again = [engine.plan(*s) for s in shapes * 3]
    assert made == shapes
    assert all(a is b for a, b in zip(again, first * 3))
    assert set(engine.plans) == {s[:3] if s[3] is None else s for s in shapes}
    with pytest.raises(cuda_backend.MoetrtError, match="exceeds"):
        engine.plan(8, 1)
    assert len(engine.plans) == len(shapes)
    engine.close()
