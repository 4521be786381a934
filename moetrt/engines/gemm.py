"""GEMMs for the GPU backend through cuBLASLt, via nvmath-python's low-level bindings (``nvmath.bindings.cublasLt``).

One ``Gemm`` is ``Y[M, N] = X[M, K] @ W[K, N] (+ bias[N])`` on row-major fp16/bf16/fp32 arrays, fp32 accumulation,
the bias fused as cuBLASLt's BIAS epilogue, or bias + tanh-approximated GeLU as its GELU_BIAS epilogue. Row-major
Y = X W is column-major Yᵀ = Wᵀ Xᵀ, so cuBLASLt sees A = W as an N×K column-major matrix (ld N), B = X as K×M
(ld K) and D = Y as N×M (ld N). A weight stored as ``[N, K]`` (the graph's MatMul reads ``Transpose(W)``) is
A = K×N column-major, read with TRANSA.

Algorithms: cuBLASLt's heuristic proposes candidates; ``GemmTuner`` times them on the real operands and keeps
the fastest, per (M, N, K, dtype, epilogue), in ``gemm_algos.json`` beside the rank's graph, keyed by the
device name and the cuBLASLt version, so an engine is tuned once per kind of GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moetrt.engines.cuda import CudaError, Stream, elapsed_ms

COMPUTE_32F = 68                     # cublasComputeType_t CUBLAS_COMPUTE_32F
CUDA_TYPES = {"fp32": 0, "fp16": 2, "bf16": 14}  # cudaDataType_t
WORKSPACE_BYTES = 32 << 20
CANDIDATES = 8
TUNING_FILE = "gemm_algos.json"


def cublaslt():
    try:
        from nvmath.bindings import cublasLt
    except Exception as exc:  # ImportError, or a missing libcublasLt found at import
        raise CudaError(f"the GPU backend runs its GEMMs through cuBLASLt via nvmath-python "
                        f"(`pip install nvmath-python`): {exc}") from None
    return cublasLt


def _set(setter, handle, attr, dtype_fn, value) -> None:
    arr = np.array([value], dtype=dtype_fn(attr))
    setter(handle, attr, arr.ctypes.data, arr.itemsize)


def time_us(stream: Stream, fn, iterations: int = 20) -> float:
    """Microseconds per call of ``fn()``, as replayed from a CUDA graph of ``iterations`` calls (as in a decode
    step: no host launch overhead in the figure)."""
    from moetrt.engines.cuda import Graph
    fn()
    stream.synchronize()
    graph = Graph(stream, lambda: [fn() for _ in range(iterations)])
    try:
        return elapsed_ms(stream, graph.launch, 3) * 1000 / (3 * iterations)
    finally:
        graph.destroy()


class GemmContext:
    """The cuBLASLt handle, the shared workspace and the tuning cache of one runtime."""

    def __init__(self, workspace_ptr: int, device_name: str, tuning_path: Path | None):
        self.lt = cublaslt()
        self.handle = self.lt.create()
        self.workspace_ptr = workspace_ptr
        self.version = int(self.lt.get_version())
        self.device_name = device_name
        self.tuning_path = tuning_path
        self.tuned: dict[str, str] = {}
        self.gemv: dict[str, bool] = {}  # decode shapes: our GEMV kernel (True) or cuBLASLt, as timed
        self.heuristic_cache: dict[str, np.ndarray] = {}
        self.alpha = np.ones(1, np.float32)
        self.beta = np.zeros(1, np.float32)
        if tuning_path is not None and tuning_path.is_file():
            try:
                data = json.loads(tuning_path.read_text())
            except ValueError:
                data = {}
            if data.get("device") == device_name and data.get("cublaslt_version") == self.version:
                self.load_entries(data.get("entries", {}))

    def load_entries(self, entries: dict) -> None:
        self.tuned = {k: v["algo"] for k, v in entries.items() if "algo" in v}
        self.gemv = {k: v["gemv"] for k, v in entries.items() if "gemv" in v}

    def save_tuning(self, entries: dict[str, dict]) -> None:
        if self.tuning_path is None:
            return
        data = {"device": self.device_name, "cublaslt_version": self.version, "entries": entries}
        self.tuning_path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        self.load_entries(entries)

    def destroy(self) -> None:
        if self.handle is not None:
            self.lt.destroy(self.handle)
            self.handle = None


class Gemm:
    """One bound GEMM: fixed shapes, pointers and stream; ``launch()`` enqueues it."""

    def __init__(self, ctx: GemmContext, M: int, N: int, K: int, dtype: str, x_ptr: int, w_ptr: int, y_ptr: int,
                 bias_ptr: int | None, stream: Stream, what: str, trans_w: bool = False, gelu: bool = False):
        lt = ctx.lt
        if gelu and not bias_ptr:
            raise ValueError(f"{what}: the GeLU epilogue is fused with a bias only")
        self.ctx, self.what = ctx, what
        self.M, self.N, self.K, self.dtype = M, N, K, dtype
        epilogue = "gelu_bias" if gelu else "bias" if bias_ptr else "none"
        self.key = f"{M}x{N}x{K}:{dtype}:{epilogue}:{'wt' if trans_w else 'w'}"
        ct = CUDA_TYPES[dtype]
        self.desc = lt.matmul_desc_create(COMPUTE_32F, CUDA_TYPES["fp32"])
        A = lt.MatmulDescAttribute
        if trans_w:  # W stored [N, K] (a torch Linear weight): column-major K×N, read transposed
            _set(lt.matmul_desc_set_attribute, self.desc, A.TRANSA, lt.get_matmul_desc_attribute_dtype, 1)
        if bias_ptr:
            _set(lt.matmul_desc_set_attribute, self.desc, A.EPILOGUE, lt.get_matmul_desc_attribute_dtype,
                 int(lt.Epilogue.GELU_BIAS if gelu else lt.Epilogue.BIAS))
            _set(lt.matmul_desc_set_attribute, self.desc, A.BIAS_POINTER, lt.get_matmul_desc_attribute_dtype,
                 bias_ptr)
            _set(lt.matmul_desc_set_attribute, self.desc, A.BIAS_DATA_TYPE, lt.get_matmul_desc_attribute_dtype, ct)
        self.a = lt.matrix_layout_create(ct, K, N, K) if trans_w else lt.matrix_layout_create(ct, N, K, N)
        self.b = lt.matrix_layout_create(ct, K, M, K)
        self.d = lt.matrix_layout_create(ct, N, M, N)
        self.ptrs = (w_ptr, x_ptr, y_ptr)
        self.stream = stream
        self.algo = np.zeros(1, dtype=lt.matmul_algo_dtype)
        tuned = ctx.tuned.get(self.key)
        if tuned is not None:
            self.set_algo(tuned)
        else:
            candidates = self.candidates()
            self.algo[0] = candidates[0]["algo"]

    def candidates(self) -> np.ndarray:
        lt, ctx = self.ctx.lt, self.ctx
        if self.key in ctx.heuristic_cache:
            return ctx.heuristic_cache[self.key]
        pref = lt.matmul_preference_create()
        try:
            _set(lt.matmul_preference_set_attribute, pref, lt.MatmulPreferenceAttribute.MAX_WORKSPACE_BYTES,
                 lt.get_matmul_preference_attribute_dtype, WORKSPACE_BYTES)
            results = np.zeros(CANDIDATES, dtype=lt.matmul_heuristic_result_dtype)
            count = np.zeros(1, np.int32)
            lt.matmul_algo_get_heuristic(ctx.handle, self.desc, self.a, self.b, self.d, self.d, pref, CANDIDATES,
                                         results.ctypes.data, count.ctypes.data)
        finally:
            lt.matmul_preference_destroy(pref)
        n = int(count[0])
        results = results[:n][results[:n]["state"] == 0]
        if not len(results):
            raise CudaError(f"{self.what}: cuBLASLt has no algorithm for {self.key}")
        ctx.heuristic_cache[self.key] = results
        return results

    def set_algo(self, algo_hex: str) -> None:
        self.algo = np.frombuffer(bytes.fromhex(algo_hex), dtype=self.ctx.lt.matmul_algo_dtype).copy()

    def launch(self) -> None:
        w, x, y = self.ptrs
        ctx = self.ctx
        ctx.lt.matmul(ctx.handle, self.desc, ctx.alpha.ctypes.data, w, self.a, x, self.b, ctx.beta.ctypes.data,
                      y, self.d, y, self.d, self.algo.ctypes.data, ctx.workspace_ptr, WORKSPACE_BYTES,
                      self.stream.ptr)

    def destroy(self) -> None:
        lt = self.ctx.lt
        for layout in (self.a, self.b, self.d):
            lt.matrix_layout_destroy(layout)
        lt.matmul_desc_destroy(self.desc)


def tune_gemms(gemms: list[Gemm]) -> tuple[str, float]:
    """Time each heuristic candidate of these GEMMs of one shape (every layer's instance, operands as bound) and
    set the fastest on all of them. One CUDA graph runs the instances in turn, as a step does, so that each reads
    its weights from DRAM rather than from an L2 its own previous call warmed. Returns (algorithm, us per GEMM)."""
    best = None
    for cand in gemms[0].candidates():
        for g in gemms:
            g.algo[0] = cand["algo"]
        try:
            us = time_us(gemms[0].stream, lambda: [g.launch() for g in gemms]) / len(gemms)
        except Exception:  # a candidate that fails at run time is skipped
            continue
        if best is None or us < best[1]:
            best = (gemms[0].algo.tobytes().hex(), us)
    if best is None:
        raise CudaError(f"{gemms[0].what}: no cuBLASLt candidate ran for {gemms[0].key}")
    for g in gemms:
        g.set_algo(best[0])
    return best
