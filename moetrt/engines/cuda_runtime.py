"""The GPU runtime of one engine directory (``Runtime(engine_dir, device="cuda")``).

Steps: the host writes a step's token ids, positions, past lengths and wanted logit rows into pinned memory,
copies them to the device staging buffers, enqueues the step's launch plan (decode steps as the replay of a
CUDA graph captured once per batch-size bucket), samples on the GPU, and reads back one int32 per sequence.
`generate` keeps the GPU one decode step ahead of the host: the sampling kernel writes the tokens into the next
step's inputs and moves its positions and past lengths on (and writes the tokens to pinned host memory), and that
step is enqueued before the host reads them (a step enqueued after the last needed one is discarded); between two
decode graphs runs the sampling kernel alone.
Prompts are prefilled together, right-padded (as the CPU runtime); only the last real position of each prompt
goes through the LM head. A prefill longer than the runtime's token budget is run in chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from moetrt.engines import cuda
from moetrt.engines.cuda_backend import CudaEngine
from moetrt.engines.format import EngineManifest
from moetrt.engines.gemm import time_us, tune_gemms
from moetrt.engines.program import analyze
from moetrt.engines.runtime import Closing, check_input_ids, pad_prompts
from moetrt.engines.sampling import check_params
from moetrt.errors import MoetrtError
from moetrt.generation import Streams
from moetrt.plugins import launch
from moetrt.plugins.abi import PLUGIN_ABI_VERSION

_NP = {"fp16": np.float16, "fp32": np.float32}


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a captured decode graph: powers of two up to max_batch, and max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class CudaRuntime(Closing):
    def __init__(self, engine_dir: str | Path, manifest: EngineManifest, max_tokens: int | None = None,
                 progress: bool = False, use_graphs: bool = True, rank: int = 0, comm=None):
        """``rank``/``comm``: this process's tensor-parallel rank and its NCCL communicator (``distributed``)."""
        self.use_graphs = use_graphs
        self.rank = rank
        self.engine_dir, self.manifest, self.config = Path(engine_dir), manifest, manifest.config
        if manifest.plugin_abi_version != PLUGIN_ABI_VERSION:
            raise MoetrtError(f"{engine_dir}: built for plugin ABI {manifest.plugin_abi_version}; this moetrt "
                              f"runs ABI {PLUGIN_ABI_VERSION}; recompile the engine")
        if manifest.tensor_parallel != 1 and comm is None:
            raise MoetrtError(f"{engine_dir}: a tensor-parallel engine ({manifest.tensor_parallel} ranks) runs one "
                              "process per GPU: use Runtime(engine_dir, device='cuda'), which starts them")
        if manifest.dtype not in _NP:
            raise MoetrtError(f"{engine_dir}: dtype {manifest.dtype} is not supported by the GPU runtime")
        self.max_tokens = int(max_tokens or min(manifest.max_batch * manifest.max_seq, 4096))
        if self.max_tokens < manifest.max_batch:
            raise MoetrtError(f"max_tokens {self.max_tokens} is below the engine's max batch {manifest.max_batch}")
        self.closed = True
        self.engine = None
        self.pinned = self.step_pinned = self.token_event = None
        self.graphs: dict[int, cuda.Graph] = {}
        program = analyze(self.engine_dir / f"rank{rank}" / "model.onnx")
        self.engine = CudaEngine(program, manifest.max_batch, manifest.max_seq, self.max_tokens,
                                 max_logit_rows=min(self.max_tokens, 1024), progress=progress, comm=comm)
        try:
            e = self.engine
            self.cache_dtype = manifest.cache_numpy_dtype
            self.vocab = e.vocab
            self.pinned = cuda.PinnedBuffer(e.staging.nbytes + e.max_rows * e.vocab * 4)
            self.host = {name: self.pinned.array[off:].view(np.int32) for name, off in e.staging_offsets.items()}
            self.host_logits_off = e.staging.nbytes
            # the first decode step's positions, past lengths and logit rows (generate() ends synchronised, so
            # no copy from here is pending when the next call rewrites them)
            self.step_pinned = cuda.PinnedBuffer(3 * 4 * e.max_batch)
            self.step_host = self.step_pinned.array.view(np.int32).reshape(3, e.max_batch)
            self.token_event = cuda.Event()
            self.closed = False
        except BaseException:
            self.close()
            raise

    # -- internals ----------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise MoetrtError("this runtime is closed")

    def _stage(self, ids: np.ndarray, past: np.ndarray, rows: np.ndarray | None) -> None:
        """Write a step's inputs to pinned memory and enqueue their copies to the device."""
        e, s = self.engine, self.engine.stream
        T = ids.shape[1]
        parts = {"input_ids": ids.reshape(-1), "position_ids": (past[:, None] + np.arange(T)).reshape(-1),
                 "past_lengths": past}
        if rows is not None:
            parts["rows"] = rows
        for name, values in parts.items():
            count = len(values)
            self.host[name][:count] = values
            off = e.staging_offsets[name]
            s.copy_to_device(e.staging.ptr + off, self.pinned.ptr + off, 4 * count)

    def _enqueue(self, ids: np.ndarray, past: np.ndarray, rows: np.ndarray | None):
        """Stage and enqueue one step; returns its plan (logits not yet read). A decode step (T = 1, default
        rows) replays its batch size's CUDA graph, captured after the first such step ran eagerly."""
        B, T = ids.shape
        decode = T == 1 and rows is None
        plan = self.engine.plan(B, T, None if rows is None else len(rows))
        if rows is None and plan.default_rows is not None:
            rows = plan.default_rows
        self._stage(ids, past, rows)
        return self._run(plan, B, decode)

    def _run(self, plan, B: int, decode: bool):
        if decode and B in self.graphs:
            self.graphs[B].launch()
            return plan
        plan.run()
        if decode and self.use_graphs:
            self.engine.stream.synchronize()  # cuBLASLt and the kernels have initialised: capture (no execution)
            self.graphs[B] = cuda.Graph(self.engine.stream, plan.run)
        return plan

    def _enqueue_decode(self, B: int, bucket: int, past: np.ndarray | None = None):
        """Enqueue a decode step after the last sampling. With ``past`` (the first step after a prefill) its token
        ids are the sampled tokens, copied on the device (padding rows read token 0), and its positions, past
        lengths and logit rows come from pinned memory; without, the sampling kernel has set up ids, positions
        and past lengths on the device (``_sample_enqueue(advance=True)``) and the rows are still in place."""
        e, s = self.engine, self.engine.stream
        plan = e.plan(bucket, 1, None)
        if past is None:
            return self._run(plan, bucket, decode=True)
        host = self.step_host
        host[:2, :bucket] = 0
        host[:2, :B] = past  # one new token a sequence: its position is the past length
        base, off = e.staging.ptr, e.staging_offsets
        s.memset(base + off["input_ids"], 0, 4 * bucket)
        s.copy_on_device(base + off["input_ids"], base + off["tokens"], 4 * B)
        names = ["position_ids", "past_lengths"]
        if plan.default_rows is not None:
            host[2, :len(plan.default_rows)] = plan.default_rows
            names.append("rows")
        for k, name in enumerate(names):
            n = bucket if name != "rows" else len(plan.default_rows)
            s.copy_to_device(base + off[name], self.step_pinned.ptr + 4 * k * e.max_batch, 4 * n)
        return self._run(plan, bucket, decode=True)

    def _read_logits(self, view: cuda.View) -> np.ndarray:
        e = self.engine
        nbytes = view.nbytes
        e.stream.copy_to_host(self.pinned.ptr + self.host_logits_off, view.ptr, nbytes)
        e.stream.synchronize()
        raw = self.pinned.array[self.host_logits_off:self.host_logits_off + nbytes]
        return raw.view(_NP[view.dtype]).reshape(view.shape).astype(np.float32)

    def _sample_enqueue(self, logits: cuda.View, temperature: float, top_k: int, top_p: float, seed: int,
                        step: int, advance: bool = False) -> None:
        """Sample one token a row of ``logits`` into the device staging ``tokens`` and the pinned host mirror
        (written by the kernel); ``_sampled`` waits for them. ``advance``: also make them the next decode step's
        token ids and move its positions and past lengths on by one, on the device (no copies between the
        sampling and the next graph)."""
        e = self.engine
        B = logits.shape[0]
        tokens = e.staging_view("tokens", (B,))
        host_tokens = self.pinned.ptr + e.staging_offsets["tokens"]
        nxt = tuple(e.staging_view(n, (B,)) for n in ("input_ids", "position_ids", "past_lengths")) if advance else None
        launch.sample(logits, tokens, temperature, top_k, top_p, seed, step, stream=e.stream.ptr, next_inputs=nxt,
                      host_tokens=host_tokens)
        self.token_event.record(e.stream)

    def _sampled(self, B: int) -> np.ndarray:
        self.token_event.synchronize()
        return self.host["tokens"][:B].copy()

    def _prefill(self, padded: np.ndarray, lengths: np.ndarray):
        """Prefill right-padded prompts, in chunks of the token budget. Returns the device logits of each
        sequence's last real position, or (prompts longer than one chunk) those logits on the host."""
        B, T = padded.shape
        chunk = max(1, self.max_tokens // B)
        past = np.zeros(B, np.int32)
        if T <= chunk:
            return self._enqueue(padded, past, (np.arange(B) * T + lengths - 1).astype(np.int32)).logits
        keep = np.zeros((B, self.vocab), np.float32)
        for start in range(0, T, chunk):
            part = padded[:, start:start + chunk]
            t = part.shape[1]
            last = np.clip(lengths - 1 - start, 0, t - 1)
            plan = self._enqueue(part, past, (np.arange(B) * t + last).astype(np.int32))
            done = (lengths - 1 >= start) & (lengths - 1 < start + t)  # each last position lies in one chunk
            keep[done] = self._read_logits(plan.logits)[done]
            past = past + t
        return keep

    # -- public API (as the CPU runtime) --------------------------------------------------------------------
    def new_cache(self) -> list[np.ndarray]:
        return self.manifest.new_cache()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One step on host feeds, caches included (for validation): copies the caches in and out."""
        self._check_open()
        e = self.engine
        ids = np.asarray(feeds["input_ids"], np.int32)
        past = np.asarray(feeds["past_lengths"], np.int32)
        check_input_ids(self.manifest, ids, past)
        if not np.array_equal(np.asarray(feeds["position_ids"]), past[:, None] + np.arange(ids.shape[1])):
            raise MoetrtError("position_ids must be past_lengths[b] + t (the runtime derives them)")
        for l in range(self.config.num_layers):
            host = np.ascontiguousarray(feeds[f"kv_cache_{l}"], self.cache_dtype)
            dev = e.caches[f"kv_cache_{l}"]
            if host.shape != dev.shape:
                raise MoetrtError(f"kv_cache_{l}: expected shape {dev.shape}, got {host.shape}")
            e.stream.copy_to_device(dev.ptr, host.ctypes.data, host.nbytes)
            e.stream.synchronize()
        plan = self._enqueue(ids, past, None)
        logits = self._read_logits(plan.logits)
        out = {"logits": logits.reshape(ids.shape[0], -1, self.vocab).astype(self.cache_dtype)}
        for l in range(self.config.num_layers):
            dev = e.caches[f"kv_cache_{l}"]
            host = np.empty(dev.shape, self.cache_dtype)
            e.stream.copy_to_host(host.ctypes.data, dev.ptr, host.nbytes)
            e.stream.synchronize()
            out[f"kv_cache_{l}_out"] = host
        return out

    def logits(self, input_ids) -> np.ndarray:
        """Logits ``[B, T, V]`` of every position of a prefill (from an empty cache), as float32."""
        self._check_open()
        ids = np.asarray(input_ids)
        check_input_ids(self.manifest, ids)
        ids = ids.astype(np.int32)
        B, T = ids.shape
        e = self.engine
        chunk = max(1, min(self.max_tokens, e.max_rows) // B)
        past = np.zeros(B, np.int32)
        out = np.empty((B, T, self.vocab), np.float32)
        for start in range(0, T, chunk):
            part = ids[:, start:start + chunk]
            t = part.shape[1]
            plan = self._enqueue(part, past, np.arange(B * t, dtype=np.int32))
            out[:, start:start + t] = self._read_logits(plan.logits).reshape(B, t, self.vocab)
            past = past + t
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] = (),
                 callback: Callable[[int, list], None] | None = None) -> list[list[int]]:
        """New tokens for each prompt (a stop token ends its sequence and is kept); sampling on the GPU."""
        self._check_open()
        check_params(temperature, top_k, top_p)
        if max_new_tokens < 1:
            raise MoetrtError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        padded, lengths = pad_prompts(self.manifest, prompts, max_new_tokens)
        B = len(lengths)
        bucket = next(b for b in decode_buckets(self.manifest.max_batch) if b >= B)
        logits = self._prefill(padded.astype(np.int32), lengths)
        if isinstance(logits, np.ndarray):  # chunked prefill: sample from host logits copied back
            dev = self.engine.logits_buf.view((B, self.vocab), self.engine.dtype)
            host = logits.astype(_NP[self.engine.dtype])
            self.engine.stream.copy_to_device(dev.ptr, host.ctypes.data, host.nbytes)
            logits = dev
        streams = Streams(B, stop_tokens, callback)
        try:
            self._sample_enqueue(logits, temperature, top_k, top_p, seed, 0)
            for step in range(max_new_tokens):
                last = step == max_new_tokens - 1
                if not last:  # the next step goes to the GPU before the host looks at this one's tokens
                    plan = self._enqueue_decode(B, bucket, lengths if step == 0 else None)
                if streams.emit(step, self._sampled(B).tolist()) or last:
                    break
                logits = cuda.View(plan.logits.ptr, (B, self.vocab), plan.logits.dtype)  # the bucket's first B rows
                self._sample_enqueue(logits, temperature, top_k, top_p, seed, step + 1, advance=True)
        except BaseException:  # a callback's exception, say: the one to report, after the step enqueued ahead
            with contextlib.suppress(MoetrtError):
                self.engine.stream.synchronize()
            raise
        self.engine.stream.synchronize()  # a step enqueued ahead of a stop may still be running
        return streams.outputs

    def tune(self, prefill_tokens=(128, 512), progress=None) -> dict:
        """Time cuBLASLt's candidate algorithms for every GEMM of the decode buckets and of single-prompt
        prefills of ``prefill_tokens``, keep the fastest, and save them beside the graph (``gemm_algos.json``)."""
        self._check_open()
        e = self.engine
        shapes = [(B, 1, None) for B in decode_buckets(self.manifest.max_batch)]
        shapes += [(1, T, 1) for T in prefill_tokens if T <= min(self.max_tokens, self.manifest.max_seq)]
        entries: dict[str, dict] = {}
        for B, T, rows in shapes:
            plan = e.plan(B, T, rows, gemv=False)  # every GEMM on cuBLASLt, to time both ways
            # each shape is timed over all its instances in turn (every layer's weights: from DRAM, as in a step)
            by_shape: dict[str, list] = {}
            for g in plan.gemms:
                by_shape.setdefault(g.key, []).append(g)
            for key, gs in by_shape.items():
                if key not in entries:
                    algo, us = tune_gemms(gs)
                    entries[key] = {"algo": algo, "us": round(us, 2)}
                else:  # tuned in an earlier shape's plan
                    for g in gs:
                        g.set_algo(entries[key]["algo"])
            candidates: dict[str, list] = {}
            for key, calls, gemv_call in plan.gemv_candidates:
                candidates.setdefault(key, []).append((calls, gemv_call))
            for key, group in candidates.items():
                if key not in entries:
                    lib = time_us(e.stream, lambda: [c() for calls, _ in group for c in calls]) / len(group)
                    ours = time_us(e.stream, lambda: [g() for _, g in group]) / len(group)
                    entries[key] = {"gemv": ours < lib, "us_gemv": round(ours, 2), "us_cublaslt": round(lib, 2)}
            if progress:
                progress(f"      tuned the GEMMs of a {B}x{T} step")
        e.stream.synchronize()
        e.gemm_ctx.save_tuning(entries)
        for key in list(e.plans):  # plans made before tuning keep their algorithms: remake them
            e.drop_plan(key)
        self.drop_graphs()
        return entries

    def drop_graphs(self) -> None:
        """Destroy the captured decode graphs; the next decode step of each batch size captures anew (after
        tuning, or to take a new launch setting such as ``plugins.kernels.programmatic_launch``)."""
        for g in self.graphs.values():
            g.destroy()
        self.graphs = {}

    @property
    def device_bytes(self) -> int:
        return self.engine.device_bytes

    def measure(self, prompts, output_len: int, reps: int = 5) -> dict:
        """Timings for ``bench``: prefill of the prompts, per-token decode as ``generate`` delivers it (timed
        between the first and last streamed token), GPU time of one decode-graph replay, and the time of one
        step's all-reduces alone (tensor-parallel engines)."""
        import time
        self._check_open()
        padded = np.asarray(prompts, np.int32)
        lengths = np.full(len(prompts), padded.shape[1], np.int32)
        for _ in range(2):
            self._prefill(padded, lengths)
        self.engine.stream.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            self._prefill(padded, lengths)
        self.engine.stream.synchronize()
        prefill_ms = (time.perf_counter() - t) * 1e3 / reps
        self.generate(prompts, output_len)
        stamps = []
        out = self.generate(prompts, output_len, callback=lambda step, tokens: stamps.append(time.perf_counter()))
        token_ms = (stamps[-1] - stamps[0]) * 1e3 / max(1, len(stamps) - 1)
        graph = self.graphs[next(b for b in sorted(self.graphs) if b >= len(prompts))]
        graph_ms = cuda.elapsed_ms(self.engine.stream, graph.launch, 50) / 50
        allreduce_ms = self.engine.time_all_reduces(len(prompts))
        return {"prefill_ms": prefill_ms, "decode_ms_per_token": token_ms, "decode_graph_ms": graph_ms,
                "allreduce_ms_per_step": allreduce_ms, "tokens": out}

    def close(self) -> None:
        """Free every device and pinned allocation (idempotent)."""
        self.drop_graphs()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        for name in ("pinned", "step_pinned"):
            if getattr(self, name) is not None:
                getattr(self, name).free()
                setattr(self, name, None)
        if self.token_event is not None:
            self.token_event.destroy()
            self.token_event = None
        self.closed = True
