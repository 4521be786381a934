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


def embedding(input_ids, position_ids, wte, wpe, out, stream: int = 0) -> None:
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
    lib = load_library()
    fn = lib.moetrt_embedding
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_void_p]
    check(fn(ids.ptr, pos.ptr, w.ptr, p.ptr, o.ptr, n, hidden, vocab, p.shape[0], DTYPE_CODES[w.dtype], stream),
          "embedding")
