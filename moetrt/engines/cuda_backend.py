"""The CUDA backend: one rank's lowered graph (``program.Program``) as launch plans on one GPU.

``CudaEngine`` copies the weights to the device once, allocates the KV cache (bound in place: the Attention
kernel writes it), the activation buffers, the kernels' workspaces and the input staging, then makes a
``StepPlan`` per step shape (batch B, tokens T, logit rows R): the host part of the graph is evaluated in numpy,
every device op becomes a validated, pre-bound kernel launch or cuBLASLt GEMM, and ``StepPlan.run()`` only
enqueues them (no host synchronisation, so a decode plan can be captured in a CUDA graph).

Activation buffers are planned once for the largest step (``max_tokens`` tokens): tensors are given buffers in
graph order and a buffer is reused once the last reader of its tensor has run. Aliases (Reshape, the ids Cast,
the KV-cache outputs) share their source's memory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from moetrt.engines import cuda
from moetrt.engines.gemm import WORKSPACE_BYTES, Gemm, GemmContext, TUNING_FILE
from moetrt.engines.program import Program, _slices, propagate
from moetrt.errors import KernelError, MoetrtError
from moetrt.plugins import launch
from moetrt.plugins.kernels import load_library

ALIGN = 256


def _nbytes(shape, dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * cuda.ITEMSIZE[dtype]


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def check_arch(arch: int, device_name: str) -> None:
    """The kernel library must hold SASS for this GPU's architecture family (sm_90 for Hopper, ...)."""
    archs = load_library().cuda_archs
    if not any(a // 10 == arch // 10 and a <= arch for a in archs):
        raise MoetrtError(f"{device_name} is sm_{arch}; the kernel library was built for "
                          f"{', '.join(f'sm_{a}' for a in archs)}; rebuild with CMAKE_CUDA_ARCHITECTURES={arch}")


@dataclass
class StepPlan:
    B: int
    T: int
    rows: int | None                 # logit rows gathered from the staging `rows` array, or None for all
    launches: list
    logits: cuda.View                # [R or B*T, V]
    default_rows: np.ndarray | None = None  # rows a Slice in the graph selects, when the caller gives none
    gemms: list = field(default_factory=list)
    gemv_candidates: list = field(default_factory=list)  # (key, cuBLASLt launches, GEMV launch) for tuning

    def run(self) -> None:
        for fn in self.launches:
            fn()

    def destroy(self) -> None:
        for g in self.gemms:
            g.destroy()
        self.gemms = []


class CudaEngine:
    fuse_layernorm = True  # a LayerNorm and the GEMV or MoE reading it as one kernel (decode plans; see plan)
    # ... up to this many rows: every block of the fused kernel re-reads the rows to normalise, which from 4 rows
    # costs more than the separate LayerNorm (H100, 350M QKV: fused 4.3 / 5.2 / 6.6 / 9.3 us at 1 / 2 / 4 / 8
    # rows against GEMV alone 4.4 / 3.7 / 3.7 / 3.7 plus a ~2.3 us LayerNorm; docs/bench/log.md)
    fuse_layernorm_max_rows = 2
    fuse_layernorm_moe = True  # the LayerNorm before a MoE inside its gate kernel (one token; see plan)
    # No LayerNorm kernel between two decode GEMVs (or a MoE and a GEMV): the one before adds the residual itself
    # (gemv_residual; the MoE's residual input), the one after runs on the un-normalised sum with the LayerNorm's
    # gamma / beta folded into a copy of its weights (gemv_folded). Single-rank graphs, fp16 / fp32; see plan.
    fold_layernorm = True
    # ... from this many rows up to fold_layernorm_max_rows: every block of gemv_folded gathers its rows' statistics
    # again, which at 32 rows costs more than the LayerNorm kernel (H100, 8-layer 350M decode graph, folded / not:
    # 0.2946 / 0.3059 ms at batch 4, 0.3623 / 0.3730 at 8, 0.4781 / 0.4819 at 16, 0.7245 / 0.7154 at 32). At 1-2
    # rows folding beats the LayerNorm as the GEMV's prologue (350M decode graph, from 1 / from 3 rows: 0.5210 /
    # 0.5234 ms at batch 1, 0.6036 / 0.6510 at 2; docs/bench/log.md)
    fold_layernorm_min_rows = 1
    fold_layernorm_max_rows = 16
    # a cuBLASLt GEMM followed by bias + tanh GeLU takes both as its GELU_BIAS epilogue (H100, 350M batch-32 FC1:
    # 6.43 us against 5.92 + 2.42 for the GEMM and bias_act; docs/bench/log.md)
    gelu_epilogue = True
    # the LM head is a GEMV candidate too, run by the GEMV kernel where tuning timed it faster (an engine tuned
    # before this has no such entry and keeps cuBLASLt)
    head_gemv = True

    def __init__(self, program: Program, max_batch: int, max_seq: int, max_tokens: int, max_logit_rows: int,
                 progress: bool = False, comm=None):
        self.program = program
        self.comm = comm  # an NCCL communicator (distributed.Nccl) for the AllReduce nodes of a tp > 1 rank
        self.max_batch, self.max_seq = max_batch, max_seq
        self.max_tokens = max_tokens
        self.max_rows = max(max_batch, max_logit_rows)
        self.dtype = program.act_dtype
        self._buffers: list[cuda.DeviceBuffer] = []
        self.plans: dict[tuple, StepPlan] = {}
        self.device = cuda.device_info()
        check_arch(self.device.arch, self.device.name)
        self.stream = cuda.Stream()
        self.gemm_ctx = None
        try:
            self._setup(progress)
        except BaseException:
            self.close()
            raise

    # -- set-up ------------------------------------------------------------------------------------------
    def _alloc(self, nbytes: int, what: str) -> cuda.DeviceBuffer:
        buf = cuda.DeviceBuffer(nbytes, what)
        self._buffers.append(buf)
        return buf

    def _setup(self, progress: bool) -> None:
        p = self.program
        # which tensors are aliases of which
        self.root: dict[str, str] = {}
        for op in p.ops:
            if op.kind == "alias":
                self.root[op.outputs[0]] = self.resolve(op.inputs[0])
            elif op.kind == "attention":
                self.root[op.outputs[1]] = op.inputs[1]
            elif op.kind == "all_reduce":  # in place
                if op.attrs.get("tp_size", 1) > 1 and (self.comm is None or self.comm.size != op.attrs["tp_size"]):
                    raise MoetrtError(f"node {op.node!r}: AllReduce over {op.attrs['tp_size']} ranks needs a "
                                      f"communicator of that size (have {getattr(self.comm, 'size', None)})")
                self.root[op.outputs[0]] = self.resolve(op.inputs[0])
        final = [op for op in p.ops if "logits" in op.outputs]
        if len(final) != 1 or final[0].kind != "gemm":
            raise MoetrtError("the graph's logits must come from one MatMul (the LM head)")
        self.head = final[0]
        self.head_source = self.head.inputs[0]
        self.select = next((op for op in p.ops if op.kind == "select" and op.outputs[0] == self.head_source), None)
        if self.select is not None:
            self.head_source = self.select.inputs[0]
        self.vocab, self.hidden = self.head.attrs["N"], self.head.attrs["K"]

        self._upload_weights(progress)
        self.fold_triples = self._fold_triples()
        # KV cache, one buffer per layer, zeroed; bound in place
        self.caches: dict[str, cuda.View] = {}
        for op in p.ops:
            if op.kind == "attention":
                name = op.inputs[1]
                shape = self._cache_shape(name)
                buf = self._alloc(_nbytes(shape, self.dtype), name)
                self.stream.memset(buf.ptr, 0, buf.nbytes)
                self.caches[name] = buf.view(shape, self.dtype)
        # input staging (device side; the runtime fills a pinned mirror)
        layout = {"input_ids": self.max_tokens, "position_ids": self.max_tokens, "past_lengths": self.max_batch,
                  "rows": self.max_rows, "tokens": self.max_batch}
        self.staging_offsets, off = {}, 0
        for name, n in layout.items():
            self.staging_offsets[name] = off
            off += _aligned(4 * n)
        self.staging = self._alloc(off, "input staging")
        # workspaces
        lib_ws = 0
        attn = [op for op in p.ops if op.kind == "attention"]
        if attn:
            shape = self._cache_shape(attn[0].inputs[1])
            lib_ws = launch.attention_workspace_size(self.max_batch, shape[2], shape[4], self.max_seq)
        self.attn_ws = self._alloc(lib_ws, "attention workspace")
        self.stream.memset(self.attn_ws.ptr, 0, self.attn_ws.nbytes)
        moe_ws = 0
        for op in p.ops:
            if op.kind == "moe":
                E, f, h = p.initializers[op.inputs[2]].shape
                moe_ws = max(moe_ws, launch.moe_workspace_size(self.max_tokens, h, f, E, op.attrs["top_k"], self.dtype))
        self.moe_ws = self._alloc(moe_ws, "MoE workspace")
        self.gemm_ws = self._alloc(WORKSPACE_BYTES, "cuBLASLt workspace")
        self.gemm_ctx = GemmContext(self.gemm_ws.ptr, self.device.name, p.base_dir / TUNING_FILE)
        self._plan_buffers()
        self.head_rows = self._alloc(_nbytes((self.max_rows, self.hidden), self.dtype), "gathered logit rows")
        self.logits_buf = self._alloc(_nbytes((self.max_rows, self.vocab), self.dtype), "logits")
        # last, so that every other buffer lies where it would without them (H100, 350M batch-1 decode graph, which
        # does not read them: 0.536 ms against 0.532 without folds when allocated before the KV cache, 0.533
        # against 0.531 allocated last)
        self._upload_folds()
        self.stream.synchronize()

    def resolve(self, name: str) -> str:
        while name in self.root:
            name = self.root[name]
        return name

    def _cache_shape(self, name: str) -> tuple[int, ...]:
        return self.cache_shapes[name]

    @property
    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.program.cache_shapes

    def _upload_weights(self, progress: bool) -> None:
        p = self.program
        conversions = {}
        for op in p.ops:  # LayerNorm parameters may be stored in fp32 next to fp16 activations
            if op.kind in ("add_layernorm", "embed_ln"):
                for w in op.inputs[-2:]:
                    conversions[w] = self.dtype
            if op.kind in ("gemm", "bias_act"):
                for w in op.inputs[1:]:
                    if w is not None:
                        conversions[w] = self.dtype
        self.weight_views: dict[str, cuda.View] = {}
        offsets, total = {}, 0
        for name in p.weights:
            init = p.initializers[name]
            dtype = conversions.get(name, init.dtype)
            offsets[name] = (total, dtype)
            total += _aligned(_nbytes(init.shape, dtype))
        self.weights = self._alloc(total, f"weights ({total / 2**30:.2f} GiB)")
        self.weight_bytes = total
        done, next_report = 0, 1 << 30
        rt = cuda.runtime_api()
        for name in p.weights:
            init = p.initializers[name]
            off, dtype = offsets[name]
            array = init.array(p.base_dir)
            if dtype != init.dtype:
                target = {"fp16": np.float16, "fp32": np.float32}.get(dtype)
                if target is None:
                    raise MoetrtError(f"weight {name!r}: cannot convert {init.dtype} to {dtype}")
                array = np.asarray(array).astype(target)
            array = np.ascontiguousarray(array)
            if array.nbytes:
                cuda.call(rt.cudaMemcpy, self.weights.ptr + off, array.ctypes.data, array.nbytes,
                          rt.cudaMemcpyKind.cudaMemcpyHostToDevice, what=f"copying weight {name!r} to the device")
            self.weight_views[name] = self.weights.view(init.shape, dtype, off)
            done += array.nbytes
            del array
            if progress and done >= next_report:
                print(f"      weights on the device: {done / 2**30:.1f} / {total / 2**30:.1f} GiB", file=sys.stderr,
                      flush=True)
                next_report += 1 << 30

    def _fold_triples(self) -> list[tuple[int, int, int]]:
        """(producer, LayerNorm, consumer) op indices where the LayerNorm can vanish from decode plans: an
        add_layernorm whose delta only it reads, made by a GEMM or MoE (no all-reduce between: single rank) after
        the residual x exists, and whose normalised output only a GEMM (not the LM head) reads."""
        ops = self.program.ops
        if not self.fold_layernorm or self.dtype not in ("fp16", "fp32"):
            return []
        readers, writer = self._readers(), {}
        for k, op in enumerate(ops):
            if op.kind not in ("alias", "select"):
                for t in op.outputs:
                    writer.setdefault(self.resolve(t), k)
        triples = []
        for i, j in self._layernorm_pairs().items():
            ln = ops[i]
            if ln.kind != "add_layernorm" or ops[j].kind != "gemm" or not ops[j].attrs["trans"]:
                continue
            x, delta = ln.inputs[0], ln.inputs[1]
            if not delta or len(ln.outputs) < 2:
                continue
            d = self.resolve(delta)
            p = writer.get(d)
            if p is None or readers.get(d) != [i] or ops[p].kind not in ("gemm", "moe"):
                continue
            if ops[p].kind == "gemm" and not ops[p].attrs["trans"]:
                continue
            if writer.get(self.resolve(x), -1) >= p:  # the residual must exist when the producer runs
                continue
            triples.append((p, i, j))
        return triples

    def _upload_folds(self) -> None:
        """Each fold's consumer weights with the LayerNorm's affine folded in, computed on the device from the
        weights already there (launch.fold_layernorm): {consumer op index: (weight', colsum, bias', epsilon)}."""
        p = self.program
        self.folds: dict[int, tuple] = {}
        self.folded_bytes = 0
        if not self.fold_triples:
            return
        layout, total = [], 0
        for _, i, j in self.fold_triples:
            N, K = self.weight_views[p.ops[j].inputs[1]].shape
            sums_at = total + _aligned(_nbytes((N, K), self.dtype))  # colsum, then bias'
            layout.append((i, j, total, sums_at, N, K))
            total = sums_at + 2 * _aligned(4 * N)
        buf = self._alloc(total, f"LayerNorm-folded weights ({total / 2**20:.0f} MiB)")
        self.folded_bytes = total
        for i, j, off, off_c, N, K in layout:
            gamma, beta = (self.weight_views[n] for n in p.ops[i].inputs[2:4])
            _, wname, bname = p.ops[j].inputs
            views = (buf.view((N, K), self.dtype, off), buf.view((N,), "fp32", off_c),
                     buf.view((N,), "fp32", off_c + _aligned(4 * N)))
            launch.fold_layernorm(gamma, beta, self.weight_views[wname], self.weight_views[bname] if bname else None,
                                  *views, stream=self.stream.ptr)
            self.folds[j] = (*views, p.ops[i].attrs["epsilon"])

    # -- shapes and buffer planning -----------------------------------------------------------------------
    def propagate(self, B: int, T: int) -> tuple[dict, dict]:
        return propagate(self.program, self.cache_shapes, B, T)

    def _plan_buffers(self) -> None:
        """Give every activation a buffer, reusing buffers whose tensors are dead (sized for the largest step)."""
        p = self.program
        fixed = set(self.caches) | {"input_ids", "position_ids", "past_lengths", "logits"}
        if self.select is not None:
            fixed.add(self.select.outputs[0])
        sizes: dict[str, int] = {}
        for B, T in ((1, self.max_tokens), (self.max_batch, max(1, self.max_tokens // self.max_batch))):
            shapes, _ = self.propagate(B, T)
            for name, shape in shapes.items():
                root = self.resolve(name)
                if root in fixed:  # graph inputs, caches and logits have buffers of their own
                    continue
                sizes[root] = max(sizes.get(root, 0), _nbytes(shape, self.dtype))
        ops = p.ops
        last_use: dict[str, int] = {}
        for i, op in enumerate(ops):
            for t in op.inputs:
                if t:
                    last_use[self.resolve(t)] = i
        for o in p.outputs:
            last_use[self.resolve(o)] = len(ops)
        if self.fuse_layernorm:  # a fused LayerNorm + GEMV (or MoE) reads the LayerNorm's inputs while writing its output
            for i, j in self._layernorm_pairs().items():
                for t in ops[i].inputs[:2] if ops[i].kind == "add_layernorm" else ():
                    if t:
                        last_use[self.resolve(t)] = max(last_use.get(self.resolve(t), -1), j)
        # a fold's producer writes the LayerNorm's sum: its buffer is taken there (and kept by prefill plans, which
        # launch the LayerNorm as before)
        early: dict[int, list[str]] = {}
        for pr, i, _ in self.fold_triples:
            early.setdefault(pr, []).append(ops[i].outputs[0])
        dies_at: dict[int, set] = {}
        for t, i in last_use.items():
            dies_at.setdefault(i, set()).add(t)
        free: list[tuple[int, int]] = []   # (capacity, buffer index)
        caps: list[int] = []
        self.assignment: dict[str, int] = {}
        for i, op in enumerate(ops):
            if op.kind in ("alias", "select"):
                continue
            for out in list(op.outputs) + early.get(i, []):
                root = self.resolve(out)
                if root in fixed or root in self.assignment or root not in sizes:
                    continue
                need = sizes[root]
                fits = [f for f in free if f[0] >= need]
                if fits:
                    choice = min(fits)
                    free.remove(choice)
                    idx = choice[1]
                elif free:  # grow the largest free buffer rather than add one
                    choice = max(free)
                    free.remove(choice)
                    idx = choice[1]
                    caps[idx] = need
                else:
                    idx = len(caps)
                    caps.append(need)
                self.assignment[root] = idx
            for t in dies_at.get(i, ()):
                if t in self.assignment:
                    free.append((caps[self.assignment[t]], self.assignment[t]))
            for out in op.outputs:  # an output nobody reads is dead at once
                root = self.resolve(out)
                if root in self.assignment and root not in last_use:
                    free.append((caps[self.assignment[root]], self.assignment[root]))
        self.pool = [self._alloc(_aligned(c), f"activation buffer {k}") for k, c in enumerate(caps)]
        self.activation_bytes = sum(b.nbytes for b in self.pool)

    # -- plans --------------------------------------------------------------------------------------------
    def staging_view(self, name: str, shape, dtype: str = "int32") -> cuda.View:
        return cuda.View(self.staging.ptr + self.staging_offsets[name], tuple(shape), dtype)

    def _view(self, name: str, shape) -> cuda.View:
        root = self.resolve(name)
        if root in ("input_ids", "position_ids", "past_lengths"):
            return self.staging_view(root, shape)
        if root in self.caches:
            return self.caches[root]
        if root in self.program.initializers:
            return self.weight_views[root]
        buf = self.pool[self.assignment[root]]
        return buf.view(shape, self.dtype)

    def use_gemv(self, key: str, M: int) -> bool:
        """Our GEMV kernel or cuBLASLt for a decode-sized GEMM: as tuned on this GPU, else the GEMV up to 8 rows
        (4 in fp32). Measured on the H100 for the 350M GEMMs: GEMV 1.5-3.1 µs vs cuBLASLt 3.6-5.9 µs at 1 row;
        at 8 rows the tensor-core GEMV (fp16/bf16) 1.7-4.8 µs vs 3.6-5.9 µs."""
        return self.gemm_ctx.gemv.get(key, M <= 4 or (self.dtype != "fp32" and M <= 8))

    def _gemv_fits(self, trans: bool, M: int, K: int) -> bool:
        """Whether the GEMV kernel can run a GEMM of M rows over K with its weight stored [out, in] (trans)."""
        return trans and M <= launch.gemv_max_rows(self.dtype) and K % 8 == 0

    def _gemv_choice(self, op, shapes: dict, gemv: bool | None) -> tuple[bool, bool, str]:
        """For a GEMM op at these shapes: whether the GEMV kernel can run it, whether it does (``gemv`` forces
        the choice), and the key of that choice in the tuning."""
        x, _, bias = op.inputs
        K, Nout, act = op.attrs["K"], op.attrs["N"], op.attrs.get("act")
        M = int(np.prod(shapes[x][:-1]))
        eligible = self._gemv_fits(op.attrs["trans"], M, K)
        key = f"{M}x{Nout}x{K}:{self.dtype}:{'bias' if bias else 'none'}:{act or 'noact'}"
        return eligible, eligible and (gemv if gemv is not None else self.use_gemv(key, M)), key

    def plan(self, B: int, T: int, rows: int | None = None, gemv: bool | None = None) -> StepPlan:
        """The launch plan of a step of B sequences × T new tokens; ``rows``: the number of logit rows to
        compute, read at run time from the staging ``rows`` array (indices into the B·T positions).
        ``gemv``: force (True/False) the GEMV kernel for eligible GEMMs instead of the tuned choice."""
        key = (B, T, rows) if gemv is None else (B, T, rows, gemv)
        if key not in self.plans:  # made once: a step replays it (or its CUDA graph)
            if B * T > self.max_tokens or B > self.max_batch:
                raise MoetrtError(f"a step of {B}×{T} tokens exceeds the runtime's {self.max_tokens} tokens / "
                                  f"{self.max_batch} sequences")
            self.plans[key] = self._make_plan(B, T, rows, gemv)
        return self.plans[key]

    def _make_plan(self, B: int, T: int, rows: int | None, gemv: bool | None) -> StepPlan:
        p, s = self.program, self.stream.ptr
        shapes, values = self.propagate(B, T)
        launches, gemms, candidates = [], [], []
        N = B * T
        default_rows = None
        # the LayerNorm folds this step takes: both GEMMs run by the GEMV kernel (a MoE producer always can), and
        # fold_layernorm_min_rows to fold_layernorm_max_rows rows; the LayerNorms not folded may still be fused below
        fold_ln, fold_producer, fold_consumer = set(), {}, {}
        fold_rows = self.fold_layernorm_min_rows <= N <= self.fold_layernorm_max_rows
        for pr, i, j in self.fold_triples if fold_rows else ():
            if self._gemv_choice(p.ops[j], shapes, gemv)[1] and \
                    (p.ops[pr].kind == "moe" or self._gemv_choice(p.ops[pr], shapes, gemv)[1]):
                fold_ln.add(i)
                fold_producer[pr] = i
                fold_consumer[j] = i
        # a LayerNorm is fused into the GEMV after it up to fuse_layernorm_max_rows, into a MoE at any size (the
        # library normalises inside the gate kernel for one token and launches it separately beyond)
        fusable = {i: j for i, j in self._layernorm_pairs().items() if i not in fold_ln and
                   (self.fuse_layernorm_moe if p.ops[j].kind == "moe" else N <= self.fuse_layernorm_max_rows)} \
            if self.fuse_layernorm else {}
        pending = {}  # GEMM / MoE op index -> the LayerNorm before it, deferred to be fused: (args, kwargs)

        def ln_views(i: int) -> tuple:  # a folded LayerNorm's residual input and sum output, [n, h]
            x, _, _, _ = p.ops[i].inputs
            n, h = int(np.prod(shapes[x][:-1])), shapes[x][-1]
            return self._view(x, (n, h)), self._view(p.ops[i].outputs[0], (n, h))

        def layernorm(index: int, ln: tuple) -> None:  # launched now, or deferred into the GEMM it feeds
            if index in fusable:
                pending[fusable[index]] = ln
            else:
                launches.append(launch.add_layernorm(*ln[0], **ln[1], defer=True))
        for index, op in enumerate(p.ops):
            ins, outs = op.inputs, op.outputs
            if op.kind == "all_reduce":
                if op.attrs.get("tp_size", 1) > 1:
                    view = self._view(ins[0], shapes[ins[0]])
                    launches.append(self.comm.all_reduce_launch(view, self.stream.ptr))
                continue
            if op.kind in ("alias", "select"):
                continue
            if op is self.head:
                src_shape = shapes[self.head_source]
                src = self._view(self.head_source, src_shape).reshape(-1, self.hidden)
                if rows is None and self.select is not None:
                    sel_shape = shapes[self.select.inputs[0]]
                    sl = _slices(sel_shape, *[values[i] for i in self.select.inputs[1:] if i])
                    idx = np.arange(int(np.prod(sel_shape[:-1]))).reshape(sel_shape[:-1])[sl[:-1]]
                    default_rows = idx.reshape(-1).astype(np.int32)
                    R = len(default_rows)
                else:
                    R = rows
                if R is None:
                    R = src.shape[0]
                    x = src
                else:
                    if R > self.max_rows:
                        raise MoetrtError(f"{R} logit rows exceed the runtime's {self.max_rows}")
                    x = self.head_rows.view((R, self.hidden), self.dtype)
                    launches.append(launch.gather_rows(src, self.staging_view("rows", (R,)), x, stream=s, defer=True))
                if R > self.max_rows:
                    raise MoetrtError(f"logits of {R} positions exceed the runtime's {self.max_rows} rows; "
                                      "ask for fewer positions per step")
                out = self.logits_buf.view((R, self.vocab), self.dtype)
                logits = out
                w, bv = self._view(ins[1], ()), self._view(ins[2], ()) if ins[2] else None
                eligible = self.head_gemv and self._gemv_fits(op.attrs["trans"], R, self.hidden)
                key = f"head:{R}x{self.vocab}x{self.hidden}:{self.dtype}:{'bias' if bv else 'none'}"
                gemv_call = launch.gemv(x, w, bv, out, stream=s, defer=True) if eligible else None
                if eligible and (gemv if gemv is not None else self.gemm_ctx.gemv.get(key, False)):
                    launches.append(gemv_call)
                    continue
                g = Gemm(self.gemm_ctx, R, self.vocab, self.hidden, self.dtype, x.ptr, w.ptr, out.ptr,
                         bv.ptr if bv is not None else None, self.stream, op.node, op.attrs["trans"])
                gemms.append(g)
                launches.append(g.launch)
                if eligible:
                    candidates.append((key, [g.launch], gemv_call))
                continue
            if op.kind == "embed_ln":
                ids, pos, wte, wpe, gamma, beta = ins
                h = p.initializers[wte].shape[1]
                emb = self._view(outs[0], (N, h))
                launches.append(launch.embedding(self._view(ids, (N,)), self._view(pos, (N,)), self._view(wte, ()),
                                                 self._view(wpe, ()), emb, stream=s, defer=True))
                layernorm(index, ((emb, None, self._view(gamma, ()), self._view(beta, ()), None,
                                   self._view(outs[1], (N, h))), {"epsilon": op.attrs["epsilon"], "stream": s}))
            elif op.kind == "add_layernorm":
                if index in fold_ln:  # its producer adds the residual, its consumer normalises
                    continue
                x, delta, gamma, beta = ins
                h = shapes[x][-1]
                n = int(np.prod(shapes[x][:-1]))
                layernorm(index, ((self._view(x, (n, h)), self._view(delta, (n, h)) if delta else None,
                                   self._view(gamma, ()), self._view(beta, ()),
                                   self._view(outs[0], (n, h)) if delta else None, self._view(outs[1], (n, h))),
                                  {"epsilon": op.attrs["epsilon"], "stream": s}))
            elif op.kind == "gemm":
                x, w, bias = ins
                K, Nout = op.attrs["K"], op.attrs["N"]
                M = int(np.prod(shapes[x][:-1]))
                act = op.attrs.get("act")
                xv, yv = self._view(x, (M, K)), self._view(outs[0], (M, Nout))
                bv = self._view(bias, ()) if bias else None
                eligible, use_gemv, choice_key = self._gemv_choice(op, shapes, gemv)
                if index in fold_producer:  # y = the LayerNorm's sum
                    resid, total = ln_views(fold_producer[index])
                    launches.append(launch.gemv_residual(xv, self._view(w, ()), bv, resid, total, act or "none",
                                                         stream=s, defer=True))
                    continue
                if index in fold_consumer:  # on the LayerNorm's sum, gamma and beta in the weights
                    wf, colsum, bf, eps = self.folds[index]
                    total = ln_views(fold_consumer[index])[1]
                    launches.append(launch.gemv_folded(total.reshape(M, K), wf, colsum, bf, yv, act or "none",
                                                       epsilon=eps, stream=s, defer=True))
                    continue
                gemv_call = launch.gemv(xv, self._view(w, ()), bv, yv, act or "none", stream=s, defer=True) \
                    if eligible else None
                ln = pending.pop(index, None)
                if ln is not None:
                    fused = None
                    if use_gemv:
                        (lx, ld, lg, lb, lsum, _), kw = ln
                        try:
                            fused = launch.add_layernorm_gemv(lx, ld, lg, lb, lsum, self._view(w, ()), bv, yv,
                                                              act or "none", defer=True, **kw)
                        except KernelError:  # too large for its shared memory, or y shares a buffer with x
                            fused = None
                    if fused is not None:
                        launches.append(fused)  # LayerNorm, then one pass over W: one kernel
                        continue
                    launches.append(launch.add_layernorm(*ln[0], **ln[1], defer=True))
                if use_gemv:
                    launches.append(gemv_call)  # one pass over W [N, K], bias and activation fused
                    continue
                gelu = self.gelu_epilogue and act == "gelu_tanh" and bv is not None
                g = Gemm(self.gemm_ctx, M, Nout, K, self.dtype, xv.ptr, self._view(w, ()).ptr, yv.ptr,
                         bv.ptr if bv is not None and (act is None or gelu) else None, self.stream, op.node,
                         op.attrs["trans"], gelu=gelu)
                gemms.append(g)
                launches.append(g.launch)
                calls = [g.launch]
                if act is not None and not gelu:  # bias + activation in place after the GEMM
                    launches.append(launch.bias_act(yv, bv, yv, act, stream=s, defer=True))
                    calls.append(launches[-1])
                if eligible:
                    candidates.append((choice_key, calls, gemv_call))
            elif op.kind == "bias_act":
                x, bias = ins
                n, c = int(np.prod(shapes[x][:-1])), shapes[x][-1]
                launches.append(launch.bias_act(self._view(x, (n, c)), self._view(bias, ()), self._view(outs[0], (n, c)),
                                                op.attrs["activation"], stream=s, defer=True))
            elif op.kind == "attention":
                qkv, cache, past = ins
                b, t, three_h = shapes[qkv]
                launches.append(launch.attention(self._view(qkv, (b, t, three_h)), self._view(cache, ()),
                                                 self._view(past, (b,)), self._view(outs[0], (b, t, three_h // 3)),
                                                 op.attrs["num_heads"], self.attn_ws.view((self.attn_ws.nbytes,), "uint8"),
                                                 stream=s, defer=True))
            elif op.kind == "moe":
                x, gate, w1, b1, w2, b2 = ins
                n, h = int(np.prod(shapes[x][:-1])), shapes[x][-1]
                a = op.attrs
                out, resid = self._view(outs[0], (n, h)), None
                if index in fold_producer:  # out = the next LayerNorm's sum
                    resid, out = ln_views(fold_producer[index])
                weights = (self._view(gate, ()), self._view(w1, ()), self._view(b1, ()), self._view(w2, ()),
                           self._view(b2, ()), out, self.moe_ws.view((self.moe_ws.nbytes,), "uint8"))
                kw = dict(top_k=a["top_k"], activation=a["activation"], capacity_factor=a["capacity_factor"],
                          min_capacity=a["min_capacity"], residual=resid, stream=s, defer=True)
                ln = pending.pop(index, None)
                if ln is not None:
                    (lx, ld, lg, lb, lsum, lnormed), lkw = ln
                    try:  # the LayerNorm in the gate kernel
                        launches.append(launch.add_layernorm_moe(lx, ld, lg, lb, lsum, lnormed, *weights,
                                                                 epsilon=lkw["epsilon"], **kw))
                        continue
                    except KernelError:  # sum or normed share a buffer with x or delta, say
                        launches.append(launch.add_layernorm(*ln[0], **ln[1], defer=True))
                launches.append(launch.moe(self._view(x, (n, h)), *weights, **kw))
        assert not pending, f"LayerNorms left unfused and unlaunched: {sorted(pending)}"
        return StepPlan(B, T, rows, launches, logits, default_rows, gemms, candidates)

    def _readers(self) -> dict[str, list[int]]:
        """{tensor (resolved): the indices of the ops that read it}, aliases and selects left out."""
        readers: dict[str, list[int]] = {}
        for i, op in enumerate(self.program.ops):
            if op.kind not in ("alias", "select"):
                for t in op.inputs:
                    if t:
                        readers.setdefault(self.resolve(t), []).append(i)
        return readers

    def _layernorm_pairs(self) -> dict[int, int]:
        """{LayerNorm op index: GEMM or MoE op index} where that op is the only reader of the normalised tensor
        and nothing but aliases runs between them: candidates for one fused kernel (a GEMM only when the GEMV
        runs it)."""
        ops, readers = self.program.ops, self._readers()
        outputs = {self.resolve(o) for o in self.program.outputs}
        pairs = {}
        for i, op in enumerate(ops):
            if op.kind not in ("add_layernorm", "embed_ln"):
                continue
            normed = self.resolve(op.outputs[1])
            r = readers.get(normed, [])
            if len(r) != 1 or normed in outputs:
                continue
            j = r[0]
            g = ops[j]
            reader = g.kind == "moe" or (g.kind == "gemm" and g is not self.head)
            if reader and self.resolve(g.inputs[0]) == normed and \
                    all(ops[k].kind in ("alias", "select") for k in range(i + 1, j)):
                pairs[i] = j
        return pairs

    def time_all_reduces(self, B: int, reps: int = 20) -> float:
        """Milliseconds of one decode step's all-reduces alone (each on a [B, hidden] buffer); 0 without any."""
        n = sum(1 for op in self.program.ops if op.kind == "all_reduce" and op.attrs.get("tp_size", 1) > 1)
        if not n or self.comm is None:
            return 0.0
        view = self.head_rows.view((B, self.hidden), self.dtype)
        return cuda.elapsed_ms(self.stream, self.comm.all_reduce_launch(view, self.stream.ptr), reps * n) / reps

    def drop_plan(self, key: tuple) -> None:
        plan = self.plans.pop(key, None)
        if plan is not None:
            plan.destroy()

    @property
    def device_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    def close(self) -> None:
        for key in list(self.plans):
            self.drop_plan(key)
        if self.gemm_ctx is not None:
            self.gemm_ctx.destroy()
            self.gemm_ctx = None
        if getattr(self, "stream", None) is not None and self.stream.handle is not None:
            try:
                self.stream.synchronize()
            except MoetrtError:
                pass
        for buf in self._buffers:
            buf.free()
        self._buffers = []
        if getattr(self, "stream", None) is not None:
            self.stream.destroy()
