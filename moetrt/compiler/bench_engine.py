"""``moetrt bench ENGINE``: the GPU runtime against PyTorch on the same weights and against the bandwidth floor,
side by side in one run.

For each batch size B (prompts of ``input_len`` random tokens, ``output_len`` new tokens, greedy):

- **moetrt**: prefill latency (all B prompts), per-token decode latency as the user sees it (CUDA-graph replay,
  GPU sampling, the token copied back, one host sync per step) and the GPU time of one decode graph replay
  (CUDA events over back-to-back replays), tokens/s, device memory held by the runtime;
- **PyTorch eager**: ``moetrt.models.GPTMoE`` on the GPU, its loop over the hit experts, KV cache in place;
- **PyTorch best**: a decode step written for speed (static KV cache, gathered expert weights and ``bmm``, SDPA,
  everything preallocated) captured in a CUDA graph per batch size;
- **floor**: the bytes a step must read (dense weights, the LM head, the gate, the distinct experts the step's
  tokens route to, counted from the torch model's gate on the same inputs, the KV cache up to the context) / the
  copy bandwidth measured in this run; for a tensor-parallel engine, what one rank must read (its share of the
  split weights and KV cache, plus the replicated ones). Prefill's floor reads every weight once; it is also
  given counting only the experts the prompt routes to.

Prints a table of ratios, writes JSON and (with matplotlib) a PNG plot. Needs torch with CUDA.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from moetrt.errors import MoetrtError
from moetrt.plugins.bench import copy_bandwidth, cuda_torch


def step_bytes(config, itemsize: int, batch: int, context: int, hit: float | None = None, tp: int = 1) -> dict:
    """Bytes a decode step of ``batch`` tokens must read, per rank of a ``tp``-way engine (projections, experts and
    the KV cache split, LayerNorms, gates and the LM head replicated, as ``passes.shard`` lays them out); ``hit``:
    distinct experts per MoE layer (measured), else the expectation under uniform routing."""
    h, f, V, E, k = (config.hidden_size, config.ffn_hidden_size, config.vocab_size, config.num_experts,
                     config.top_k)
    attn = (4 * h * h + 4 * h) * itemsize
    dense_ffn = (2 * h * f + f + h) * itemsize
    expert = (2 * h * f + f + h) * itemsize
    moe_layers = len([l for l in range(config.num_layers) if config.is_moe_layer(l)])
    dense_layers = config.num_layers - moe_layers
    if hit is None:
        hit = E * (1 - (1 - min(k, E) / E) ** batch)  # expected distinct experts hit per MoE layer
    split = config.num_layers * attn + dense_layers * dense_ffn + moe_layers * hit * expert
    replicated = config.num_layers * 4 * h * itemsize + moe_layers * E * h * 4 + V * h * itemsize
    weights = split / tp + replicated
    kv = config.num_layers * 2 * batch * context * h * itemsize / tp
    return {"weights": weights, "kv": kv, "total": weights + kv, "experts_hit": hit}


def all_weight_bytes(config, itemsize: int) -> int:
    from moetrt.models.weights import tensor_specs
    return sum(int(np.prod(s.shape)) * (4 if "gate" in s.name else itemsize) for s in tensor_specs(config))


class FastTorchDecoder:
    """The best decode step we could write in PyTorch: static KV cache, gathered expert weights + bmm, SDPA,
    no host work inside the step; captured in a CUDA graph per batch size."""

    def __init__(self, model, max_batch: int, max_seq: int):
        torch = cuda_torch("bench")
        self.torch, self.model, cfg = torch, model, model.config
        self.cfg = cfg
        self.H, self.D = cfg.num_heads, cfg.head_dim
        dev, dt = "cuda", model.dtype
        self.k = [torch.zeros(max_batch, self.H, max_seq, self.D, dtype=dt, device=dev) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros_like(c) for c in self.k]
        self.max_seq = max_seq
        self.graphs = {}

    def prefill_from(self, cache) -> None:
        """Take over the K/V the eager model wrote (same weights, so the same context)."""
        for l in range(self.cfg.num_layers):
            B = cache.k[l].shape[0]
            self.k[l][:B].copy_(cache.k[l][:, :, :self.max_seq])
            self.v[l][:B].copy_(cache.v[l][:, :, :self.max_seq])

    def step(self, ids, pos):
        """ids [B] int64, pos [B] int64 (cache slot of the new token) -> logits [B, V] (static shapes)."""
        torch, F, m, cfg = self.torch, self.torch.nn.functional, self.model, self.cfg
        B = ids.shape[0]
        x = m.wte.weight[ids] + m.wpe.weight[pos]
        rows = torch.arange(B, device=ids.device)
        visible = torch.arange(self.max_seq, device=ids.device)[None, :] <= pos[:, None]  # [B, S]
        mask = visible[:, None, None, :]
        for l, block in enumerate(m.layers):
            a = F.layer_norm(x.float(), (cfg.hidden_size,), block.ln1.weight.float(), block.ln1.bias.float(),
                             cfg.layernorm_eps).to(x.dtype)
            qkv = F.linear(a, block.attn.qkv.weight, block.attn.qkv.bias).view(B, self.H, 3, self.D)
            q, k, v = qkv.unbind(2)
            self.k[l][rows, :, pos] = k
            self.v[l][rows, :, pos] = v
            ctx = F.scaled_dot_product_attention(q[:, :, None], self.k[l][:B], self.v[l][:B], attn_mask=mask)
            x = x + F.linear(ctx.reshape(B, -1), block.attn.out.weight, block.attn.out.bias)
            mm = F.layer_norm(x.float(), (cfg.hidden_size,), block.ln2.weight.float(), block.ln2.bias.float(),
                              cfg.layernorm_eps).to(x.dtype)
            if hasattr(block, "moe"):
                moe = block.moe
                probs = torch.softmax(F.linear(mm.float(), moe.gate.weight.float()), -1)
                w, e = torch.topk(probs, cfg.top_k, -1)  # [B, k]
                if cfg.top_k > 1:
                    w = w / w.sum(-1, keepdim=True)
                tok = mm[:, None, :].expand(B, cfg.top_k, -1).reshape(B * cfg.top_k, 1, -1)
                e = e.reshape(-1)
                hid = torch.bmm(tok, moe.fc1.weight[e].transpose(1, 2)) + moe.fc1.bias[e][:, None]
                hid = F.gelu(hid, approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
                y = torch.bmm(hid, moe.fc2.weight[e].transpose(1, 2))[:, 0] + moe.fc2.bias[e]
                x = x + (y.view(B, cfg.top_k, -1).float() * w[..., None]).sum(1).to(x.dtype)
            else:
                hid = F.gelu(F.linear(mm, block.mlp.fc1.weight, block.mlp.fc1.bias),
                             approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
                x = x + F.linear(hid, block.mlp.fc2.weight, block.mlp.fc2.bias)
        x = F.layer_norm(x.float(), (cfg.hidden_size,), m.ln_f.weight.float(), m.ln_f.bias.float(),
                         cfg.layernorm_eps).to(x.dtype)
        return F.linear(x, m.head_weight())

    def graph(self, B: int):
        torch = self.torch
        if B not in self.graphs:
            ids = torch.zeros(B, dtype=torch.long, device="cuda")
            pos = torch.zeros(B, dtype=torch.long, device="cuda")
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.no_grad():
                for _ in range(2):
                    self.step(ids, pos)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g), torch.no_grad():
                out = self.step(ids, pos)
            self.graphs[B] = (g, ids, pos, out)
        return self.graphs[B]


class ExpertHits:
    """Distinct experts each MoE layer routes to, counted from the torch model's gate during its forwards."""

    def __init__(self, model):
        import torch
        self.counts: list[int] = []
        self.active = False
        self.handles = []
        k = model.config.top_k
        for block in model.layers:
            if hasattr(block, "moe"):
                def hook(module, args, k=k):
                    if self.active:
                        m = args[0].reshape(-1, args[0].shape[-1])
                        experts = torch.topk(module.gate_probs(m), k, dim=-1).indices
                        self.counts.append(int(torch.unique(experts).numel()))
                self.handles.append(block.moe.register_forward_pre_hook(hook))

    def measure(self, fn) -> float:
        """Mean distinct experts hit per MoE layer during ``fn()``."""
        self.counts, self.active = [], True
        try:
            fn()
        finally:
            self.active = False
        return float(np.mean(self.counts)) if self.counts else 0.0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _events_ms(fn, reps: int) -> float:
    torch = cuda_torch("bench")
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def run(engine_dir: str | Path, batches=(1, 8, 32), input_len: int = 128, output_len: int = 32,
        checkpoint: str | Path | None = None, output: str | Path | None = None, plot: str | Path | None = None,
        eager: bool = True, progress=print, prefill_len: int = 512) -> dict:
    torch = cuda_torch("bench")
    from moetrt.engines.cuda import ITEMSIZE, mem_get_info
    from moetrt.engines.format import EngineManifest
    from moetrt.engines.runtime import Runtime
    from moetrt.models import load

    manifest = EngineManifest.read(engine_dir)
    cfg = manifest.config
    bad = [b for b in batches if not 1 <= b <= manifest.max_batch]
    if bad:
        raise MoetrtError(f"--batch {bad}: the engine's max batch is {manifest.max_batch}")
    if input_len < 1 or output_len < 1 or input_len + output_len > manifest.max_seq:
        raise MoetrtError(f"--input-len {input_len} + --output-len {output_len} must fit the engine's max sequence "
                          f"{manifest.max_seq} (each >= 1)")
    checkpoint = Path(checkpoint or manifest.checkpoint["path"])
    if not checkpoint.exists():
        raise MoetrtError(f"{checkpoint}: the engine's checkpoint is missing (the PyTorch baselines need its "
                          "weights); pass --checkpoint")
    itemsize = ITEMSIZE[manifest.dtype]
    device = torch.cuda.get_device_name()
    progress(f"device: {device}; measuring copy bandwidth")
    bw = copy_bandwidth()
    progress(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    rng = np.random.default_rng(0)
    results = {"device": device, "date": time.strftime("%Y-%m-%d"), "engine": str(engine_dir),
               "dtype": manifest.dtype, "input_len": input_len, "output_len": output_len,
               "copy_bytes_per_s": bw, "batches": []}

    # -- moetrt ------------------------------------------------------------------------------------------
    free0 = mem_get_info()[0]
    t0 = time.perf_counter()
    tp = manifest.tensor_parallel
    rt = Runtime(engine_dir, device="cuda", progress=True) if tp == 1 else Runtime(engine_dir, device="cuda")
    if tp == 1:
        progress(f"moetrt runtime loaded in {time.perf_counter() - t0:.1f} s "
                 f"({rt.engine.weight_bytes / 2**30:.2f} GiB weights, {rt.engine.folded_bytes / 2**20:.0f} MiB "
                 f"LayerNorm-folded weight copies, {rt.engine.activation_bytes / 2**20:.0f} MiB activations, "
                 f"{sum(c.nbytes for c in rt.engine.caches.values()) / 2**20:.0f} MiB KV cache)")
        held = free0 - mem_get_info()[0]
    else:  # the ranks are other processes on other GPUs: this process cannot see their memory
        progress(f"moetrt runtime: {tp} ranks loaded in {time.perf_counter() - t0:.1f} s")
        held = None
    prompts = {B: rng.integers(0, cfg.vocab_size, (B, input_len)).tolist() for B in batches}
    ours = {}
    for B in batches:
        ours[B] = rt.measure(prompts[B], output_len)
        if held is not None:
            held = max(held, free0 - mem_get_info()[0])
        progress(f"moetrt B={B}: prefill {ours[B]['prefill_ms']:.2f} ms, decode {ours[B]['decode_ms_per_token']:.3f} "
                 f"ms/token (graph replay {ours[B]['decode_graph_ms']:.3f} ms"
                 + (f", all-reduces {ours[B]['allreduce_ms_per_step']:.3f} ms" if manifest.tensor_parallel > 1 else "")
                 + ")")
    if tp == 1:  # the same steps with programmatic dependent launch off: what it is worth
        from moetrt.plugins.kernels import programmatic_launch
        rt.drop_graphs()
        with programmatic_launch(False):
            for B in batches:
                m = rt.measure(prompts[B], output_len)
                ours[B]["decode_graph_ms_no_pdl"] = m["decode_graph_ms"]
                ours[B]["decode_ms_per_token_no_pdl"] = m["decode_ms_per_token"]
                progress(f"moetrt B={B} without programmatic launch: decode {m['decode_ms_per_token']:.3f} ms/token "
                         f"(graph replay {m['decode_graph_ms']:.3f} ms)")
        rt.drop_graphs()
    # one long prompt: the prefill the floor is about (every expert is read)
    P = min(prefill_len, manifest.max_seq - 2, 4096)
    long_prompt = rng.integers(0, cfg.vocab_size, (1, P)).astype(np.int32)
    ms = rt.measure(long_prompt.tolist(), 2)["prefill_ms"]
    floor = (all_weight_bytes(cfg, itemsize) + cfg.num_layers * 2 * P * cfg.hidden_size * itemsize) / bw * 1e3
    results["prefill"] = {"tokens": P, "ms": ms, "floor_ms": floor, "ratio_to_floor": ms / floor}
    progress(f"moetrt prefill of 1 x {P}: {ms:.2f} ms, floor {floor:.2f} ms ({ms / floor:.2f}x)")
    check_ids = np.asarray(prompts[batches[0]][:1])
    ours_logits = rt.logits(check_ids)
    rt.close()

    # -- PyTorch baselines ---------------------------------------------------------------------------------
    progress(f"loading the PyTorch model from {checkpoint}")
    model = load(checkpoint, torch.float16 if manifest.dtype == "fp16" else torch.float32).cuda().eval()
    from moetrt.models.gpt_moe import KVCache
    with torch.no_grad():
        ref = model(torch.tensor(check_ids, device="cuda")).float().cpu().numpy()
    results["logits_max_abs_diff"] = float(np.abs(ours_logits - ref).max())
    results["logits_scale"] = float(np.abs(ref).max())
    results["logits_argmax_agreement"] = float((ours_logits.argmax(-1) == ref.argmax(-1)).mean())
    progress(f"logits of a {input_len}-token prompt vs the torch model: max |diff| "
             f"{results['logits_max_abs_diff']:.3g} (max |logit| {results['logits_scale']:.3g}), argmax agreement "
             f"{results['logits_argmax_agreement']:.4f}")
    hits = ExpertHits(model)
    with torch.no_grad():
        results["prefill"]["experts_hit"] = hits.measure(lambda: model(torch.tensor(long_prompt, device="cuda")))
    E = cfg.num_experts
    expert_bytes = (2 * cfg.hidden_size * cfg.ffn_hidden_size + cfg.ffn_hidden_size + cfg.hidden_size) * itemsize
    moe_layers = sum(cfg.is_moe_layer(l) for l in range(cfg.num_layers))
    unread = moe_layers * (E - results["prefill"]["experts_hit"]) * expert_bytes
    results["prefill"]["floor_ms_hit_experts"] = results["prefill"]["floor_ms"] - unread / bw * 1e3
    progress(f"the {P}-token prompt routes to {results['prefill']['experts_hit']:.1f} of {E} experts per MoE layer "
             f"(floor counting only those: {results['prefill']['floor_ms_hit_experts']:.2f} ms)")
    fast = FastTorchDecoder(model, max(batches), input_len + output_len)
    for B in batches:
        row = {"batch": B}
        row.update({k: v for k, v in ours[B].items() if k != "tokens"})
        ids = torch.tensor(prompts[B], device="cuda")
        cache = KVCache(cfg, B, input_len + output_len, model.dtype, "cuda")
        with torch.no_grad():
            torch.cuda.synchronize()
            t = time.perf_counter()
            logits = model(ids, kv_cache=cache)
            torch.cuda.synchronize()
            row["torch_eager_prefill_ms"] = (time.perf_counter() - t) * 1e3
            first = logits[:, -1].argmax(-1)
            agree = first.cpu().tolist() == [t[0] for t in ours[B]["tokens"]]
            row["first_token_agrees"] = bool(agree)
            past = torch.full((B,), input_len, device="cuda")
            # distinct experts one decode step of these B sequences hits (sets the floor), from the eager model
            probe = KVCache(cfg, B, input_len + output_len, model.dtype, "cuda")
            for l in range(cfg.num_layers):
                probe.k[l].copy_(cache.k[l])
                probe.v[l].copy_(cache.v[l])
            row["experts_hit"] = hits.measure(lambda: model(first[:, None], kv_cache=probe, past_lengths=past))
            del probe
            if eager:
                steps = 4
                torch.cuda.synchronize()
                t = time.perf_counter()
                tok = first
                for s in range(steps):
                    tok = model(tok[:, None], kv_cache=cache, past_lengths=past + s)[:, -1].argmax(-1)
                    if s == 0:
                        eager_second = tok
                torch.cuda.synchronize()
                eager_second = eager_second.cpu().tolist()
                row["torch_eager_second_token_agreement"] = float(np.mean(
                    [a == t[1] for a, t in zip(eager_second, ours[B]["tokens"]) if len(t) > 1]))
                row["torch_eager_ms_per_token"] = (time.perf_counter() - t) * 1e3 / steps
            g, gids, gpos, gout = fast.graph(B)  # capture first: its warm-up steps write the cache
            fast.prefill_from(cache)
            gids.copy_(first)
            gpos.fill_(input_len)
            g.replay()
            second = gout.argmax(-1).cpu().tolist()
            row["torch_graph_second_token_agreement"] = float(np.mean(
                [a == t[1] for a, t in zip(second, ours[B]["tokens"]) if len(t) > 1]))
            if eager:
                row["torch_graph_vs_eager_second_token"] = float(np.mean([a == b for a, b in zip(second, eager_second)]))
            row["torch_graph_ms_per_token"] = _events_ms(g.replay, 50)
        fl = step_bytes(cfg, itemsize, B, input_len, row["experts_hit"], tp)
        row["floor_ms_per_token"] = fl["total"] / bw * 1e3
        row["floor_bytes"] = fl["total"]
        row["experts_hit_uniform"] = step_bytes(cfg, itemsize, B, input_len)["experts_hit"]
        row["prefill_floor_ms"] = (all_weight_bytes(cfg, itemsize)
                                   + cfg.num_layers * 2 * B * input_len * cfg.hidden_size * itemsize) / bw * 1e3
        row["ratio_to_floor"] = row["decode_ms_per_token"] / row["floor_ms_per_token"]
        row["graph_ratio_to_floor"] = row["decode_graph_ms"] / row["floor_ms_per_token"]
        row["prefill_ratio_to_floor"] = row["prefill_ms"] / row["prefill_floor_ms"]
        row["speedup_vs_torch_graph"] = row["torch_graph_ms_per_token"] / row["decode_ms_per_token"]
        if "torch_eager_ms_per_token" in row:
            row["speedup_vs_torch_eager"] = row["torch_eager_ms_per_token"] / row["decode_ms_per_token"]
        row["tokens_per_s"] = B / row["decode_ms_per_token"] * 1e3
        row["tensor_parallel"] = tp
        row["allreduce_ms_per_step"] = ours[B]["allreduce_ms_per_step"]
        row["device_bytes"] = held
        row["weights_plus_kv_bytes"] = all_weight_bytes(cfg, itemsize) + manifest.config.num_layers * 2 * \
            manifest.max_batch * manifest.max_seq * cfg.hidden_size * itemsize
        results["batches"].append(row)
    del fast
    hits.remove()
    torch.cuda.empty_cache()
    if manifest.dtype == "fp16":  # accuracy: ours and PyTorch's fp16 against the same model in fp32
        model = model.float()
        model.dtype = torch.float32  # the dtype its KV cache is made in
        with torch.no_grad():
            exact = model(torch.tensor(check_ids, device="cuda")).cpu().numpy()
        e_ours, e_torch = np.abs(ours_logits - exact).max(-1), np.abs(ref - exact).max(-1)
        results["accuracy_vs_fp32"] = {
            "ours_median": float(np.median(e_ours)), "ours_mean": float(e_ours.mean()), "ours_max": float(e_ours.max()),
            "torch_fp16_median": float(np.median(e_torch)), "torch_fp16_mean": float(e_torch.mean()),
            "torch_fp16_max": float(e_torch.max()),
            "ours_argmax_agreement": float((ours_logits.argmax(-1) == exact.argmax(-1)).mean()),
            "torch_fp16_argmax_agreement": float((ref.argmax(-1) == exact.argmax(-1)).mean())}
        progress("per-position max |logit error| vs the fp32 model (median / mean / max): ours "
                 f"{np.median(e_ours):.3g} / {e_ours.mean():.3g} / {e_ours.max():.3g}, PyTorch fp16 "
                 f"{np.median(e_torch):.3g} / {e_torch.mean():.3g} / {e_torch.max():.3g}")
    del model
    torch.cuda.empty_cache()

    _print_table(results)
    if output:
        Path(output).write_text(json.dumps(results, indent=1) + "\n")
    if plot:
        _plot(results, plot)
    return results


# generate() delivering tokens this much slower than its decode graph replays gets a note under the table (the
# 350M runs deliver within 5% of the graph; a plan remade every step once added ~10 ms a token)
HOST_SLACK_MS, HOST_SLACK_FRACTION = 0.1, 0.25


def _print_table(r: dict) -> None:
    print(f"\n{r['device']}, {r['dtype']}, context {r['input_len']}, {r['output_len']} new tokens, copy "
          f"{r['copy_bytes_per_s'] / 1e12:.2f} TB/s")
    head = ("batch", "experts hit", "prefill ms", "×floor", "decode ms/tok", "×floor", "graph ms", "×floor", "tok/s",
            "torch graph", "torch eager", "vs graph", "vs eager")
    print(" | ".join(head))
    for row in r["batches"]:
        print(" | ".join([
            str(row["batch"]), f"{row['experts_hit']:.1f}", f"{row['prefill_ms']:.2f}", f"{row['prefill_ratio_to_floor']:.2f}",
            f"{row['decode_ms_per_token']:.3f}", f"{row['ratio_to_floor']:.2f}", f"{row['decode_graph_ms']:.3f}",
            f"{row['graph_ratio_to_floor']:.2f}", f"{row['tokens_per_s']:.0f}", f"{row['torch_graph_ms_per_token']:.3f}",
            f"{row.get('torch_eager_ms_per_token', float('nan')):.2f}", f"{row['speedup_vs_torch_graph']:.2f}×",
            f"{row.get('speedup_vs_torch_eager', float('nan')):.1f}×"]))
    for row in r["batches"]:  # the host should keep up with the GPU: a step enqueued ahead hides its share
        extra = row["decode_ms_per_token"] - row["decode_graph_ms"]
        if extra > HOST_SLACK_MS + HOST_SLACK_FRACTION * row["decode_graph_ms"]:
            print(f"note: at batch {row['batch']} generate() delivered a token every {row['decode_ms_per_token']:.3f} "
                  f"ms, {extra:.3f} ms more than a decode graph's {row['decode_graph_ms']:.3f} ms on the GPU: host "
                  "time (Python, planning, waiting) the GPU idled through")
    if "decode_graph_ms_no_pdl" in r["batches"][0]:
        print("decode graph replay with programmatic dependent launch off: " + ", ".join(
            f"B={x['batch']} {x['decode_graph_ms_no_pdl']:.3f} ms ({x['decode_graph_ms_no_pdl'] / x['decode_graph_ms']:.2f}x "
            "the default)" for x in r["batches"]))
    if "prefill" in r:
        p = r["prefill"]
        print(f"prefill of one {p['tokens']}-token prompt: {p['ms']:.2f} ms, {p['ratio_to_floor']:.2f}x its floor "
              f"({p['floor_ms']:.2f} ms: every weight read once); {p['ms'] / p['floor_ms_hit_experts']:.2f}x the floor "
              f"of the {p['experts_hit']:.1f} experts per layer it routes to")
    row = r["batches"][0]
    if row["device_bytes"] is not None:
        print(f"device memory held by the runtime {row['device_bytes'] / 2**30:.2f} GiB; weights + KV cache "
              f"{row['weights_plus_kv_bytes'] / 2**30:.2f} GiB ({row['device_bytes'] / row['weights_plus_kv_bytes']:.3f}×)")
    if row.get("tensor_parallel", 1) > 1:
        print("all-reduce time per decode step (alone): " + ", ".join(
            f"B={x['batch']} {x['allreduce_ms_per_step']:.3f} ms" for x in r["batches"]))


def _plot(r: dict, path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    rows = r["batches"]
    labels = [str(x["batch"]) for x in rows]
    series = {"floor": [x["floor_ms_per_token"] for x in rows],
              "moetrt": [x["decode_ms_per_token"] for x in rows],
              "PyTorch CUDA graph": [x["torch_graph_ms_per_token"] for x in rows]}
    if all("torch_eager_ms_per_token" in x for x in rows):
        series["PyTorch eager"] = [x["torch_eager_ms_per_token"] for x in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(rows)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(rows)) + width * (len(series) - 1) / 2, labels)
    ax.set_xlabel("batch")
    ax.set_ylabel("ms per decode step (log)")
    ax.set_yscale("log")
    ax.set_title(f"{r['device']}, {r['dtype']}, context {r['input_len']} ({r['date']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
