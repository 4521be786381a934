"""compile -> engine directory -> CPU Runtime and validate, against the torch reference model."""

import json

import numpy as np
import pytest
import torch

from moetrt.compiler.cli import main
from moetrt.compiler.pipeline import compile
from moetrt.compiler.validate import validate
from moetrt.engines.format import EngineManifest
from moetrt.engines.runtime import Runtime
from moetrt.errors import MoetrtError
from moetrt.models import load


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_checkpoints):
    return compile(tiny_checkpoints["fastertransformer"], tmp_path_factory.mktemp("eng") / "e", dtype="fp32",
                   max_batch=3, max_seq=48)


def test_engine_directory_layout(engine, tiny_config):
    manifest = json.loads((engine / "engine.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["tensor_parallel"] == 1
    assert manifest["model"] == tiny_config.to_dict() and manifest["checkpoint"]["format"] == "fastertransformer"
    assert manifest["bindings"]["inputs"]["kv_cache_0"]["shape"] == [2, 3, 4, 48, 16]
    assert (engine / "rank0" / "model.onnx").is_file() and (engine / "rank0" / "weights.bin").is_file()
    assert EngineManifest.read(engine).max_seq == 48


def test_runtime_logits_and_greedy_tokens_match_the_model(engine, tiny_checkpoints, tiny_config):
    model = load(tiny_checkpoints["moetrt"])
    runtime = Runtime(engine)
    ids = np.random.default_rng(3).integers(0, tiny_config.vocab_size, (3, 9))
    np.testing.assert_allclose(runtime.logits(ids), model(torch.tensor(ids)).numpy(), rtol=1e-4, atol=1e-4)
    prompts = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6, 7]]
    assert runtime.generate(prompts, 12) == model.generate(prompts, 12)


def test_runtime_sampling_and_streaming(engine):
    runtime = Runtime(engine)
    a = runtime.generate([[1, 2]], 6, temperature=1.0, top_p=0.9, seed=4)
    assert a == runtime.generate([[1, 2]], 6, temperature=1.0, top_p=0.9, seed=4)
    assert runtime.generate([[1, 2]], 6, temperature=0.8, top_k=1, seed=1) == runtime.generate([[1, 2]], 6)
    seen = []
    greedy = runtime.generate([[3, 4]], 6)
    stop = greedy[0][2]
    out = runtime.generate([[3, 4]], 6, stop_tokens=[stop], callback=lambda s, t: seen.append(t[0]))
    assert out[0] == greedy[0][:greedy[0].index(stop) + 1] and seen == out[0]


def test_runtime_rejects_bad_input(engine):
    runtime = Runtime(engine)
    with pytest.raises(MoetrtError, match="batch 4 exceeds the engine's max batch 3"):
        runtime.logits(np.zeros((4, 2), np.int64))
    with pytest.raises(MoetrtError, match="token id out of range"):
        runtime.logits(np.array([[512]]))
    with pytest.raises(MoetrtError, match="exceeds the engine's max sequence 48"):
        runtime.generate([[1] * 40], 10)
    with pytest.raises(MoetrtError, match="device must be one of cpu, cuda, auto"):
        Runtime(engine, device="tpu")


def test_validate_passes_and_detects_a_tampered_engine(engine, tiny_checkpoints, tmp_path):
    assert validate(engine, verbose=False)
    bad = compile(tiny_checkpoints["moetrt"], tmp_path / "bad", dtype="fp32", max_batch=3, max_seq=48)
    data = np.memmap(bad / "rank0" / "weights.bin", dtype=np.float32, mode="r+")
    data[:512 * 64] *= 1.5  # the token embeddings
    data.flush()
    del data
    assert not validate(bad, verbose=False)


def test_compile_errors_are_named(tiny_checkpoints, tmp_path):
    with pytest.raises(MoetrtError, match=r"--tp 3: must divide num_heads \(4\)"):
        compile(tiny_checkpoints["moetrt"], tmp_path / "a", tp=3)
    with pytest.raises(MoetrtError, match="--max-seq must be in 1..256"):
        compile(tiny_checkpoints["moetrt"], tmp_path / "b", max_seq=1000)
    with pytest.raises(MoetrtError, match="not a recognised checkpoint"):
        compile(tmp_path, tmp_path / "c")
    with pytest.raises(MoetrtError, match="--dtype bf16: not supported yet"):
        compile(tiny_checkpoints["moetrt"], tmp_path / "e", dtype="bf16")
    with pytest.raises(MoetrtError, match="--dump-after: unknown pass 'bogus'"):
        compile(tiny_checkpoints["moetrt"], tmp_path / "d", dump_after="bogus")
    assert not (tmp_path / "d").exists()  # nothing half-written
    with pytest.raises(MoetrtError, match="not an engine directory"):
        Runtime(tmp_path)


def test_compiling_a_malformed_checkpoint_names_the_file_and_tensor(tiny_config, tmp_path):
    from moetrt.models.checkpoints import init_checkpoint
    ck = init_checkpoint(tmp_path / "ft", tiny_config, "fastertransformer", torch.float16, tp=2)
    (ck / "model.layers.2.mlp.dense_h_to_4h.weight.1.bin").unlink()
    with pytest.raises(MoetrtError, match=r"dense_h_to_4h.weight.1.bin: missing file for tensor layers.2.mlp.fc1.weight"):
        compile(ck, tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def test_cli_compile_and_validate(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["compile", str(tiny_checkpoints["megatron-deepspeed"]), "-o", str(out), "--dtype", "fp32",
                 "--max-batch", "2", "--max-seq", "32", "--dump-after", "attention", "--quiet"]) == 0
    assert (out / "dumps" / "after_attention.onnx").is_file()
    assert main(["validate", str(out), "--steps", "2"]) == 0
    assert "validate: PASSED" in capsys.readouterr().out


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_engines_equal_tp1(tiny_checkpoints, tiny_config, tmp_path, tp):
    import onnx
    from collections import Counter
    single = Runtime(compile(tiny_checkpoints["moetrt"], tmp_path / "tp1", dtype="fp32", max_batch=2, max_seq=32))
    engine = compile(tiny_checkpoints["moetrt"], tmp_path / f"tp{tp}", tp=tp, dtype="fp32", max_batch=2, max_seq=32)
    manifest = json.loads((engine / "engine.json").read_text())
    assert manifest["tensor_parallel"] == tp
    assert manifest["bindings"]["inputs"]["kv_cache_0"]["shape"] == [2, 2, 4 // tp, 32, 16]
    for r in range(tp):
        ops = Counter(n.op_type for n in onnx.load(str(engine / f"rank{r}" / "model.onnx")).graph.node)
        # one all-reduce after each row-parallel projection: attention out, dense fc2, MoE
        assert ops["AllReduce"] == tiny_config.num_layers + tiny_config.num_layers
    sharded = Runtime(engine)
    ids = np.random.default_rng(tp).integers(0, tiny_config.vocab_size, (2, 7))
    np.testing.assert_allclose(sharded.logits(ids), single.logits(ids), rtol=1e-5, atol=1e-5)
    prompts = [[4, 8, 15, 16], [23, 42]]
    assert sharded.generate(prompts, 10) == single.generate(prompts, 10)
    assert validate(engine, verbose=False)


def test_cli_validate_exits_1_on_a_mismatch(tiny_checkpoints, tmp_path, capsys):
    out = compile(tiny_checkpoints["moetrt"], tmp_path / "e", dtype="fp32", max_batch=1, max_seq=16)
    data = np.memmap(out / "rank0" / "weights.bin", dtype=np.float32, mode="r+")
    data[:512 * 64] = 0.0  # wipe the token embeddings
    data.flush()
    del data
    assert main(["validate", str(out), "--steps", "1"]) == 1
    assert "validate: FAILED" in capsys.readouterr().out


def test_fp16_engine_validates_and_tracks_the_fp32_model(tiny_checkpoints, tiny_config, tmp_path):
    import onnx
    from collections import Counter
    engine = compile(tiny_checkpoints["moetrt"], tmp_path / "e16", dtype="fp16", max_batch=2, max_seq=32)
    ops = Counter(n.op_type for n in onnx.load(str(engine / "rank0" / "model.onnx")).graph.node)
    # every fusion also happens in fp16 graphs (their constants are fp16-rounded)
    assert (ops["BiasAct"], ops["MoE"], ops["Attention"], ops["AddLayerNorm"]) == (2, 2, 4, 9)
    assert ops["Tanh"] == 0
    assert validate(engine, verbose=False)
    ids = np.random.default_rng(9).integers(0, tiny_config.vocab_size, (2, 6))
    got = Runtime(engine).logits(ids)
    want = load(tiny_checkpoints["moetrt"])(torch.tensor(ids)).numpy()
    # fp16 weights and activations through 4 layers: about 1e-3 relative to the logits' scale
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_cli_generate_streams_the_greedy_tokens(engine, tiny_checkpoints, capsys):
    assert main(["generate", str(engine), "--prompt-ids", "5,9,2", "--max-new-tokens", "6"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    assert printed == load(tiny_checkpoints["moetrt"]).generate([[5, 9, 2]], 6)[0]
    assert main(["generate", str(engine), "--prompt-ids", "5,x"]) == 2
    assert "--prompt-ids: expected comma-separated token ids" in capsys.readouterr().err
