import logging
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from moetrt.compiler.export import export_checkpoint, kv_name
from moetrt.engines.reference import ReferenceExecutor
from moetrt.errors import MoetrtError
from moetrt.models import KVCache, load
from moetrt.passes import PIPELINE
from moetrt.passes.attention import ATTENTION_PASS
from moetrt.passes.fold import FOLD
from moetrt.passes.layernorm import LAYERNORM
from moetrt.passes.manager import PassManager


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoints):
    out = tmp_path_factory.mktemp("onnx")
    return onnx.load(str(export_checkpoint(tiny_checkpoints["moetrt"], out, torch.float32, max_batch=2, max_seq=16)))


def feeds_for(config, ids, past, caches):
    f = {"input_ids": ids.astype(np.int32), "position_ids": (past[:, None] + np.arange(ids.shape[1])).astype(np.int32),
         "past_lengths": past.astype(np.int32)}
    f.update({kv_name(l): caches[l] for l in range(config.num_layers)})
    return f


def check_against_model(model_proto, checkpoint, config, steps=3):
    """Prefill then decode steps through the reference executor, against the torch model."""
    ex = ReferenceExecutor(model_proto)
    model = load(checkpoint)
    rng = np.random.default_rng(0)
    caches = [np.zeros((2, 2, config.num_heads, 16, config.head_dim), np.float32) for _ in range(config.num_layers)]
    ref = KVCache(config, 2, 16)
    ids, past = rng.integers(0, config.vocab_size, (2, 5)), np.zeros(2, np.int64)
    for _ in range(steps):
        out = ex.run(feeds_for(config, ids, past, caches))
        caches = [out[kv_name(l) + "_out"] for l in range(config.num_layers)]
        want = model(torch.tensor(ids), kv_cache=ref, past_lengths=torch.tensor(past)).numpy()
        np.testing.assert_allclose(out["logits"], want, rtol=1e-4, atol=1e-4)
        past = past + ids.shape[1]
        ids = rng.integers(0, config.vocab_size, (2, 1))


def test_fold_then_layernorm_fuses_every_layernorm(exported, tiny_checkpoints, tiny_config):
    before = Counter(n.op_type for n in exported.graph.node)
    assert before["ReduceMean"] == 2 * (2 * tiny_config.num_layers + 1)
    lowered = PassManager([FOLD, LAYERNORM]).run(exported)
    after = Counter(n.op_type for n in lowered.graph.node)
    assert after["AddLayerNorm"] == 2 * tiny_config.num_layers + 1
    for op in ("ReduceMean", "Sqrt", "Pow"):
        assert after[op] == 0, op
    fused = [n for n in lowered.graph.node if n.op_type == "AddLayerNorm"]
    assert all(n.domain == "moetrt" for n in fused)
    attrs = {a.name for a in fused[0].attribute}
    assert {"plugin_version", "plugin_namespace", "epsilon"} <= attrs
    # every one absorbed its residual Add (the first one adds the two embeddings)
    assert all(len(n.input) == 4 and n.input[1] for n in fused)
    check_against_model(lowered, tiny_checkpoints["moetrt"], tiny_config)


def test_attention_fusion_leaves_no_attention_pieces(exported, tiny_checkpoints, tiny_config):
    lowered = PassManager([FOLD, LAYERNORM, ATTENTION_PASS]).run(exported)
    ops = Counter(n.op_type for n in lowered.graph.node)
    assert ops["Attention"] == tiny_config.num_layers
    assert ops["ScatterND"] == 0 and ops["Where"] == 0 and ops["Transpose"] == 0
    assert ops["Softmax"] == len(tiny_config.moe_layers)  # only the MoE gates' softmax remains
    attn = [n for n in lowered.graph.node if n.op_type == "Attention"]
    for layer, node in enumerate(attn):
        assert node.input[2] == "past_lengths" and node.output[1] == kv_name(layer) + "_out"
    check_against_model(lowered, tiny_checkpoints["moetrt"], tiny_config)


@pytest.mark.parametrize("top_k, activation", [(1, "gelu_tanh"), (2, "gelu_tanh"), (1, "gelu")])
def test_whole_pipeline_leaves_only_plugin_nodes_for_the_hot_regions(tmp_path, tiny_config, top_k, activation):
    from moetrt.models.checkpoints import init_checkpoint
    config = tiny_config.replace(top_k=top_k, activation=activation)
    ck = init_checkpoint(tmp_path / "ck", config, "moetrt", torch.float32, seed=5 + top_k)
    exported = onnx.load(str(export_checkpoint(ck, tmp_path / "onnx", torch.float32, max_batch=2, max_seq=16)))
    lowered = PassManager(PIPELINE).run(exported)
    ops = Counter(n.op_type for n in lowered.graph.node)
    assert ops["MoE"] == len(config.moe_layers) and ops["Attention"] == config.num_layers
    assert ops["AddLayerNorm"] == 2 * config.num_layers + 1
    assert ops["BiasAct"] == config.num_layers - len(config.moe_layers)  # the dense MLPs
    for op in ("Softmax", "TopK", "ReduceMean", "Pow", "Sqrt", "Einsum", "ScatterElements", "ScatterND", "Where",
               "Tanh", "Erf"):
        assert ops[op] == 0, op
    moe = [n for n in lowered.graph.node if n.op_type == "MoE"][0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe.attribute}
    assert attrs["top_k"] == top_k and attrs["activation_kind"] == activation.encode()
    bias_act = [n for n in lowered.graph.node if n.op_type == "BiasAct"][0]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in bias_act.attribute}["activation"] == activation.encode()
    check_against_model(lowered, ck, config)


def test_attention_with_another_scale_is_not_fused(exported, caplog):
    """A graph scaling scores by something other than 1/sqrt(head_dim) is not the plugin's attention."""
    lowered = PassManager([FOLD, LAYERNORM]).run(exported)
    import onnx_graphsurgeon as gs
    graph = gs.import_onnx(lowered)
    softmax = next(n for n in graph.nodes if n.op == "Softmax")
    div = next(i.inputs[0] for i in softmax.inputs[0].inputs[0].inputs if isinstance(i, gs.Variable) and i.inputs
               and i.inputs[0].op == "Div")
    div.inputs[1] = gs.Constant("other_scale", np.array(3.0, np.float32))
    with caplog.at_level(logging.WARNING, logger="moetrt.passes"):
        out = PassManager([ATTENTION_PASS]).run(gs.export_onnx(graph))
    assert "not sqrt(head_dim)" in caplog.text
    assert Counter(n.op_type for n in out.graph.node)["Attention"] == 3  # the other layers still fuse


def test_attention_pass_warns_on_an_unrecognised_masked_softmax(caplog):
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 3])
    m = helper.make_tensor_value_info("m", TensorProto.BOOL, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    ninf = helper.make_tensor("ninf", TensorProto.FLOAT, [], [float("-inf")])
    nodes = [helper.make_node("Where", ["m", "ninf", "s"], ["w"]), helper.make_node("Softmax", ["w"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "sm", [s, m], [y], [ninf]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with caplog.at_level(logging.WARNING, logger="moetrt.passes"):
        lowered = PassManager([ATTENTION_PASS]).run(model)
    assert "attention: not fused" in caplog.text
    assert [n.op_type for n in lowered.graph.node] == ["Where", "Softmax"]


def test_unrecognised_layernorm_is_left_unchanged_with_a_warning(caplog):
    """Normalisation over axis 0 is not a LayerNorm over the hidden size: no fusion, same numbers."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])
    consts = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
              helper.make_tensor("g", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0]),
              helper.make_tensor("b", TensorProto.FLOAT, [4], [0.1, 0.2, 0.3, 0.4])]
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0]), helper.make_node("Sub", ["x", "m"], ["c"]),
             helper.make_node("Pow", ["c", "two"], ["p"]), helper.make_node("ReduceMean", ["p"], ["v"], axes=[0]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["c", "s"], ["n"]), helper.make_node("Mul", ["n", "g"], ["ng"]),
             helper.make_node("Add", ["ng", "b"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "ln0", [x], [y], consts), opset_imports=[helper.make_opsetid("", 17)])
    with caplog.at_level(logging.WARNING, logger="moetrt.passes"):
        lowered = PassManager([LAYERNORM]).run(model)
    assert "not fused" in caplog.text and "last axis" in caplog.text
    assert [n.op_type for n in lowered.graph.node] == [n.op_type for n in model.graph.node]
    feed = {"x": np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)}
    np.testing.assert_allclose(ReferenceExecutor(lowered).run(feed)["y"], ReferenceExecutor(model).run(feed)["y"])


def test_manager_dumps_and_rejects_unknown_passes(exported, tmp_path):
    PassManager([FOLD, LAYERNORM], dump_after="layernorm", dump_dir=tmp_path).run(exported)
    assert (tmp_path / "after_layernorm.onnx").is_file()
    with pytest.raises(MoetrtError, match="--dump-after: unknown pass 'attention'"):
        PassManager([FOLD, LAYERNORM], dump_after="attention")
