"""The specs' numpy references agree with the torch reference model (the single semantics)."""

import numpy as np
import pytest
import torch

from moetrt.models import GPTMoE, KVCache, get_preset
from moetrt.models.checkpoints import synthetic_tensor
from moetrt.plugins.specs import (SPECS, add_layernorm_reference, attention_reference, fold_layernorm_reference,
                                  moe_reference)


def model64(config, seed=0):
    model = GPTMoE(config, torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(synthetic_tensor(config, name, seed, torch.float32))
    return model


@pytest.mark.parametrize("top_k, capacity", [(1, 0.0), (2, 0.0), (1, 0.5), (2, 0.75)])
def test_moe_reference_equals_model(top_k, capacity):
    config = get_preset("tiny").replace(top_k=top_k, moe_capacity_factor=capacity, moe_min_capacity=1)
    moe = model64(config, seed=top_k).layers[3].moe
    x = torch.randn(24, config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        want = moe(x).numpy()
    got = moe_reference(x.numpy(), moe.gate.weight.detach().numpy(), moe.fc1.weight.detach().numpy(),
                        moe.fc1.bias.detach().numpy(), moe.fc2.weight.detach().numpy(),
                        moe.fc2.bias.detach().numpy(), top_k, "gelu_tanh", capacity, 1)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_attention_reference_equals_model_with_ragged_cache():
    config = get_preset("tiny")
    attn = model64(config).layers[0].attn
    B, T, S = 3, 4, 12
    cache = KVCache(config, B, S, torch.float64)
    for t in (cache.k[0], cache.v[0]):
        t.normal_()
    past = torch.tensor([0, 5, 8])
    start = np.stack([cache.k[0].numpy(), cache.v[0].numpy()]).copy()
    a = torch.randn(B, T, config.hidden_size, dtype=torch.float64)
    qkv = attn.qkv(a).detach()
    slots = past[:, None] + torch.arange(T)
    with torch.no_grad():
        want = attn(a, cache.k[0], cache.v[0], slots, int(past.max()) + T)
    ctx, new_cache = attention_reference(qkv.numpy(), start, past.numpy(), config.num_heads)
    got = ctx @ attn.out.weight.detach().numpy().T + attn.out.bias.detach().numpy()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new_cache, np.stack([cache.k[0].numpy(), cache.v[0].numpy()]), rtol=0, atol=0)


def test_add_layernorm_reference_equals_torch():
    x, d = torch.randn(5, 64, dtype=torch.float64), torch.randn(5, 64, dtype=torch.float64)
    g, b = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    total, normed = add_layernorm_reference(x, d, g, b, 1e-5)
    np.testing.assert_allclose(total, (x + d).numpy())
    np.testing.assert_allclose(normed, torch.nn.functional.layer_norm(x + d, (64,), g, b, 1e-5).numpy(), rtol=1e-12)


def test_specs_carry_the_plugin_attributes():
    for name, spec in SPECS.items():
        attrs = spec.node_attributes()
        assert spec.domain == "moetrt" and attrs["plugin_version"] == spec.version
        assert attrs["plugin_namespace"] == "moetrt"
    with pytest.raises(ValueError, match="unknown attribute"):
        SPECS["MoE"].node_attributes(topk=2)


@pytest.mark.parametrize("mean", [0.0, 4.0])
def test_fold_layernorm_reference_is_layernorm_then_linear(mean):
    """gemv_folded's contract, in float64 on the CPU: r (x W'^T - mu colsum) + b' with fold_layernorm_reference's
    W', colsum and b' is LayerNorm(x) gamma + beta then x W^T + b (colsum and b' are fp32, hence the 1e-6)."""
    rng = np.random.default_rng(int(mean))
    M, K, N = 5, 96, 40
    x = mean + rng.standard_normal((M, K))
    gamma, beta = 1 + 0.2 * rng.standard_normal(K), 0.2 * rng.standard_normal(K)
    w, b = rng.standard_normal((N, K)) / K ** 0.5, rng.standard_normal(N)
    folded, colsum, bias = fold_layernorm_reference(gamma, beta, w, b)
    assert folded.dtype == np.float64 and colsum.dtype == bias.dtype == np.float32
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    r = 1 / np.sqrt(var + 1e-5)
    got = r * (x @ folded.T - mu * colsum.astype(np.float64)) + bias
    want = add_layernorm_reference(x, None, gamma, beta, 1e-5)[1] @ w.T + b
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # fp16 weights: the folded ones are rounded once, colsum sums them as rounded
    f16, c16, _ = fold_layernorm_reference(gamma, beta, w.astype(np.float16))
    assert f16.dtype == np.float16
    np.testing.assert_array_equal(f16, (w.astype(np.float16).astype(np.float64) * gamma).astype(np.float16))
    np.testing.assert_allclose(c16, f16.astype(np.float64).sum(1), rtol=1e-6)
