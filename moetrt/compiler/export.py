"""Export: the GPT-MoE step graph to ONNX, with the KV cache as explicit inputs and outputs.

One graph serves prefill (T > 1) and decode (T = 1); B and T are dynamic. Inputs::

    input_ids    [B, T] int32        position_ids [B, T] int32      past_lengths [B] int32
    kv_cache_{l} [2, max_batch, H, max_seq, D]  (K then V; row b is sequence b, slot s its position s)

Outputs: ``logits`` ([B, T, V], or [B, 1, V] for each sequence's last token when ``last_token_logits``)
and ``kv_cache_{l}_out``, the cache with the T new tokens written at slots ``past_lengths[b] + t``.

The graph is traced with the weights as *inputs* backed by zero-stride dummy tensors, so tracing costs no
weight memory; ``bind_weights`` then turns those inputs into initializers whose bytes go to one external
data file, streamed tensor by tensor from a checkpoint. The semantics are those of ``moetrt.models.GPTMoE``
written with plain ONNX ops (LayerNorm decomposed, attention over the whole cache with a causal mask, MoE as
gate softmax + TopK + a dense evaluation of every expert combined by the routing weights) for the passes to
rewrite. The TorchScript exporter is used: it needs no onnxscript and emits a stable op set.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from moetrt.errors import MoetrtError
from moetrt.models.config import ModelConfig
from moetrt.models.weights import tensor_specs

OPSET = 17
INPUTS = ("input_ids", "position_ids", "past_lengths")


def kv_name(layer: int) -> str:
    return f"kv_cache_{layer}"


def _layer_norm(x, weight, bias, eps):
    """Decomposed, in fp32: the pattern the LayerNorm pass fuses."""
    x32 = x.float()
    centered = x32 - x32.mean(-1, keepdim=True)
    var = centered.pow(2).mean(-1, keepdim=True)
    return (centered / torch.sqrt(var + eps) * weight.float() + bias.float()).to(x.dtype)


def _act(x, kind):
    if kind == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class StepGraph(torch.nn.Module):
    """The step computation of ``GPTMoE`` over explicit weights (canonical names, ``tensor_specs`` order)."""

    def __init__(self, config: ModelConfig, last_token_logits: bool = False):
        super().__init__()
        if config.moe_capacity_factor > 0:
            raise MoetrtError("export: moe_capacity_factor > 0 (token dropping) is not exportable yet; "
                              "compile with --override moe_capacity_factor=0 or use the reference model")
        self.config = config
        self.last_token_logits = last_token_logits
        self.weight_names = [s.name for s in tensor_specs(config)]

    def forward(self, input_ids, position_ids, past_lengths, *rest):
        cfg = self.config
        L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
        caches, weights = rest[:L], dict(zip(self.weight_names, rest[L:]))
        B, T = input_ids.shape[0], input_ids.shape[1]
        x = weights["wte.weight"][input_ids.long()] + weights["wpe.weight"][position_ids.long()]
        dev = input_ids.device
        slots = past_lengths.long()[:, None] + torch.arange(T, dtype=torch.long, device=dev)[None, :]  # [B, T]
        rows = torch.arange(B, dtype=torch.long, device=dev)[:, None].expand(B, T)
        new_caches = []
        for layer in range(L):
            p = f"layers.{layer}."
            a = _layer_norm(x, weights[p + "ln1.weight"], weights[p + "ln1.bias"], cfg.layernorm_eps)
            qkv = (a @ weights[p + "attn.qkv.weight"].t() + weights[p + "attn.qkv.bias"]).view(B, T, H, 3, D)
            q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # [B, T, H, D]
            cache = caches[layer]  # [2, Bm, H, S, D]
            kc = cache[0].transpose(1, 2).index_put((rows, slots), k).transpose(1, 2)  # write [b, :, slot]
            vc = cache[1].transpose(1, 2).index_put((rows, slots), v).transpose(1, 2)
            new_caches.append(torch.stack([kc, vc]))
            keys, values = kc[:B], vc[:B]  # [B, H, S, D]
            S = keys.shape[2]
            scores = torch.matmul(q.transpose(1, 2).float(), keys.float().transpose(2, 3)) / math.sqrt(D)
            visible = torch.arange(S, dtype=torch.long, device=dev)[None, None, :] <= slots[:, :, None]  # [B, T, S]
            scores = scores.masked_fill(~visible[:, None], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            ctx = torch.matmul(probs, values.float()).to(x.dtype).transpose(1, 2).reshape(B, T, H * D)
            x = x + (ctx @ weights[p + "attn.out.weight"].t() + weights[p + "attn.out.bias"])
            m = _layer_norm(x, weights[p + "ln2.weight"], weights[p + "ln2.bias"], cfg.layernorm_eps)
            if cfg.is_moe_layer(layer):
                x = x + self._moe(m, weights, p)
            else:
                hidden = _act(m @ weights[p + "mlp.fc1.weight"].t() + weights[p + "mlp.fc1.bias"], cfg.activation)
                x = x + (hidden @ weights[p + "mlp.fc2.weight"].t() + weights[p + "mlp.fc2.bias"])
        x = _layer_norm(x, weights["ln_f.weight"], weights["ln_f.bias"], cfg.layernorm_eps)
        if self.last_token_logits:
            x = x[:, -1:]
        head = weights["wte.weight"] if cfg.tie_word_embeddings else weights["lm_head.weight"]
        return (x @ head.t(), *new_caches)

    def _moe(self, m, weights, p):
        cfg = self.config
        B, T, h = m.shape
        tokens = m.reshape(B * T, h)
        probs = torch.softmax(tokens.float() @ weights[p + "moe.gate.weight"].float().t(), dim=-1)  # [N, E]
        top_probs, experts = torch.topk(probs, cfg.top_k, dim=-1)
        if cfg.top_k > 1:
            top_probs = top_probs / top_probs.sum(-1, keepdim=True)
        combine = torch.zeros_like(probs).scatter(1, experts, top_probs)  # [N, E]
        hidden = _act(torch.einsum("nh,efh->nef", tokens, weights[p + "moe.fc1.weight"])
                      + weights[p + "moe.fc1.bias"], cfg.activation)
        every = torch.einsum("nef,ehf->neh", hidden, weights[p + "moe.fc2.weight"]) + weights[p + "moe.fc2.bias"]
        out = torch.einsum("ne,neh->nh", combine, every.float())
        return out.to(m.dtype).reshape(B, T, h)


def export_step_graph(config: ModelConfig, dtype: torch.dtype = torch.float32, max_batch: int = 1,
                      max_seq: int | None = None, last_token_logits: bool = False) -> onnx.ModelProto:
    """The step graph with every weight as a graph input (no weight bytes); see ``bind_weights``."""
    max_seq = max_seq or config.max_position_embeddings
    if max_seq > config.max_position_embeddings:
        raise MoetrtError(f"export: max_seq {max_seq} exceeds max_position_embeddings {config.max_position_embeddings}")
    graph = StepGraph(config, last_token_logits)
    B, T = min(2, max_batch), 3
    # The trace is a real forward pass (every expert, on dummy weights): on a GPU when torch sees one, as an
    # fp16 forward of a large model on the CPU takes minutes. The graph recorded does not depend on it.
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = [torch.zeros(B, T, dtype=torch.int32, device=dev), torch.zeros(B, T, dtype=torch.int32, device=dev),
            torch.zeros(B, dtype=torch.int32, device=dev)]
    cache_shape = (2, max_batch, config.num_heads, max_seq, config.head_dim)
    args += [torch.zeros(cache_shape, dtype=dtype, device=dev) for _ in range(config.num_layers)]
    # zero-stride dummies: the right shapes and dtypes, one element of memory each
    args += [torch.zeros((), dtype=s.dtype(dtype), device=dev).expand(s.shape) for s in tensor_specs(config)]
    names = list(INPUTS) + [kv_name(l) for l in range(config.num_layers)] + graph.weight_names
    outputs = ["logits"] + [kv_name(l) + "_out" for l in range(config.num_layers)]
    dynamic = {"input_ids": {0: "batch", 1: "tokens"}, "position_ids": {0: "batch", 1: "tokens"},
               "past_lengths": {0: "batch"}, "logits": {0: "batch", 1: "tokens"}}
    import io
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, tuple(args), buffer, input_names=names, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, do_constant_folding=False)
    model = onnx.load_from_string(buffer.getvalue())
    model.doc_string = f"moetrt step graph: {config.to_json().strip()}"
    return model


def bind_weights(model: onnx.ModelProto, get: Callable[[str], torch.Tensor], names: list[str], data_dir: Path,
                 data_file: str = "weights.bin", dtype: torch.dtype | None = None, progress=None) -> onnx.ModelProto:
    """Turn the weight inputs ``names`` into initializers stored in ``data_dir/data_file`` (ONNX external data),
    written one tensor at a time from ``get(name)``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    inputs = {i.name: i for i in model.graph.input}
    missing = [n for n in names if n not in inputs]
    if missing:
        raise MoetrtError(f"bind_weights: graph has no weight input {missing[0]}")
    offset = 0
    with open(data_dir / data_file, "wb") as f:
        for name in names:
            t = get(name)
            elem = inputs[name].type.tensor_type.elem_type
            want = onnx.helper.tensor_dtype_to_np_dtype(elem)
            array = t.detach().cpu().numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
            array = np.ascontiguousarray(array.astype(want, copy=False))
            pad = (-offset) % 64  # aligned, so the runtime can map tensors in place
            f.write(b"\0" * pad)
            offset += pad
            f.write(array.tobytes())
            tensor = onnx.TensorProto(name=name, data_type=elem, dims=list(array.shape))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_file), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            model.graph.initializer.append(tensor)
            offset += array.nbytes
            if progress is not None:
                progress.update(1)
    kept = [i for i in model.graph.input if i.name not in set(names)]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                      max_batch: int = 1, max_seq: int | None = None, last_token_logits: bool = False,
                      overrides: dict | None = None, progress: bool = False) -> Path:
    """``out_dir/model.onnx`` + ``out_dir/weights.bin``: the checkpoint's step graph, weights in ``dtype``
    (the MoE gate stays float32), streamed from the checkpoint one tensor at a time."""
    from tqdm import tqdm

    from moetrt.models.checkpoints import open_checkpoint

    out_dir = Path(out_dir)
    with open_checkpoint(checkpoint_dir, overrides) as reader:
        config = reader.config
        model = export_step_graph(config, dtype, max_batch, max_seq, last_token_logits)
        names = [s.name for s in tensor_specs(config)]
        with tqdm(total=len(names), desc="binding weights", unit="tensor", disable=not progress) as bar:
            bind_weights(model, reader.get, names, out_dir, progress=bar)
    path = out_dir / "model.onnx"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return path
