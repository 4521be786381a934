import json
import subprocess
import sys

import pytest

from moetrt.compiler.cli import main


def test_init_inspect_convert(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["init-checkpoint", str(out), "--preset", "tiny", "--format", "megatron-deepspeed",
                 "--dtype", "fp32", "--seed", "4", "--quiet"]) == 0
    assert main(["convert", str(out), str(tmp_path / "ft"), "--to", "fastertransformer", "--tp", "2",
                 "--dtype", "fp16", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ft"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "fastertransformer" and info["dtype"] == "fp16" and info["tensor_parallel"] == 2
    assert info["config"]["num_experts"] == 8
    assert info["parameters_total"] == 713472 and info["parameters_active_per_token"] == 250240
    # fp16 everywhere but the fp32 gate (2 MoE layers x 8 experts x 64)
    assert info["bytes"] == (713472 - 2 * 8 * 64) * 2 + 2 * 8 * 64 * 4
    assert main(["inspect", str(out)]) == 0
    assert "parameters (active/token)  250,240" in capsys.readouterr().out


def test_init_checkpoint_keeps_the_first_layers(tmp_path, capsys):
    from moetrt.models import get_preset, load
    assert main(["init-checkpoint", str(tmp_path / "ck3"), "--preset", "tiny", "--layers", "3", "--quiet"]) == 0
    assert main(["init-checkpoint", str(tmp_path / "ck1"), "--preset", "tiny", "--layers", "1", "--quiet"]) == 0
    full = get_preset("tiny")
    three = load(tmp_path / "ck3").config
    assert three == full.replace(num_layers=3, moe_layers=(1,))
    one = load(tmp_path / "ck1").config  # no MoE layer left: no experts
    assert one.num_layers == 1 and one.moe_layers == () and one.num_experts == 0


@pytest.mark.parametrize("argv, message", [
    (["inspect", "/nonexistent/ckpt"], "moetrt inspect: error: /nonexistent/ckpt: no such checkpoint folder"),
    (["init-checkpoint", "{tmp}/x", "--preset", "tiny", "--format", "fastertransformer", "--tp", "3"],
     "must divide num_heads (4)"),
    (["init-checkpoint", "{tmp}/x", "--preset", "tiny", "--format", "fastertransformer", "--dtype", "fp32",
      "--tp", "0"], "tensor-parallel size must be >= 1"),
    (["init-checkpoint", "{tmp}/x", "--preset", "tiny", "--layers", "5"],
     "--layers must be between 1 and 4 (the layers of preset 'tiny'), got 5"),
])
def test_errors_are_one_line_without_traceback(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv + ["--quiet"] if argv[0] == "init-checkpoint" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_python_dash_m_and_help():
    result = subprocess.run([sys.executable, "-m", "moetrt", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("init-checkpoint", "convert", "inspect", "demo"):
        assert command in result.stdout
    result = subprocess.run([sys.executable, "-m", "moetrt", "init-checkpoint", "--help"], capture_output=True,
                            text=True)
    assert "--preset" in result.stdout and "gpt-moe-350m-64e" in result.stdout


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "demo: ok" in out and "generated ids" in out


def _word_tokenizer(path, vocab_size=512):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path))
    return tok


def test_generate_streams_text_with_a_tokenizer_and_ids_without(tmp_path, capsys):
    assert main(["init-checkpoint", str(tmp_path / "ck"), "--preset", "tiny", "--dtype", "fp32", "--quiet"]) == 0
    assert main(["compile", str(tmp_path / "ck"), "-o", str(tmp_path / "e"), "--dtype", "fp32", "--max-seq", "32",
                 "--quiet"]) == 0
    tok = _word_tokenizer(tmp_path / "tok.json")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "e"), "--prompt-ids", "5,9,2", "--max-new-tokens", "5",
                 "--device", "cpu"]) == 0
    ids = [int(t) for t in capsys.readouterr().out.split()]
    assert len(ids) == 5 and all(0 <= t < 512 for t in ids)
    assert main(["generate", str(tmp_path / "e"), "--prompt", "w5 w9 w2", "--tokenizer", str(tmp_path / "tok.json"),
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == "w5 w9 w2 " + tok.decode(ids)
    assert main(["generate", str(tmp_path / "e"), "--prompt", "w5", "--device", "cpu"]) == 2
    assert "--prompt needs a tokenizer" in capsys.readouterr().err
    # a tokenizer kept in the engine at compile time is found by generate
    assert main(["compile", str(tmp_path / "ck"), "-o", str(tmp_path / "e2"), "--dtype", "fp32", "--max-seq", "32",
                 "--quiet", "--tokenizer", str(tmp_path / "tok.json")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "e2"), "--prompt", "w5 w9 w2", "--max-new-tokens", "5",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == "w5 w9 w2 " + tok.decode(ids)
    assert main(["compile", str(tmp_path / "ck"), "-o", str(tmp_path / "e3"), "--tokenizer",
                 str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such tokenizer file" in capsys.readouterr().err
    assert main(["bench", str(tmp_path)]) == 2
    assert "neither 'kernels' nor an engine directory" in capsys.readouterr().err
