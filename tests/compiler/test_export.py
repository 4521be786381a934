"""The exported step graph, run by ONNX Runtime, against the torch reference model."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from moetrt.compiler.export import export_checkpoint, kv_name
from moetrt.errors import MoetrtError
from moetrt.models import KVCache, load
from moetrt.models.checkpoints import init_checkpoint


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_step(sess, config, ids, past, caches):
    feeds = {"input_ids": ids.astype(np.int32), "position_ids": (past[:, None] + np.arange(ids.shape[1])).astype(np.int32),
             "past_lengths": past.astype(np.int32)}
    feeds.update({kv_name(l): caches[l] for l in range(config.num_layers)})
    out = sess.run(None, feeds)
    return out[0], out[1:]


@pytest.mark.parametrize("top_k", [1, 2])
def test_exported_graph_matches_the_model_over_prefill_and_decode(tmp_path, tiny_config, top_k):
    config = tiny_config.replace(top_k=top_k)
    ck = init_checkpoint(tmp_path / "ck", config, "moetrt", torch.float32, seed=top_k)
    path = export_checkpoint(ck, tmp_path / "onnx", torch.float32, max_batch=2, max_seq=24)
    sess = session(path)
    model = load(ck)
    rng = np.random.default_rng(top_k)
    B, S = 2, 24
    caches = [np.zeros((2, B, config.num_heads, S, config.head_dim), np.float32) for _ in range(config.num_layers)]
    ref_cache = KVCache(config, B, S)
    # ragged prompts of 6 and 7 tokens, prefilled together right-padded: the pad token of sequence 0 lands
    # in slot 6, which its first decode step overwrites (and the causal mask hides until then)
    prompt = rng.integers(0, config.vocab_size, (B, 7))
    logits, caches = run_step(sess, config, prompt, np.zeros(B, np.int64), caches)
    want0 = model(torch.tensor(prompt[:1, :6]), kv_cache=ref_cache.select(0, 1))
    want1 = model(torch.tensor(prompt[1:]), kv_cache=ref_cache.select(1, 2))
    np.testing.assert_allclose(logits[0, :6], want0[0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits[1], want1[0].numpy(), rtol=1e-4, atol=1e-4)
    past = np.array([6, 7])
    for _ in range(4):
        nxt = rng.integers(0, config.vocab_size, (B, 1))
        logits, caches = run_step(sess, config, nxt, past, caches)
        want = model(torch.tensor(nxt), kv_cache=ref_cache, past_lengths=torch.tensor(past))
        np.testing.assert_allclose(logits, want.numpy(), rtol=1e-4, atol=1e-4)
        past = past + 1
    for layer in range(config.num_layers):
        for b in range(B):
            n = past[b]
            np.testing.assert_allclose(caches[layer][0, b, :, :n], ref_cache.k[layer][b, :, :n].numpy(), atol=1e-5)
            np.testing.assert_allclose(caches[layer][1, b, :, :n], ref_cache.v[layer][b, :, :n].numpy(), atol=1e-5)


def test_last_token_logits_and_external_weights(tmp_path, tiny_checkpoints, tiny_config):
    path = export_checkpoint(tiny_checkpoints["megatron-deepspeed"], tmp_path / "o", torch.float32, max_batch=1,
                             max_seq=16, last_token_logits=True)
    assert (tmp_path / "o" / "weights.bin").stat().st_size > 700_000 * 4  # every parameter, fp32
    assert path.stat().st_size < 1_000_000  # the graph itself holds no weights
    ids = np.array([[3, 1, 4, 1, 5]])
    caches = [np.zeros((2, 1, 4, 16, 16), np.float32) for _ in range(tiny_config.num_layers)]
    logits, _ = run_step(session(path), tiny_config, ids, np.zeros(1, np.int64), caches)
    want = load(tiny_checkpoints["moetrt"])(torch.tensor(ids))[:, -1:]
    assert logits.shape == (1, 1, tiny_config.vocab_size)
    np.testing.assert_allclose(logits, want.numpy(), rtol=1e-4, atol=1e-4)


def test_export_errors_are_named(tmp_path, tiny_checkpoints):
    with pytest.raises(MoetrtError, match="max_seq 999 exceeds max_position_embeddings 256"):
        export_checkpoint(tiny_checkpoints["moetrt"], tmp_path / "x", max_seq=999)
    with pytest.raises(MoetrtError, match="token dropping"):
        export_checkpoint(tiny_checkpoints["moetrt"], tmp_path / "y", overrides={"moe_capacity_factor": 1.0})
