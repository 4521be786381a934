"""Python launchers: check every argument, then call the C entry point.

Arguments are device arrays exposing ``__cuda_array_interface__`` (CuPy arrays, torch CUDA tensors,
or the runtime's own buffers); the launcher reads pointer, shape, dtype and strides from it, refuses
anything the kernel cannot take (wrong dtype or shape, non-contiguous, host memory, misaligned), and
raises ``KernelError`` with the kernel's error code otherwise.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from moetrt.errors import KernelError
from moetrt.plugins.kernels import DTYPE_CODES, check, load_library

ACTIVATION_CODES = {"gelu_tanh": 0, "gelu": 1, "none": 2}  # moetrt_kernels.h ("none": bias_act only)
_P, _I64, _I32, _F32, _SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_size_t
_SIGNATURES = {
    "moetrt_embedding": [_P] * 5 + [_I64] * 4 + [_I32, _P],
    "moetrt_add_layernorm": [_P] * 6 + [_I64, _I64, _F32, _I32, _P],
    "moetrt_bias_act": [_P] * 3 + [_I64, _I64, _I32, _I32, _P],
    "moetrt_attention_workspace_size": [_I32] * 4 + [ctypes.POINTER(_SZ)],
    "moetrt_attention": [_P] * 4 + [_I32] * 7 + [_P, _SZ, _P],
    "moetrt_moe_capacity": [_I64, _I32, _I32, _F32, _I32],
    "moetrt_moe_workspace_size": [_I64, _I64, _I64, _I32, _I32, _I32, ctypes.POINTER(_SZ)],
    "moetrt_moe": [_P] * 8 + [_I64] * 3 + [_I32] * 3 + [_F32, _I32, _I32, _P, _SZ, _P],
    "moetrt_add_layernorm_moe": ([_P] * 6 + [_F32] + [_P] * 7 + [_I64] * 3 + [_I32] * 3
                                 + [_F32, _I32, _I32, _P, _SZ, _P]),
    "moetrt_gather_rows": [_P] * 3 + [_I64] * 3 + [_I32, _P],
    "moetrt_gemv": [_P] * 4 + [_I64] * 3 + [_I32, _I32, _P],
    "moetrt_add_layernorm_gemv": [_P] * 8 + [_I64] * 3 + [_F32, _I32, _I32, _P],
    "moetrt_gemv_residual": [_P] * 5 + [_I64] * 3 + [_I32, _I32, _P],
    "moetrt_gemv_folded": [_P] * 5 + [_I64] * 3 + [_F32, _I32, _I32, _P],
    "moetrt_fold_layernorm": [_P] * 7 + [_I64, _I64, _I32, _P],
    "moetrt_sample": [_P, _P, _I32, _I64, _F32, _I32, _F32, ctypes.c_uint64, ctypes.c_uint64, _I32, _P],
    "moetrt_sample_advance": ([_P, _P, _I32, _I64, _F32, _I32, _F32, ctypes.c_uint64, ctypes.c_uint64, _I32]
                              + [_P] * 5),
}


@dataclass(frozen=True)
class Launch:
    """A validated kernel call, bound to its arguments: ``launch()`` runs it and raises on an error code.
    Launchers called with ``defer=True`` return one instead of running, so a launch plan validates once
    and replays many times."""
    fn: object
    args: tuple
    what: str

    def __call__(self) -> None:
        code = self.fn(*self.args)
        if code:
            check(code, self.what)


def _launch(name: str, args: tuple, what: str, defer: bool):
    call = Launch(_fn(name), args, what)
    if defer:
        return call
    call()
    return None


def _fn(name: str):
    lib = load_library()
    try:
        fn = getattr(lib, name)
    except AttributeError:  # a library built from older sources with the same ABI number
        raise KernelError(f"{lib.path}: has no {name}; it was built from older sources than this moetrt; "
                          "rebuild it with `pip install .`") from None
    fn.restype, fn.argtypes = ctypes.c_int, _SIGNATURES[name]
    return fn


def _activation(kind: str) -> int:
    if kind not in ACTIVATION_CODES:
        raise KernelError(f"activation must be one of {', '.join(ACTIVATION_CODES)}, got {kind!r}")
    return ACTIVATION_CODES[kind]


_TYPESTRS = {"<f4": "fp32", "<f2": "fp16", "<V2": "bf16", "<i4": "int32"}


@dataclass(frozen=True)
class DeviceArray:
    ptr: int
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, obj, name: str) -> "DeviceArray":
        iface = getattr(obj, "__cuda_array_interface__", None)
        if iface is None:
            raise KernelError(f"{name}: not a device array (no __cuda_array_interface__): {type(obj).__name__}")
        typestr = iface["typestr"]
        # bfloat16 has no typestr of its own: torch reports it as "<V2" (raw 2-byte), others by dtype name
        bf16 = typestr == "<V2" or str(getattr(obj, "dtype", "")).endswith("bfloat16")
        dtype = "bf16" if bf16 else _TYPESTRS.get(typestr, typestr)
        shape = tuple(int(s) for s in iface["shape"])
        strides = iface.get("strides")
        if strides is not None:
            itemsize = int(typestr[2:])
            expected, step = [], itemsize
            for s in reversed(shape):
                expected.insert(0, step)
                step *= s
            if tuple(strides) != tuple(expected) and 0 not in shape:
                raise KernelError(f"{name}: must be contiguous, got strides {tuple(strides)} for shape {shape}")
        return cls(int(iface["data"][0]), shape, dtype)


def _expect(arr: DeviceArray, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
    if arr.shape != shape:
        raise KernelError(f"{name}: expected shape {shape}, got {arr.shape}")
    if arr.dtype not in dtypes:
        raise KernelError(f"{name}: expected dtype {' or '.join(dtypes)}, got {arr.dtype}")
    align = 4 if arr.dtype == "int32" else 16  # the kernels read floats 16 bytes at a time
    if arr.ptr % align:
        raise KernelError(f"{name}: device pointer {arr.ptr:#x} is not {align}-byte aligned")


def embedding(input_ids, position_ids, wte, wpe, out, stream: int = 0, defer: bool = False):
    """``out[t] = wte[input_ids[t]] + wpe[position_ids[t]]`` (int32 ids ``[N]``, weights fp32/fp16/bf16).

    Ids must already be in range (the runtime checks prompts on the host; the kernel clamps)."""
    ids, pos = DeviceArray.of(input_ids, "input_ids"), DeviceArray.of(position_ids, "position_ids")
    w, p, o = DeviceArray.of(wte, "wte"), DeviceArray.of(wpe, "wpe"), DeviceArray.of(out, "out")
    if len(w.shape) != 2 or len(ids.shape) != 1:
        raise KernelError(f"embedding: wte must be [vocab, hidden] and input_ids [tokens], got {w.shape}, {ids.shape}")
    (n,), (vocab, hidden) = ids.shape, w.shape
    _expect(ids, "input_ids", (n,), ("int32",))
    _expect(pos, "position_ids", (n,), ("int32",))
    _expect(w, "wte", (vocab, hidden), tuple(DTYPE_CODES))
    if len(p.shape) != 2:
        raise KernelError(f"wpe: expected [max_positions, {hidden}], got {p.shape}")
    _expect(p, "wpe", (p.shape[0], hidden), (w.dtype,))
    _expect(o, "out", (n, hidden), (w.dtype,))
    return _launch("moetrt_embedding", (ids.ptr, pos.ptr, w.ptr, p.ptr, o.ptr, n, hidden, vocab, p.shape[0], DTYPE_CODES[w.dtype], stream,), "embedding", defer)


def _float_dtypes() -> tuple[str, ...]:
    return tuple(DTYPE_CODES)


def _add_layernorm_operands(a: DeviceArray, delta, sum_out, gamma, beta):
    """delta, sum_out (None or [rows, hidden], sum_out required with delta), gamma and beta ([hidden]) of x ``a``."""
    rows, hidden = a.shape
    d = None if delta is None else DeviceArray.of(delta, "delta")
    s = None if sum_out is None else DeviceArray.of(sum_out, "sum_out")
    for arr, name in ((d, "delta"), (s, "sum_out")):
        if arr is not None:
            _expect(arr, name, (rows, hidden), (a.dtype,))
    if d is not None and s is None:
        raise KernelError("sum_out: required when delta is given")
    g, b = DeviceArray.of(gamma, "gamma"), DeviceArray.of(beta, "beta")
    _expect(g, "gamma", (hidden,), (a.dtype,))
    _expect(b, "beta", (hidden,), (a.dtype,))
    return d, s, g, b


def _add_layernorm_io(x, delta, sum_out, gamma, beta, normed):
    """x [rows, hidden] and normed (same shape and dtype) with ``_add_layernorm_operands``: (x, d, s, g, b, n)."""
    a = DeviceArray.of(x, "x")
    if len(a.shape) != 2:
        raise KernelError(f"x: expected [rows, hidden], got {a.shape}")
    _expect(a, "x", a.shape, _float_dtypes())
    d, s, g, b = _add_layernorm_operands(a, delta, sum_out, gamma, beta)
    n = DeviceArray.of(normed, "normed")
    _expect(n, "normed", a.shape, (a.dtype,))
    return a, d, s, g, b, n


def _layernorm_max_hidden(dtype: str) -> int:
    """The LayerNorm kernels' limit: 1024 vectors of 16 bytes a row (128 threads x 8)."""
    return 1024 * (16 // (4 if dtype == "fp32" else 2))


def add_layernorm(x, delta, gamma, beta, sum_out, normed, epsilon: float = 1e-5, stream: int = 0, defer: bool = False):
    """``sum_out = x + delta``; ``normed = LayerNorm(sum_out)`` (fp32 statistics). ``delta``/``sum_out`` may be None."""
    a, d, s, g, b, n = _add_layernorm_io(x, delta, sum_out, gamma, beta, normed)
    rows, hidden = a.shape
    return _launch("moetrt_add_layernorm", (a.ptr, d.ptr if d else None, g.ptr, b.ptr, s.ptr if s else None, n.ptr,
                                      rows, hidden, epsilon, DTYPE_CODES[a.dtype], stream,), "add_layernorm", defer)


def bias_act(x, bias, y, activation: str = "gelu_tanh", stream: int = 0, defer: bool = False):
    """``y = act(x + bias)`` for ``x, y [rows, cols]`` (may be the same array), ``bias [cols]``."""
    a = DeviceArray.of(x, "x")
    if len(a.shape) != 2:
        raise KernelError(f"x: expected [rows, cols], got {a.shape}")
    _expect(a, "x", a.shape, _float_dtypes())
    _expect(DeviceArray.of(bias, "bias"), "bias", (a.shape[1],), (a.dtype,))
    out = DeviceArray.of(y, "y")
    _expect(out, "y", a.shape, (a.dtype,))
    return _launch("moetrt_bias_act", (a.ptr, DeviceArray.of(bias, "bias").ptr, out.ptr, a.shape[0], a.shape[1],
                                 _activation(activation), DTYPE_CODES[a.dtype], stream,), "bias_act", defer)


def attention_workspace_size(max_batch: int, num_heads: int, head_dim: int, max_seq: int) -> int:
    """Bytes of the attention workspace for a KV cache of ``max_batch`` sequences; calls of any batch share it."""
    size = ctypes.c_size_t(0)
    check(_fn("moetrt_attention_workspace_size")(max_batch, num_heads, head_dim, max_seq, ctypes.byref(size)),
          "attention_workspace_size")
    return size.value


def attention(qkv, kv_cache, past_lengths, out, num_heads: int, workspace, stream: int = 0, defer: bool = False):
    """Causal attention of T new tokens per sequence; K/V written into ``kv_cache`` in place.

    ``qkv [B, T, 3h]`` (Megatron order), ``kv_cache [2, max_batch, H, max_seq, D]``, ``past_lengths [B]`` int32
    (each + T must fit in max_seq: the caller checks, the kernel trusts), ``out [B, T, h]``, ``workspace``: a
    zero-filled uint8 device array of ``attention_workspace_size(max_batch, ...)`` bytes, reused across calls."""
    q, c = DeviceArray.of(qkv, "qkv"), DeviceArray.of(kv_cache, "kv_cache")
    if len(q.shape) != 3 or len(c.shape) != 5 or c.shape[0] != 2:
        raise KernelError(f"attention: expected qkv [B, T, 3h] and kv_cache [2, Bm, H, S, D], got {q.shape}, {c.shape}")
    B, T, three_h = q.shape
    _, max_batch, H, max_seq, D = c.shape
    if H != num_heads or three_h != 3 * H * D:
        raise KernelError(f"attention: qkv last dim {three_h} and kv_cache heads {H} do not match num_heads "
                          f"{num_heads} x head_dim {D} x 3")
    if B > max_batch or T > max_seq:
        raise KernelError(f"attention: batch {B} / tokens {T} exceed the cache's {max_batch} / {max_seq}")
    _expect(q, "qkv", q.shape, _float_dtypes())
    _expect(c, "kv_cache", c.shape, (q.dtype,))
    _expect(DeviceArray.of(past_lengths, "past_lengths"), "past_lengths", (B,), ("int32",))
    o = DeviceArray.of(out, "out")
    _expect(o, "out", (B, T, H * D), (q.dtype,))
    ws = DeviceArray.of(workspace, "workspace")
    need = attention_workspace_size(max_batch, H, D, max_seq)
    nbytes = _nbytes(ws)
    if nbytes < need:
        raise KernelError(f"workspace: {nbytes} bytes, attention needs {need}")
    return _launch("moetrt_attention", (q.ptr, c.ptr, DeviceArray.of(past_lengths, "past_lengths").ptr, o.ptr, B, T, H, D,
                                  max_batch, max_seq, DTYPE_CODES[q.dtype], ws.ptr, nbytes, stream,), "attention", defer)


def moe_capacity(tokens: int, experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    return _fn("moetrt_moe_capacity")(tokens, experts, top_k, capacity_factor, min_capacity)


def moe_workspace_size(tokens: int, hidden: int, ffn: int, experts: int, top_k: int, dtype: str) -> int:
    size = ctypes.c_size_t(0)
    check(_fn("moetrt_moe_workspace_size")(tokens, hidden, ffn, experts, top_k, DTYPE_CODES[dtype],
                                           ctypes.byref(size)), "moe_workspace_size")
    return size.value


def _moe_args(hidden, gate_weight, fc1_weight, fc1_bias, fc2_weight, fc2_bias, out, workspace, top_k, activation,
              capacity_factor, min_capacity, residual, stream) -> tuple[DeviceArray, tuple]:
    """The checked arguments of ``moetrt_moe`` after ``hidden``; returns (hidden, those arguments)."""
    x = DeviceArray.of(hidden, "hidden")
    if len(x.shape) != 2:
        raise KernelError(f"hidden: expected [tokens, hidden], got {x.shape}")
    N, h = x.shape
    _expect(x, "hidden", (N, h), _float_dtypes())
    w1 = DeviceArray.of(fc1_weight, "fc1_weight")
    if len(w1.shape) != 3:
        raise KernelError(f"fc1_weight: expected [experts, ffn, {h}], got {w1.shape}")
    E, f, _ = w1.shape
    arrays = {"gate_weight": ((E, h), ("fp32",)), "fc1_weight": ((E, f, h), (x.dtype,)),
              "fc1_bias": ((E, f), (x.dtype,)), "fc2_weight": ((E, h, f), (x.dtype,)),
              "fc2_bias": ((E, h), (x.dtype,)), "out": ((N, h), (x.dtype,))}
    given = dict(gate_weight=gate_weight, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
                 fc2_bias=fc2_bias, out=out)
    ptrs = {}
    for name, (shape, dtypes) in arrays.items():
        arr = DeviceArray.of(given[name], name)
        _expect(arr, name, shape, dtypes)
        ptrs[name] = arr.ptr
    res = None
    if residual is not None:
        res = DeviceArray.of(residual, "residual")
        _expect(res, "residual", (N, h), (x.dtype,))
    if top_k not in (1, 2) or top_k > E:
        raise KernelError(f"top_k must be 1 or 2 and <= experts ({E}), got {top_k}")
    ws = DeviceArray.of(workspace, "workspace")
    need = moe_workspace_size(N, h, f, E, top_k, x.dtype)
    nbytes = _nbytes(ws)
    if nbytes < need:
        raise KernelError(f"workspace: {nbytes} bytes, moe needs {need}")
    return x, (ptrs["gate_weight"], ptrs["fc1_weight"], ptrs["fc1_bias"], ptrs["fc2_weight"], ptrs["fc2_bias"],
               res.ptr if res else None, ptrs["out"], N, h, f, E, top_k, _activation(activation), capacity_factor,
               min_capacity, DTYPE_CODES[x.dtype], ws.ptr, nbytes, stream)


def moe(hidden, gate_weight, fc1_weight, fc1_bias, fc2_weight, fc2_bias, out, workspace, top_k: int = 1,
        activation: str = "gelu_tanh", capacity_factor: float = 0.0, min_capacity: int = 4, residual=None,
        stream: int = 0, defer: bool = False):
    """The MoE plugin op (``specs.MOE``) on ``hidden [N, h]``; ``out = residual + moe(hidden)``."""
    x, args = _moe_args(hidden, gate_weight, fc1_weight, fc1_bias, fc2_weight, fc2_bias, out, workspace, top_k,
                        activation, capacity_factor, min_capacity, residual, stream)
    return _launch("moetrt_moe", (x.ptr,) + args, "moe", defer)


def add_layernorm_moe(x, delta, gamma, beta, sum_out, normed, gate_weight, fc1_weight, fc1_bias, fc2_weight,
                      fc2_bias, out, workspace, top_k: int = 1, activation: str = "gelu_tanh",
                      capacity_factor: float = 0.0, min_capacity: int = 4, residual=None, epsilon: float = 1e-5,
                      stream: int = 0, defer: bool = False):
    """``add_layernorm`` then ``moe`` on its ``normed`` output, the LayerNorm inside the MoE's gate kernel for one
    token (batch-1 decode; more tokens launch it separately): the same bits as the two calls, one launch fewer.
    ``sum_out`` and ``normed`` are written (``sum_out`` only with ``delta``) and must not overlap ``x`` or ``delta``
    (blocks write them while others still read those)."""
    a, d, s, g, b, n = _add_layernorm_io(x, delta, sum_out, gamma, beta, normed)
    h = a.shape[1]
    if h > _layernorm_max_hidden(a.dtype):
        raise KernelError(f"add_layernorm_moe: hidden {h} exceeds the LayerNorm kernel's 1024 vectors of 16 bytes")
    for written, wname in ((s, "sum_out"), (n, "normed")):
        for read, rname in ((a, "x"), (d, "delta")):
            if written is not None and read is not None and _overlap(written, read):
                raise KernelError(f"add_layernorm_moe: {wname} overlaps {rname}")
    _, args = _moe_args(normed, gate_weight, fc1_weight, fc1_bias, fc2_weight, fc2_bias, out, workspace, top_k,
                        activation, capacity_factor, min_capacity, residual, stream)
    return _launch("moetrt_add_layernorm_moe", (a.ptr, d.ptr if d else None, g.ptr, b.ptr, s.ptr if s else None,
                                                n.ptr, epsilon) + args, "add_layernorm_moe", defer)


def _nbytes(arr: DeviceArray) -> int:
    size = {"fp32": 4, "int32": 4, "fp16": 2, "bf16": 2}.get(arr.dtype, 1)
    n = size
    for s in arr.shape:
        n *= s
    return n


def gather_rows(src, rows, dst, stream: int = 0, defer: bool = False):
    """``dst[r] = src[rows[r]]`` for ``src [S, C]``, int32 ``rows [R]`` (clamped into range), ``dst [R, C]``."""
    a, r, d = DeviceArray.of(src, "src"), DeviceArray.of(rows, "rows"), DeviceArray.of(dst, "dst")
    if len(a.shape) != 2 or len(r.shape) != 1:
        raise KernelError(f"gather_rows: expected src [rows, cols] and rows [n], got {a.shape}, {r.shape}")
    _expect(a, "src", a.shape, _float_dtypes())
    _expect(r, "rows", r.shape, ("int32",))
    _expect(d, "dst", (r.shape[0], a.shape[1]), (a.dtype,))
    return _launch("moetrt_gather_rows", (a.ptr, r.ptr, d.ptr, r.shape[0], a.shape[1], a.shape[0],
                                          DTYPE_CODES[a.dtype], stream), "gather_rows", defer)


def sample(logits, out_tokens, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           step: int = 0, stream: int = 0, defer: bool = False, next_inputs=None, host_tokens: int = 0):
    """One token per row of ``logits [B, V]`` into int32 ``out_tokens [B]`` (greedy when temperature is 0).

    ``next_inputs``: the next decode step's ``(input_ids, position_ids, past_lengths)``, int32 device arrays of B
    rows: row b's token goes to ``input_ids[b]``, and its past length and position both become its past length
    + 1. ``host_tokens``: the address of B int32 of pinned host memory (``cudaMallocHost``) the tokens are also
    written to, readable once the kernel is done."""
    x, o = DeviceArray.of(logits, "logits"), DeviceArray.of(out_tokens, "out_tokens")
    if len(x.shape) != 2:
        raise KernelError(f"logits: expected [batch, vocab], got {x.shape}")
    _expect(x, "logits", x.shape, _float_dtypes())
    B = x.shape[0]
    _expect(o, "out_tokens", (B,), ("int32",))
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise KernelError(f"sample: need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, "
                          f"{top_k}, {top_p}")
    mask = (1 << 64) - 1
    args = (x.ptr, o.ptr, B, x.shape[1], temperature, top_k, top_p, seed & mask, step & mask, DTYPE_CODES[x.dtype])
    if next_inputs is None and not host_tokens:
        return _launch("moetrt_sample", args + (stream,), "sample", defer)
    nxt = [0, 0, 0]
    if next_inputs is not None:
        if len(next_inputs) != 3:
            raise KernelError("sample: next_inputs must be (input_ids, position_ids, past_lengths)")
        for k, (arr, name) in enumerate(zip(next_inputs, ("input_ids", "position_ids", "past_lengths"))):
            a = DeviceArray.of(arr, name)
            _expect(a, name, (B,), ("int32",))
            nxt[k] = a.ptr
    if host_tokens % 4:
        raise KernelError(f"host_tokens: address {host_tokens:#x} is not 4-byte aligned")
    return _launch("moetrt_sample_advance", args + tuple(nxt) + (host_tokens, stream), "sample", defer)


GEMV_MAX_ROWS = 32  # fp16/bf16 (tensor cores from 2 rows); fp32: GEMV_MAX_ROWS_FP32
GEMV_MAX_ROWS_FP32 = 8
LAYERNORM_GEMV_MAX_ROWS = 8


def gemv_max_rows(dtype: str) -> int:
    """The most rows of x ``gemv`` takes in this dtype."""
    return GEMV_MAX_ROWS_FP32 if dtype == "fp32" else GEMV_MAX_ROWS


def gemv(x, weight, bias, y, activation: str = "none", stream: int = 0, defer: bool = False):
    """``y = act(x @ weight.T + bias)`` for ``x [M, K]`` with M <= 32 (8 in fp32), ``weight [N, K]``, ``bias [N]``
    or None."""
    a, w, o, M, N, K = _gemv_io("gemv", x, weight, y)
    b = _gemv_bias(bias, N, a.dtype)
    return _launch("moetrt_gemv", (a.ptr, w.ptr, b.ptr if b else None, o.ptr, M, N, K, _activation(activation),
                                   DTYPE_CODES[a.dtype], stream), "gemv", defer)


def _gemv_io(what: str, x, weight, y) -> tuple[DeviceArray, DeviceArray, DeviceArray, int, int, int]:
    a, w, o = DeviceArray.of(x, "x"), DeviceArray.of(weight, "weight"), DeviceArray.of(y, "y")
    if len(a.shape) != 2 or len(w.shape) != 2:
        raise KernelError(f"{what}: expected x [M, K] and weight [N, K], got {a.shape}, {w.shape}")
    (M, K), (N, _) = a.shape, w.shape
    _expect(a, "x", (M, K), _float_dtypes())
    if not 1 <= M <= gemv_max_rows(a.dtype):
        raise KernelError(f"{what}: x has {M} rows; at most {gemv_max_rows(a.dtype)} in {a.dtype}")
    _expect(w, "weight", (N, K), (a.dtype,))
    _expect(o, "y", (M, N), (a.dtype,))
    if K % (4 if a.dtype == "fp32" else 8):
        raise KernelError(f"{what}: K = {K} must be a multiple of 16 bytes of {a.dtype}")
    return a, w, o, M, N, K


def _gemv_bias(bias, N: int, dtype: str) -> DeviceArray | None:
    if bias is None:
        return None
    b = DeviceArray.of(bias, "bias")
    _expect(b, "bias", (N,), (dtype,))
    return b


def gemv_residual(x, weight, bias, residual, y, activation: str = "none", stream: int = 0, defer: bool = False):
    """``gemv`` with the residual added last: ``y = residual + act(x @ weight.T + bias)``, the sum rounded as
    ``add_layernorm`` forms it from the separate GEMV's output (the same bits). ``y`` may be ``residual`` itself,
    and must not overlap ``x``."""
    a, w, o, M, N, K = _gemv_io("gemv_residual", x, weight, y)
    r = DeviceArray.of(residual, "residual")
    _expect(r, "residual", (M, N), (a.dtype,))
    if _overlap(o, a) or (_overlap(o, r) and o.ptr != r.ptr):
        raise KernelError("gemv_residual: y overlaps x, or residual without being it")
    b = _gemv_bias(bias, N, a.dtype)
    return _launch("moetrt_gemv_residual", (a.ptr, w.ptr, b.ptr if b else None, r.ptr, o.ptr, M, N, K,
                                            _activation(activation), DTYPE_CODES[a.dtype], stream), "gemv_residual",
                   defer)


def fold_layernorm(gamma, beta, weight, bias, folded, colsum, bias_out, stream: int = 0):
    """The inputs of ``gemv_folded`` for ``LayerNorm(., gamma, beta)`` followed by ``x @ weight.T + bias``, on the
    device (``weight [N, K]``, ``gamma``, ``beta [K]``, ``bias [N]`` or None, all of one dtype):
    ``folded = weight * gamma`` (that dtype, each product rounded once), ``colsum`` (fp32 ``[N]``: the sums of the
    rounded folded rows, so that ``mu * colsum`` cancels what the GEMV's products hold) and ``bias_out = bias +
    weight @ beta`` (fp32 ``[N]``). ``specs.fold_layernorm_reference`` is the float64 contract."""
    w = DeviceArray.of(weight, "weight")
    if len(w.shape) != 2:
        raise KernelError(f"fold_layernorm: weight must be [N, K], got shape {w.shape}")
    N, K = w.shape
    _expect(w, "weight", (N, K), _float_dtypes())
    g, b = DeviceArray.of(gamma, "gamma"), DeviceArray.of(beta, "beta")
    f = DeviceArray.of(folded, "folded")
    c, o = DeviceArray.of(colsum, "colsum"), DeviceArray.of(bias_out, "bias_out")
    for arr, name, shape in ((g, "gamma", (K,)), (b, "beta", (K,)), (f, "folded", (N, K))):
        _expect(arr, name, shape, (w.dtype,))
    for arr, name in ((c, "colsum"), (o, "bias_out")):
        _expect(arr, name, (N,), ("fp32",))
    bb = _gemv_bias(bias, N, w.dtype)
    if _overlap(f, w):
        raise KernelError("fold_layernorm: folded overlaps weight")
    return _launch("moetrt_fold_layernorm", (w.ptr, g.ptr, b.ptr, bb.ptr if bb else None, f.ptr, c.ptr, o.ptr, N, K,
                                             DTYPE_CODES[w.dtype], stream), "fold_layernorm", False)


def gemv_folded(x, weight, colsum, bias, y, activation: str = "none", epsilon: float = 1e-5, stream: int = 0,
                defer: bool = False):
    """The GEMV after a LayerNorm, run on its un-normalised input ``x`` with the LayerNorm's affine folded into
    the weights (``fold_layernorm``): ``y = act(r * (x @ weight.T - mu * colsum) + bias)``, ``mu`` and
    ``r = 1 / sqrt(var + epsilon)`` per row of ``x``. ``colsum`` and ``bias`` are fp32 ``[N]``."""
    a, w, o, M, N, K = _gemv_io("gemv_folded", x, weight, y)
    c, b = DeviceArray.of(colsum, "colsum"), DeviceArray.of(bias, "bias")
    _expect(c, "colsum", (N,), ("fp32",))
    _expect(b, "bias", (N,), ("fp32",))
    if _overlap(o, a):
        raise KernelError("gemv_folded: y overlaps x")
    return _launch("moetrt_gemv_folded", (a.ptr, w.ptr, c.ptr, b.ptr, o.ptr, M, N, K, float(epsilon),
                                          _activation(activation), DTYPE_CODES[a.dtype], stream), "gemv_folded", defer)


def add_layernorm_gemv_fits(rows: int, k: int, dtype: str) -> bool:
    """Whether add_layernorm_gemv takes these sizes (its normalised rows, gamma and beta in 44 KB of shared
    memory; k within the LayerNorm kernel's limit)."""
    size = 4 if dtype == "fp32" else 2
    return 1 <= rows <= LAYERNORM_GEMV_MAX_ROWS and k % (16 // size) == 0 and k <= _layernorm_max_hidden(dtype) \
        and (rows + 2) * k * size <= 44 << 10


def _overlap(a: DeviceArray, b: DeviceArray) -> bool:
    return a.ptr < b.ptr + _nbytes(b) and b.ptr < a.ptr + _nbytes(a)


def add_layernorm_gemv(x, delta, gamma, beta, sum_out, weight, bias, y, activation: str = "none",
                       epsilon: float = 1e-5, stream: int = 0, defer: bool = False):
    """``gemv`` over ``LayerNorm(x + delta)`` in one kernel: ``sum_out = x + delta`` (``delta``/``sum_out`` may be
    None), ``y = act(LayerNorm(sum_out) @ weight.T + bias)``; the normalised rows are not stored. ``y`` must not
    overlap ``x``, ``delta`` or ``sum_out``."""
    a, w, o = DeviceArray.of(x, "x"), DeviceArray.of(weight, "weight"), DeviceArray.of(y, "y")
    if len(a.shape) != 2 or len(w.shape) != 2:
        raise KernelError(f"add_layernorm_gemv: expected x [M, K] and weight [N, K], got {a.shape}, {w.shape}")
    (M, K), (N, _) = a.shape, w.shape
    _expect(a, "x", (M, K), _float_dtypes())
    if not add_layernorm_gemv_fits(M, K, a.dtype):
        raise KernelError(f"add_layernorm_gemv: x [{M}, {K}] of {a.dtype} does not fit (at most {LAYERNORM_GEMV_MAX_ROWS} rows, "
                          f"(rows + 2) * K elements in 44 KB, K a multiple of 16 bytes)")
    _expect(w, "weight", (N, K), (a.dtype,))
    _expect(o, "y", (M, N), (a.dtype,))
    d, s, g, bt = _add_layernorm_operands(a, delta, sum_out, gamma, beta)
    for arr, name in ((a, "x"), (d, "delta"), (s, "sum_out")):
        if arr is not None and _overlap(arr, o):
            raise KernelError(f"add_layernorm_gemv: y overlaps {name}")
    b = None
    if bias is not None:
        b = DeviceArray.of(bias, "bias")
        _expect(b, "bias", (N,), (a.dtype,))
    return _launch("moetrt_add_layernorm_gemv",
                   (a.ptr, d.ptr if d else None, g.ptr, bt.ptr, s.ptr if s else None, w.ptr, b.ptr if b else None,
                    o.ptr, M, N, K, epsilon, _activation(activation), DTYPE_CODES[a.dtype], stream),
                   "add_layernorm_gemv", defer)
