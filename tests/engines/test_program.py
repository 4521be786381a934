"""The GPU backend's graph analysis and host shape evaluation, on the CPU (no GPU needed)."""

import onnx
import pytest

from moetrt.compiler.pipeline import compile
from moetrt.engines.program import UnsupportedNode, analyze, propagate


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("prog")
    return {name: compile(tiny_checkpoints["moetrt"], root / name, dtype="fp16", max_batch=4, max_seq=64, **kw)
            for name, kw in (("all", {}), ("last", {"logits": "last"}), ("tp2", {"tp": 2}))}


def test_every_node_is_host_or_a_device_op(engines, tiny_config):
    program = analyze(engines["all"] / "rank0" / "model.onnx")
    kinds = [op.kind for op in program.ops]
    c = tiny_config
    assert kinds.count("attention") == c.num_layers and kinds.count("moe") == len(c.moe_layers)
    assert kinds.count("embed_ln") == 1 and kinds.count("add_layernorm") == 2 * c.num_layers
    gemms = [op for op in program.ops if op.kind == "gemm"]
    assert len(gemms) == 2 * c.num_layers + 2 * (c.num_layers - len(c.moe_layers)) + 1  # + LM head
    assert sum(op.attrs["act"] == c.activation for op in gemms) == c.num_layers - len(c.moe_layers)  # fc1 + GeLU
    assert "bias_act" not in kinds  # every bias went into a GEMM


@pytest.mark.parametrize("B, T", [(1, 1), (3, 5), (4, 16)])
def test_shapes_follow_batch_and_tokens(engines, tiny_config, B, T):
    c = tiny_config
    for name in ("all", "last"):
        program = analyze(engines[name] / "rank0" / "model.onnx")
        shapes, _ = propagate(program, program.cache_shapes, B, T)
        assert shapes["logits"] == ((B, T, c.vocab_size) if name == "all" else (B, 1, c.vocab_size))
        for op in program.ops:
            if op.kind == "attention":
                assert shapes[op.outputs[0]] == (B, T, c.hidden_size)
                assert shapes[op.outputs[1]] == (2, 4, c.num_heads, 64, c.head_dim)
            if op.kind == "moe":
                assert shapes[op.inputs[0]] == (B * T, c.hidden_size)


def test_tensor_parallel_ranks_hold_their_heads_and_all_reduce(engines, tiny_config):
    c = tiny_config
    for rank in (0, 1):
        program = analyze(engines["tp2"] / f"rank{rank}" / "model.onnx")
        shapes, _ = propagate(program, program.cache_shapes, 2, 3)
        assert shapes["logits"] == (2, 3, c.vocab_size)
        assert all(s[2] == c.num_heads // 2 for s in program.cache_shapes.values())
        reduces = [op for op in program.ops if op.kind == "all_reduce"]
        assert len(reduces) == 2 * c.num_layers and all(op.attrs["tp_size"] == 2 for op in reduces)


def test_unsupported_node_is_named(engines, tmp_path):
    import shutil
    other = tmp_path / "e"
    shutil.copytree(engines["all"], other)
    model = onnx.load(str(other / "rank0" / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "BiasAct" or n.op_type == "Attention")
    node.op_type, node.domain = "Softsign", ""
    onnx.save(model, str(other / "rank0" / "model.onnx"))
    with pytest.raises(UnsupportedNode, match="Softsign"):
        analyze(other / "rank0" / "model.onnx")
