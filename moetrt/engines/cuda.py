"""The little of the CUDA runtime the GPU backend needs, through cuda-python (``cuda.bindings.runtime``):
device memory, pinned host memory, a stream, events and CUDA graphs. Every call is checked and a failure
raises ``CudaError`` naming the call. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetrt.errors import MoetrtError

TYPESTRS = {"fp32": "<f4", "fp16": "<f2", "bf16": "<V2", "int32": "<i4", "uint8": "|u1"}
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "int32": 4, "uint8": 1}


class CudaError(MoetrtError):
    """A CUDA call failed, or no usable GPU is present."""


def runtime_api():
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise CudaError(f"the GPU runtime needs cuda-python (`pip install cuda-bindings`): {exc}") from None
    return runtime


def call(fn, *args, what: str | None = None):
    """Call a cuda-python runtime function; raise on error; return its result (None, one value or a tuple)."""
    rt = runtime_api()
    result = fn(*args)
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        raise CudaError(f"{what or fn.__name__}: {name.decode()} ({text.decode()})")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def device_count() -> int:
    rt = runtime_api()
    err, n = rt.cudaGetDeviceCount()
    return int(n) if err == rt.cudaError_t.cudaSuccess else 0


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    arch: int               # e.g. 90 for sm_90
    total_memory: int
    sm_count: int


def device_info(index: int = 0) -> DeviceInfo:
    rt = runtime_api()
    if device_count() <= index:
        raise CudaError(f"no CUDA device {index} (found {device_count()}); use device='cpu'")
    props = call(rt.cudaGetDeviceProperties, index)
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(index, name.rstrip("\x00"), props.major * 10 + props.minor, int(props.totalGlobalMem),
                      int(props.multiProcessorCount))


def mem_get_info() -> tuple[int, int]:
    """(free, total) bytes of the current device."""
    free, total = call(runtime_api().cudaMemGetInfo)
    return int(free), int(total)


class DeviceBuffer:
    """An owned device allocation; ``view`` gives typed windows onto it."""

    def __init__(self, nbytes: int, what: str = "buffer"):
        self.nbytes = max(int(nbytes), 1)
        self.what = what
        self.ptr = 0
        self.ptr = int(call(runtime_api().cudaMalloc, self.nbytes,
                            what=f"cudaMalloc({self.nbytes / 2**20:.1f} MiB for {what})"))

    def view(self, shape, dtype: str, offset: int = 0) -> "View":
        view = View(self.ptr + offset, tuple(int(s) for s in shape), dtype)
        if offset + view.nbytes > self.nbytes:
            raise CudaError(f"{self.what}: a view of {view.nbytes} bytes at {offset} overruns {self.nbytes} bytes")
        return view

    def free(self) -> None:
        if self.ptr:
            runtime_api().cudaFree(self.ptr)
            self.ptr = 0


@dataclass(frozen=True)
class View:
    """A typed window onto device memory; exposes ``__cuda_array_interface__`` for the kernel launchers."""
    ptr: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": TYPESTRS[self.dtype], "data": (self.ptr, False), "version": 3,
                "strides": None}

    def reshape(self, *shape) -> "View":
        shape = [int(s) for s in (shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)]
        total = int(np.prod(self.shape, dtype=np.int64))
        if shape.count(-1) == 1:
            known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
            shape[shape.index(-1)] = total // known if known else 0
        shape = tuple(shape)
        if int(np.prod(shape, dtype=np.int64)) != total:
            raise CudaError(f"cannot view {self.shape} as {shape}")
        return View(self.ptr, shape, self.dtype)


class PinnedBuffer:
    """Page-locked host memory (fast, asynchronous copies), seen as a numpy byte array."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(call(runtime_api().cudaMallocHost, self.nbytes, what="cudaMallocHost"))
        import ctypes
        self.array = np.frombuffer((ctypes.c_uint8 * self.nbytes).from_address(self.ptr), np.uint8)

    def free(self) -> None:
        if self.ptr:
            self.array = None
            runtime_api().cudaFreeHost(self.ptr)
            self.ptr = 0


class Stream:
    def __init__(self):
        rt = runtime_api()
        self.handle = call(rt.cudaStreamCreateWithFlags, rt.cudaStreamNonBlocking, what="cudaStreamCreate")
        self.ptr = int(self.handle)

    def synchronize(self) -> None:
        call(runtime_api().cudaStreamSynchronize, self.handle, what="cudaStreamSynchronize")

    def copy_to_device(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        rt = runtime_api()
        call(rt.cudaMemcpyAsync, dst_ptr, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle,
             what="cudaMemcpyAsync(host to device)")

    def copy_to_host(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        rt = runtime_api()
        call(rt.cudaMemcpyAsync, dst_ptr, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle,
             what="cudaMemcpyAsync(device to host)")

    def copy_on_device(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        rt = runtime_api()
        call(rt.cudaMemcpyAsync, dst_ptr, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.handle,
             what="cudaMemcpyAsync(device to device)")

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        call(runtime_api().cudaMemsetAsync, ptr, value, nbytes, self.handle, what="cudaMemsetAsync")

    def destroy(self) -> None:
        if self.handle is not None:
            runtime_api().cudaStreamDestroy(self.handle)
            self.handle = None


class Graph:
    """A CUDA graph captured from ``fn()`` on ``stream``, replayed with ``launch()``."""

    def __init__(self, stream: Stream, fn):
        rt = runtime_api()
        call(rt.cudaStreamBeginCapture, stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal,
             what="cudaStreamBeginCapture")
        try:
            fn()
        finally:
            graph = call(rt.cudaStreamEndCapture, stream.handle, what="cudaStreamEndCapture")
        self.graph = graph
        self.exec = call(rt.cudaGraphInstantiate, graph, 0, what="cudaGraphInstantiate")
        self.stream = stream

    def launch(self) -> None:
        call(runtime_api().cudaGraphLaunch, self.exec, self.stream.handle, what="cudaGraphLaunch")

    def destroy(self) -> None:
        rt = runtime_api()
        if self.exec is not None:
            rt.cudaGraphExecDestroy(self.exec)
            rt.cudaGraphDestroy(self.graph)
            self.exec = self.graph = None


class Event:
    def __init__(self):
        self.handle = call(runtime_api().cudaEventCreate, what="cudaEventCreate")

    def record(self, stream: Stream) -> None:
        call(runtime_api().cudaEventRecord, self.handle, stream.handle, what="cudaEventRecord")

    def synchronize(self) -> None:
        call(runtime_api().cudaEventSynchronize, self.handle, what="cudaEventSynchronize")

    def elapsed_ms(self, start: "Event") -> float:
        call(runtime_api().cudaEventSynchronize, self.handle, what="cudaEventSynchronize")
        return float(call(runtime_api().cudaEventElapsedTime, start.handle, self.handle, what="cudaEventElapsedTime"))

    def destroy(self) -> None:
        if self.handle is not None:
            runtime_api().cudaEventDestroy(self.handle)
            self.handle = None


def elapsed_ms(stream: Stream, fn, calls: int) -> float:
    """GPU milliseconds of ``calls`` back-to-back calls of ``fn()`` enqueueing work on ``stream``, between two
    events, after one untimed call."""
    start, stop = Event(), Event()
    try:
        fn()
        start.record(stream)
        for _ in range(calls):
            fn()
        stop.record(stream)
        return stop.elapsed_ms(start)
    finally:
        start.destroy()
        stop.destroy()
