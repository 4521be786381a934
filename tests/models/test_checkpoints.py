import argparse
import configparser
import json

import numpy as np
import pytest
import torch

from moetrt.errors import CheckpointError
from moetrt.models import load
from moetrt.models.checkpoints import (
    FORMATS, convert, detect_format, init_checkpoint, open_checkpoint, synthetic_tensor)
from moetrt.models.checkpoints.common import SAFE_GLOBALS
from moetrt.models.checkpoints.megatron import MODEL_FILE, expert_file


def load_pt(path):
    """Read a .pt fully into memory (no mmap: tests write the same file back)."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, weights_only=True, map_location="cpu")


def originals(config, seed, dtype):
    from moetrt.models.weights import tensor_specs
    return {s.name: synthetic_tensor(config, s.name, seed, dtype) for s in tensor_specs(config)}


def assert_same_tensors(reader, expected):
    assert reader.names() == list(expected)
    for name, want in expected.items():
        got = reader.get(name)
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt, tp", [("moetrt", 1), ("megatron-deepspeed", 1), ("fastertransformer", 1),
                                     ("fastertransformer", 2), ("fastertransformer", 4)])
def test_every_format_round_trips_to_identical_tensors(tmp_path, tiny_config, fmt, tp, dtype):
    init_checkpoint(tmp_path / "a", tiny_config, fmt, dtype, tp=tp, seed=11)
    with open_checkpoint(tmp_path / "a") as reader:
        assert reader.format == fmt and reader.config == tiny_config and reader.dtype == dtype
        assert_same_tensors(reader, originals(tiny_config, 11, dtype))


def test_conversion_chain_preserves_every_tensor(tmp_path, tiny_config):
    init_checkpoint(tmp_path / "m", tiny_config, "megatron-deepspeed", torch.float16, seed=3)
    convert(tmp_path / "m", tmp_path / "ft", "fastertransformer", tp=2)
    convert(tmp_path / "ft", tmp_path / "n", "moetrt")
    convert(tmp_path / "n", tmp_path / "m2", "megatron-deepspeed")
    for path in ("ft", "n", "m2"):
        with open_checkpoint(tmp_path / path) as reader:
            assert_same_tensors(reader, originals(tiny_config, 3, torch.float16))


def test_all_formats_give_the_same_logits(tiny_checkpoints, tiny_config):
    ids = torch.randint(0, tiny_config.vocab_size, (2, 9))
    logits = {fmt: load(path, torch.float64)(ids) for fmt, path in tiny_checkpoints.items()}
    for fmt in FORMATS:
        assert torch.equal(logits[fmt], logits["moetrt"]), fmt


def test_fastertransformer_layout_follows_the_converter(tmp_path, tiny_config):
    """Re-derive FasterTransformer's files from the Megatron tensors with the converter's own steps."""
    init_checkpoint(tmp_path / "m", tiny_config, "megatron-deepspeed", torch.float32, seed=5)
    convert(tmp_path / "m", tmp_path / "ft", "fastertransformer", tp=2)
    states = load_pt(tmp_path / "m" / MODEL_FILE)
    enc = states["module"]["language_model"]["encoder"]
    h, H = tiny_config.hidden_size, tiny_config.num_heads
    D, tp = h // H, 2
    ft = tmp_path / "ft"

    def read(name, shape):
        return np.fromfile(ft / name, dtype=np.float32).reshape(shape)

    qkv = enc["layers.1.self_attention.query_key_value.weight"].numpy().T  # safe_transpose
    qkv = qkv.reshape(h, H, 3, D).transpose(0, 2, 1, 3).reshape(h, 3, h)
    for r, part in enumerate(np.split(qkv, tp, axis=-1)):
        assert np.array_equal(read(f"model.layers.1.attention.query_key_value.weight.{r}.bin", part.shape), part)
    bias = enc["layers.1.self_attention.query_key_value.bias"].numpy().reshape(H, 3, D).transpose(1, 0, 2)
    for r, part in enumerate(np.split(bias.reshape(3, h), tp, axis=-1)):
        assert np.array_equal(read(f"model.layers.1.attention.query_key_value.bias.{r}.bin", part.shape), part)
    dense = enc["layers.0.self_attention.dense.weight"].numpy().T
    for r, part in enumerate(np.split(dense, tp, axis=0)):
        assert np.array_equal(read(f"model.layers.0.attention.dense.weight.{r}.bin", part.shape), part)
    fc1 = enc["layers.0.mlp.dense_h_to_4h.weight"].numpy().T
    for r, part in enumerate(np.split(fc1, tp, axis=-1)):
        assert np.array_equal(read(f"model.layers.0.mlp.dense_h_to_4h.weight.{r}.bin", part.shape), part)
    gate = enc["layers.1.mlp.deepspeed_moe.gate.wg.weight"].numpy().T
    assert np.array_equal(read("model.layers.1.mlp.moe.gate.wg.weight.bin", gate.shape), gate)
    experts = [load_pt(tmp_path / "m" / expert_file(0, e))["module"]
               for e in range(tiny_config.num_experts)]
    key = "language_model.encoder.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.{}.{}"
    w1 = np.stack([experts[e][key.format(e, "dense_h_to_4h.weight")].numpy() for e in range(8)]).transpose(0, 2, 1)
    for r, part in enumerate(np.split(w1, tp, axis=2)):
        assert np.array_equal(read(f"model.layers.1.mlp.moe.experts.dense_h_to_4h.weight.{r}.bin", part.shape), part)
    w2 = np.stack([experts[e][key.format(e, "dense_4h_to_h.weight")].numpy() for e in range(8)]).transpose(0, 2, 1)
    for r, part in enumerate(np.split(w2, tp, axis=1)):
        assert np.array_equal(read(f"model.layers.1.mlp.moe.experts.dense_4h_to_h.weight.{r}.bin", part.shape), part)
    b2 = np.stack([experts[e][key.format(e, "dense_4h_to_h.bias")].numpy() for e in range(8)])
    assert np.array_equal(read("model.layers.1.mlp.moe.experts.dense_4h_to_h.bias.bin", b2.shape), b2)
    ini = configparser.ConfigParser()
    ini.read(ft / "config.ini")
    assert ini["structure"]["moe_layers"] == "[1, 3]" and ini["gpt"]["tensor_para_size"] == "2"


# -- Megatron spellings real checkpoints use -----------------------------------------------------

def _rewrite(path, fn):
    states = load_pt(path)
    torch.save(fn(states), path)


def test_megatron_variants_are_accepted(tmp_path, tiny_config):
    ck = init_checkpoint(tmp_path / "run" / "global_step5", tiny_config, "megatron-deepspeed", torch.float32, seed=2)
    (tmp_path / "run" / "latest").write_text("global_step5\n")
    (ck / "args.txt").unlink()  # configuration from the stored args instead

    def dotted_old_names(states):
        flat = {}
        lm = states["module"]["language_model"]
        for k, v in lm["embedding"].items():
            flat[f"language_model.embedding.{k}.weight"] = v["weight"]
        for k, v in lm["encoder"].items():
            flat["language_model.transformer." + k.replace("self_attention", "attention")] = v
        return {"module": flat, "args": states["args"], "checkpoint_version": 3.0}
    _rewrite(ck / MODEL_FILE, dotted_old_names)
    _rewrite(ck / expert_file(1, 3), lambda s: {"module." + k: v for k, v in s["module"].items()})  # flat
    with open_checkpoint(tmp_path / "run") as reader:
        assert reader.format == "megatron-deepspeed" and reader.config == tiny_config
        assert_same_tensors(reader, originals(tiny_config, 2, torch.float32))


def test_megatron_args_txt_is_parsed_like_megatron_prints_it(tmp_path, tiny_config):
    ck = init_checkpoint(tmp_path / "m", tiny_config, "megatron-deepspeed", torch.float32)
    text = (ck / "args.txt").read_text()
    assert "num_experts:[8]\n" in text and "expert_interval:2\n" in text
    (ck / "args.txt").write_text(text.replace("moe_eval_capacity_factor:0.0", "moe_eval_capacity_factor:1.0")
                                 .replace("moe_token_dropping:False", "moe_token_dropping:True"))
    assert open_checkpoint(ck).config.moe_capacity_factor == 1.0
    assert open_checkpoint(ck, {"moe_capacity_factor": 0.0}).config.moe_capacity_factor == 0.0


# -- malformed checkpoints name the file and the tensor ------------------------------------------

def test_missing_extra_and_misshapen_megatron_tensors(tmp_path, tiny_config):
    ck = init_checkpoint(tmp_path / "m", tiny_config, "megatron-deepspeed", torch.float32)
    key = "layers.2.self_attention.dense.bias"

    def drop(s):
        del s["module"]["language_model"]["encoder"][key]
        return s
    _rewrite(ck / MODEL_FILE, drop)
    with pytest.raises(CheckpointError, match=f"{MODEL_FILE}: missing tensor language_model.encoder.{key}"):
        open_checkpoint(ck)

    def add_back_and_extra(s):
        s["module"]["language_model"]["encoder"][key] = torch.zeros(64)
        s["module"]["language_model"]["encoder"]["layers.2.extra.weight"] = torch.zeros(1)
        return s
    _rewrite(ck / MODEL_FILE, add_back_and_extra)
    with pytest.raises(CheckpointError, match="unexpected tensor.*layers.2.extra.weight"):
        open_checkpoint(ck)

    def misshape(s):
        del s["module"]["language_model"]["encoder"]["layers.2.extra.weight"]
        s["module"]["language_model"]["encoder"][key] = torch.zeros(65)
        return s
    _rewrite(ck / MODEL_FILE, misshape)
    with pytest.raises(CheckpointError, match=r"layers.2.attn.out.bias has shape \(65,\), expected \(64,\)"):
        load(ck)


def test_missing_and_truncated_files(tmp_path, tiny_config):
    m = init_checkpoint(tmp_path / "m", tiny_config, "megatron-deepspeed", torch.float32)
    (m / expert_file(1, 6)).unlink()
    with pytest.raises(CheckpointError, match=r"layer_1_expert_6_mp_rank_00_model_states.pt: missing expert file"):
        open_checkpoint(m)
    m2 = init_checkpoint(tmp_path / "m2", tiny_config, "megatron-deepspeed", torch.float32)
    data = (m2 / expert_file(0, 2)).read_bytes()
    (m2 / expert_file(0, 2)).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="layer_0_expert_2_mp_rank_00_model_states.pt: cannot read"):
        load(m2)

    ft = init_checkpoint(tmp_path / "ft", tiny_config, "fastertransformer", torch.float16, tp=2)
    f = ft / "model.layers.3.mlp.moe.experts.dense_4h_to_h.weight.1.bin"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"dense_4h_to_h.weight.1.bin: tensor layers.3.moe.fc2.weight needs "
                                              r"\d+ bytes .*\(truncated\)"):
        load(ft)
    (ft / "model.wpe.bin").unlink()
    with pytest.raises(CheckpointError, match="model.wpe.bin: missing file for tensor wpe.weight"):
        open_checkpoint(ft)

    n = init_checkpoint(tmp_path / "n", tiny_config, "moetrt", torch.float32)
    shard = sorted(n.glob("*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: cannot read safetensors"):
        load(n)


def test_native_dtype_and_config_mismatches(tmp_path, tiny_config):
    from safetensors.torch import load_file, save_file
    n = init_checkpoint(tmp_path / "n", tiny_config, "moetrt", torch.float32)
    shard = sorted(n.glob("*.safetensors"))[1]
    tensors = load_file(shard)
    tensors["layers.0.ln1.weight"] = tensors["layers.0.ln1.weight"].double()
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="layers.0.ln1.weight has dtype torch.float64, expected torch.float32"):
        load(n)
    cfg = json.loads((n / "config.json").read_text())
    (n / "config.json").write_text(json.dumps(cfg | {"num_heads": 3}))
    with pytest.raises(CheckpointError, match="not divisible by num_heads"):
        open_checkpoint(n)


def test_pickles_with_code_are_refused_and_not_executed(tmp_path, tiny_config):
    m = init_checkpoint(tmp_path / "m", tiny_config, "megatron-deepspeed", torch.float32)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    states = load_pt(m / MODEL_FILE)
    states["payload"] = Evil()
    torch.save(states, m / MODEL_FILE)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        open_checkpoint(m)
    assert not marker.exists()


def test_argparse_namespace_and_numpy_rng_state_are_allowed(tmp_path, tiny_config):
    m = init_checkpoint(tmp_path / "m", tiny_config, "megatron-deepspeed", torch.float32)
    _rewrite(m / MODEL_FILE, lambda s: s | {"rng_state": [{"np_rng_state": np.random.get_state()}],
                                            "args": argparse.Namespace(**vars(s["args"]))})
    assert open_checkpoint(m).config == tiny_config


def test_unrecognised_folders_and_bad_destinations(tmp_path, tiny_checkpoints):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        detect_format(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a recognised checkpoint"):
        detect_format(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        convert(tiny_checkpoints["moetrt"], tiny_checkpoints["megatron-deepspeed"], "moetrt")
    with pytest.raises(CheckpointError, match="must divide num_heads"):
        convert(tiny_checkpoints["moetrt"], tmp_path / "x", "fastertransformer", tp=3)
    assert not (tmp_path / "x").exists()  # nothing half-written is left behind
    with pytest.raises(CheckpointError, match="use --format fastertransformer for --tp > 1"):
        convert(tiny_checkpoints["moetrt"], tmp_path / "y", "megatron-deepspeed", tp=2)


def test_fastertransformer_n_gpu_subfolder_is_found(tmp_path, tiny_config):
    init_checkpoint(tmp_path / "out" / "2-gpu", tiny_config, "fastertransformer", torch.float16, tp=2)
    with open_checkpoint(tmp_path / "out") as reader:
        assert reader.tensor_parallel == 2 and reader.config == tiny_config
