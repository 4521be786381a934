import math

import numpy as np
import pytest
import torch

from moetrt.errors import MoetrtError
from moetrt.models import GPTMoE, KVCache, SamplingParams, get_preset, load
from moetrt.models.checkpoints import synthetic_tensor
from moetrt.models.gpt_moe import expert_capacity, route


def random_model(config, dtype=torch.float64, seed=0) -> GPTMoE:
    model = GPTMoE(config, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(synthetic_tensor(config, name, seed, torch.float32))
    return model.eval()


# -- an independent float64 numpy evaluation of the docstring's math ------------------------------

def gelu(x, kind):
    if kind == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_forward(config, sd, ids):
    """logits [T, V] of one sequence, every step written out plainly."""
    W = {k: v.detach().double().numpy() for k, v in sd.items()}
    T, H, D, eps = len(ids), config.num_heads, config.head_dim, config.layernorm_eps
    x = W["wte.weight"][ids] + W["wpe.weight"][np.arange(T)]
    for l in range(config.num_layers):
        p = f"layers.{l}."
        a = ln(x, W[p + "ln1.weight"], W[p + "ln1.bias"], eps)
        qkv = a @ W[p + "attn.qkv.weight"].T + W[p + "attn.qkv.bias"]
        ctx = np.zeros((T, H * D))
        for n in range(H):
            base = n * 3 * D  # Megatron: per head, q then k then v
            q, k, v = (qkv[:, base + j * D: base + (j + 1) * D] for j in range(3))
            s = q @ k.T / math.sqrt(D)
            s[np.triu_indices(T, 1)] = -np.inf
            s = np.exp(s - s.max(-1, keepdims=True))
            ctx[:, n * D:(n + 1) * D] = (s / s.sum(-1, keepdims=True)) @ v
        x = x + ctx @ W[p + "attn.out.weight"].T + W[p + "attn.out.bias"]
        m = ln(x, W[p + "ln2.weight"], W[p + "ln2.bias"], eps)
        if config.is_moe_layer(l):
            logits = m @ W[p + "moe.gate.weight"].T
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            y = np.zeros_like(x)
            for t in range(T):
                top = np.argsort(-probs[t], kind="stable")[:config.top_k]
                w = probs[t, top] / (probs[t, top].sum() if config.top_k > 1 else 1.0)
                for e, we in zip(top, w):
                    hid = gelu(W[p + "moe.fc1.weight"][e] @ m[t] + W[p + "moe.fc1.bias"][e], config.activation)
                    y[t] += we * (W[p + "moe.fc2.weight"][e] @ hid + W[p + "moe.fc2.bias"][e])
            x = x + y
        else:
            hid = gelu(m @ W[p + "mlp.fc1.weight"].T + W[p + "mlp.fc1.bias"], config.activation)
            x = x + hid @ W[p + "mlp.fc2.weight"].T + W[p + "mlp.fc2.bias"]
    return ln(x, W["ln_f.weight"], W["ln_f.bias"], eps) @ W["wte.weight"].T


@pytest.mark.parametrize("top_k, activation", [(1, "gelu_tanh"), (2, "gelu_tanh"), (1, "gelu")])
def test_reference_model_matches_independent_float64_math(top_k, activation):
    config = get_preset("tiny").replace(top_k=top_k, activation=activation)
    model = random_model(config, seed=top_k)
    ids = torch.randint(0, config.vocab_size, (1, 11))
    got = model(ids)[0].numpy()
    want = numpy_forward(config, model.state_dict(), ids[0].numpy())
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-10


def test_parameter_names_are_the_canonical_tensor_names(tiny_config):
    from moetrt.models.weights import tensor_specs
    model = GPTMoE(tiny_config, torch.float16)
    params = dict(model.named_parameters())
    specs = tensor_specs(tiny_config)
    assert list(params) == [s.name for s in specs]
    for s in specs:
        assert tuple(params[s.name].shape) == s.shape and params[s.name].dtype == s.dtype(torch.float16)


def test_incremental_decoding_equals_full_forward(tiny_config):
    model = random_model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    full = model(ids)
    cache = KVCache(tiny_config, 2, 16, torch.float64)
    prefill = model(ids[:, :5], kv_cache=cache)
    steps = [prefill] + [model(ids[:, t:t + 1], kv_cache=cache, past_lengths=torch.tensor([t, t]))
                         for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)


def test_ragged_batch_decoding_equals_each_sequence_alone(tiny_config):
    model = random_model(tiny_config)
    a = torch.randint(0, tiny_config.vocab_size, (1, 7))
    b = torch.randint(0, tiny_config.vocab_size, (1, 3))
    cache = KVCache(tiny_config, 2, 10, torch.float64)
    model(a, kv_cache=cache.select(0, 1))
    model(b, kv_cache=cache.select(1, 2))
    nxt = torch.randint(0, tiny_config.vocab_size, (2, 1))
    step = model(nxt, kv_cache=cache, past_lengths=torch.tensor([7, 3]))
    torch.testing.assert_close(step[0, 0], model(torch.cat([a, nxt[:1]], 1))[0, -1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step[1, 0], model(torch.cat([b, nxt[1:]], 1))[0, -1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top_k, activation", [(1, "gelu_tanh"), (2, "gelu_tanh"), (1, "gelu")])
def test_moe_layer_equals_dense_float64_evaluation_of_every_expert(top_k, activation):
    config = get_preset("tiny").replace(top_k=top_k, activation=activation)
    moe = random_model(config).layers[1].moe
    m = torch.randn(3, 5, config.hidden_size, dtype=torch.float64)
    tokens = m.reshape(-1, config.hidden_size)
    probs = torch.softmax(tokens @ moe.gate.weight.double().T, -1)  # [N, E]
    act = (lambda x: torch.nn.functional.gelu(x, approximate="tanh")) if activation == "gelu_tanh" \
        else torch.nn.functional.gelu
    hidden = act(torch.einsum("efh,nh->nef", moe.fc1.weight, tokens) + moe.fc1.bias)
    every = torch.einsum("ehf,nef->neh", moe.fc2.weight, hidden) + moe.fc2.bias  # [N, E, h]
    order = torch.argsort(probs, dim=-1, descending=True)[:, :top_k]
    weights = torch.zeros_like(probs).scatter(1, order, probs.gather(1, order))
    if top_k == 2:
        weights = weights / weights.sum(-1, keepdim=True)
    want = torch.einsum("ne,neh->nh", weights, every).reshape(m.shape)
    torch.testing.assert_close(moe(m), want, rtol=1e-12, atol=1e-12)


def test_capacity_dropping_hand_checked_cases():
    # DeepSpeed: capacity = max(ceil(tokens / experts * factor * top_k), min_capacity)
    assert expert_capacity(6, 2, 1, 1.0, 1) == 3
    assert expert_capacity(6, 4, 1, 1.0, 1) == 2        # ceil(1.5)
    assert expert_capacity(6, 4, 1, 1.0, 4) == 4        # min_capacity wins
    assert expert_capacity(6, 4, 2, 1.0, 1) == 3        # top-2 doubles the factor
    assert expert_capacity(10, 4, 1, 1.2, 0) == 3       # ceil(2.5 * 1.2 = 3.0) stays 3 in float32
    # six tokens; the first four pick expert 0, which has room for three: token 3 is dropped.
    p = torch.tensor([[.9, .1], [.8, .2], [.7, .3], [.6, .4], [.2, .8], [.3, .7]])
    experts, weights = route(p, 1, capacity_factor=1.0, min_capacity=1)
    assert experts[:, 0].tolist() == [0, 0, 0, 0, 1, 1]
    assert torch.equal(weights[:, 0], torch.tensor([.9, .8, .7, 0., .8, .7]))
    # top-2 over 3 experts, capacity ceil(4/3*2*0.5)=2: first choices fill first (tokens 0,1 on expert 0,
    # token 2,3 on expert 1), so every second choice that lands on expert 0 or 1 is dropped, and
    # the kept first choice is renormalised to weight 1.
    p = torch.tensor([[.6, .3, .1], [.5, .1, .4], [.3, .6, .1], [.2, .5, .3]])
    experts, weights = route(p, 2, capacity_factor=0.5, min_capacity=1)
    assert experts.tolist() == [[0, 1], [0, 2], [1, 0], [1, 2]]
    torch.testing.assert_close(weights, torch.tensor([[1., 0.], [.5 / .9, .4 / .9], [1., 0.], [.5 / .8, .3 / .8]]))
    # factor 0 never drops
    _, weights = route(p, 2)
    assert (weights > 0).all()


def test_capacity_dropping_in_the_model_zeroes_dropped_tokens(tiny_config):
    config = tiny_config.replace(moe_capacity_factor=0.25, moe_min_capacity=0)
    moe = random_model(config).layers[1].moe
    m = torch.randn(1, 16, config.hidden_size, dtype=torch.float64)
    kept = route(moe.gate_probs(m[0]), 1, 0.25, 0)[1][:, 0] > 0
    assert 0 < kept.sum() < 16
    out = moe(m)[0]
    assert torch.all(out[~kept] == 0) and torch.all(out[kept].abs().sum(-1) > 0)


def test_synthetic_routing_is_not_degenerate(tiny_checkpoints, tiny_config):
    model = load(tiny_checkpoints["moetrt"])
    ids = torch.randint(0, tiny_config.vocab_size, (4, 32))
    x = model.wte(ids) + model.wpe(torch.arange(32))
    used = torch.unique(torch.argmax(model.layers[1].moe.gate_probs(torch.nn.functional.layer_norm(
        x, (tiny_config.hidden_size,))), -1))
    assert len(used) >= tiny_config.num_experts // 2


def test_greedy_generate_equals_argmax_of_full_forward(tiny_config):
    model = random_model(tiny_config)
    prompts = [torch.randint(0, tiny_config.vocab_size, (n,)).tolist() for n in (5, 2, 9)]
    outputs = model.generate(prompts, 12)
    for prompt, out in zip(prompts, outputs):
        seq = list(prompt)
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out == seq[len(prompt):]


def test_sampling_is_seeded_and_filters_behave(tiny_config):
    model = random_model(tiny_config)
    prompt = [[1, 2, 3]]
    s = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    assert model.generate(prompt, 8, s) == model.generate(prompt, 8, s)
    assert model.generate(prompt, 8, SamplingParams(temperature=0.7, top_k=1, seed=5)) == model.generate(prompt, 8)
    assert model.generate(prompt, 8, SamplingParams(temperature=1.0, top_p=1e-6, seed=9)) == model.generate(prompt, 8)
    outs = {tuple(model.generate(prompt, 8, SamplingParams(temperature=2.0, seed=i))[0]) for i in range(4)}
    assert len(outs) > 1


def test_stop_tokens_end_a_sequence_and_callback_streams(tiny_config):
    model = random_model(tiny_config)
    greedy = model.generate([[4, 5, 6]], 10)[0]
    stop = greedy[3]
    seen = []
    out = model.generate([[4, 5, 6]], 10, stop_tokens=[stop], callback=lambda step, toks: seen.append(toks[0]))
    assert out[0] == greedy[:greedy.index(stop) + 1] and seen == out[0]


def test_bad_inputs_are_named(tiny_config):
    model = random_model(tiny_config)
    with pytest.raises(MoetrtError, match="token id out of range"):
        model(torch.tensor([[tiny_config.vocab_size]]))
    with pytest.raises(MoetrtError, match="exceeds max_position_embeddings"):
        model.generate([[1] * 250], 10)
    with pytest.raises(MoetrtError, match="exceeds the KV cache's max_seq"):
        model(torch.tensor([[1, 2]]), kv_cache=KVCache(tiny_config, 1, 4), past_lengths=torch.tensor([3]))
    with pytest.raises(MoetrtError, match="at least one token"):
        model.generate([[]], 3)
    with pytest.raises(MoetrtError, match="top_p"):
        SamplingParams(top_p=0)
