"""Tensor-parallel engines on several GPUs: one process per GPU, NCCL between them (nccl4py's bindings).

``TPRuntime`` (what ``Runtime(engine_dir, device="cuda")`` returns for an engine with tp > 1) does no CUDA
work itself: it starts one worker process per rank (``spawn``, each seeing only its GPU through
``CUDA_VISIBLE_DEVICES``), passes rank 0's NCCL unique id to all, and then forwards every call (``generate``,
``logits``, ``run``, ``measure``, ``tune``, ``close``) to every rank. The ranks run the same code on the same
inputs in lockstep: each AllReduce node of a rank's graph is an in-place ``ncclAllReduce`` on the step's
stream (captured in the decode CUDA graphs like any kernel), the LM head is replicated, so every rank holds
the same logits and samples the same tokens from the same seed; rank 0's results and streamed tokens are
returned.

Failure: every reply is awaited with a timeout, and the death of any worker is noticed at once; either
way all workers are killed and ``MoetrtError`` names the rank and the reason, so a dead rank never leaves
the others hanging in a collective.

Under ``mpirun`` (one process per rank, started by MPI) ``mpi_runtime()`` builds the same per-rank runtime
with the unique id broadcast through mpi4py.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from moetrt.engines.runtime import Closing
from moetrt.errors import MoetrtError

NCCL_TYPES = {"fp16": 6, "fp32": 7, "bf16": 9}  # ncclDataType_t
NCCL_SUM = 0


def nccl_bindings():
    try:
        from nccl.bindings import nccl
    except Exception as exc:
        raise MoetrtError(f"tensor-parallel engines need NCCL through nccl4py (`pip install nccl4py`): {exc}") from None
    return nccl


class Nccl:
    """One rank's NCCL communicator."""

    def __init__(self, unique_id: bytes, size: int, rank: int):
        nb = nccl_bindings()
        self.nb, self.size, self.rank = nb, size, rank
        self.comm = nb.comm_init_rank_scalable(int(size), int(rank), 1, bytearray(unique_id), 0)

    @staticmethod
    def unique_id() -> bytes:
        return bytes(nccl_bindings().get_unique_id())

    def all_reduce_launch(self, view, stream_ptr: int):
        """An in-place sum over the ranks of ``view`` (a device array), bound for replay."""
        count = int(np.prod(view.shape, dtype=np.int64))
        args = (view.ptr, view.ptr, count, NCCL_TYPES[view.dtype], NCCL_SUM, self.comm, stream_ptr)
        all_reduce = self.nb.all_reduce
        return lambda: all_reduce(*args)

    def abort(self) -> None:
        if self.comm:
            self.nb.comm_abort(self.comm)
            self.comm = 0

    def destroy(self) -> None:
        if self.comm:
            self.nb.comm_destroy(self.comm)
            self.comm = 0


def _worker(conn, engine_dir: str, rank: int, size: int, device: str, options: dict) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = device  # before any CUDA initialisation in this process
    runtime = comm = None
    try:
        from moetrt.engines.cuda_runtime import CudaRuntime
        from moetrt.engines.format import EngineManifest
        if rank == 0:
            conn.send(("uid", Nccl.unique_id()))
        kind, uid = conn.recv()
        comm = Nccl(uid, size, rank)
        runtime = CudaRuntime(engine_dir, EngineManifest.read(Path(engine_dir)), rank=rank, comm=comm, **options)
        conn.send(("ready", None))
        while True:
            method, args, kwargs = conn.recv()
            if method == "close":
                break
            if method == "_exit":  # tests: a rank that dies
                os._exit(3)
            if method == "generate" and kwargs.pop("stream", False) and rank == 0:
                kwargs["callback"] = lambda step, tokens: conn.send(("token", (step, tokens)))
            result = getattr(runtime, method)(*args, **kwargs)
            conn.send(("result", result if rank == 0 or method == "run" else None))
    except EOFError:
        pass
    except BaseException as exc:
        message = str(exc) if isinstance(exc, MoetrtError) else f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        try:
            conn.send(("error", message))
        except Exception:
            pass
    finally:
        if runtime is not None:
            runtime.close()
        if comm is not None:
            comm.destroy()
        conn.close()


class TPRuntime(Closing):
    """A tensor-parallel engine over ``tp`` local GPUs (one worker process each); the CudaRuntime API."""

    def __init__(self, engine_dir: str | Path, manifest, timeout: float = 300.0, **options):
        self.engine_dir, self.manifest, self.config = Path(engine_dir), manifest, manifest.config
        self.tp = manifest.tensor_parallel
        self.timeout = timeout
        self.closed = True
        from moetrt.engines.cuda import device_count
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        count = len(visible) if visible else device_count()
        if count < self.tp:
            raise MoetrtError(f"{engine_dir}: a tp={self.tp} engine needs {self.tp} GPUs; {count} visible")
        devices = visible[:self.tp] if visible else [str(i) for i in range(self.tp)]
        ctx = multiprocessing.get_context("spawn")
        self.procs, self.conns = [], []
        for rank in range(self.tp):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, str(engine_dir), rank, self.tp, devices[rank], options),
                            name=f"moetrt-rank{rank}", daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        try:
            kind, uid = self._recv(0, "uid")
            for conn in self.conns:
                conn.send(("uid", uid))
            for rank in range(self.tp):
                self._recv(rank, "ready")
        except BaseException:
            self._kill()
            raise
        self.closed = False
        self.cache_dtype = manifest.cache_numpy_dtype

    # -- plumbing -------------------------------------------------------------------------------------------
    def _kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=10)
        self.closed = True

    def _fail(self, message: str):
        self._kill()
        raise MoetrtError(message)

    def _recv(self, rank: int, expect: str, on_token=None):
        """The next reply of ``rank`` (forwarding streamed tokens), or an error if any rank dies or the
        reply takes longer than the timeout."""
        conn = self.conns[rank]
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        while True:
            ready = wait([conn, *sentinels], timeout=self.timeout)
            if not ready:
                self._fail(f"rank {rank} did not answer within {self.timeout:.0f} s; all ranks stopped")
            if conn in ready:
                try:
                    kind, value = conn.recv()
                except EOFError:
                    self._fail(f"rank {rank} exited (code {self.procs[rank].exitcode}); all ranks stopped")
                if kind == "error":
                    self._fail(f"rank {rank}: {value}")
                if kind == "token" and on_token is not None:
                    on_token(*value)
                    continue
                if kind != expect:
                    self._fail(f"rank {rank}: expected {expect!r}, got {kind!r}")
                return kind, value
            dead = [sentinels[s] for s in ready if s in sentinels]
            if dead:
                r = dead[0]
                self.procs[r].join(timeout=1)
                self._fail(f"rank {r} exited (code {self.procs[r].exitcode}); all ranks stopped")

    def _call(self, method: str, *args, per_rank_args=None, on_token=None, **kwargs):
        if self.closed:
            raise MoetrtError("this runtime is closed")
        for rank, conn in enumerate(self.conns):
            call_args = per_rank_args[rank] if per_rank_args is not None else args
            try:
                conn.send((method, call_args, kwargs))
            except (BrokenPipeError, OSError):
                self._fail(f"rank {rank} is gone; all ranks stopped")
        results = [self._recv(r, "result", on_token if r == 0 else None)[1] for r in range(self.tp)]
        return results

    # -- the runtime API -------------------------------------------------------------------------------------
    def new_cache(self) -> list[np.ndarray]:
        return self.manifest.new_cache()

    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop_tokens=(), callback=None) -> list[list[int]]:
        return self._call("generate", prompts, max_new_tokens, temperature, top_k, top_p, seed, list(stop_tokens),
                          stream=callback is not None, on_token=callback)[0]

    def logits(self, input_ids) -> np.ndarray:
        return self._call("logits", np.asarray(input_ids))[0]

    def run(self, feeds: dict) -> dict:
        """One step on host feeds with whole-model caches: each rank gets its heads' slice."""
        per_rank = [dict(feeds) for _ in range(self.tp)]
        for name, value in feeds.items():
            if name.startswith("kv_cache_"):
                for r, part in enumerate(np.split(np.asarray(value), self.tp, axis=2)):
                    per_rank[r][name] = np.ascontiguousarray(part)
        outs = self._call("run", per_rank_args=[(f,) for f in per_rank])
        merged = dict(outs[0])
        for name in merged:
            if name.startswith("kv_cache_"):
                merged[name] = np.concatenate([o[name] for o in outs], axis=2)
        return merged

    def measure(self, prompts, output_len: int, reps: int = 5) -> dict:
        return self._call("measure", prompts, output_len, reps)[0]

    def tune(self, prefill_tokens=(128, 512), progress=None) -> dict:
        return self._call("tune", prefill_tokens)[0]

    def _kill_rank_for_test(self, rank: int) -> None:
        self.conns[rank].send(("_exit", (), {}))

    def close(self) -> None:
        if self.closed:
            return
        for conn in self.conns:
            try:
                conn.send(("close", (), {}))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=30)
        self._kill()


def mpi_runtime(engine_dir: str | Path, **options):
    """Under ``mpirun -n N``: this process's rank of a tp=N engine (MPI rank r uses local GPU r mod the GPUs
    it sees), its NCCL communicator set up with the unique id broadcast by mpi4py. Every rank must make the
    same calls; all return the same tokens."""
    from mpi4py import MPI
    from moetrt.engines.cuda_runtime import CudaRuntime
    from moetrt.engines.format import EngineManifest
    world = MPI.COMM_WORLD
    manifest = EngineManifest.read(Path(engine_dir))
    if world.size != manifest.tensor_parallel:
        raise MoetrtError(f"{engine_dir}: a tp={manifest.tensor_parallel} engine needs that many MPI ranks, "
                          f"got {world.size}")
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("MPI_LOCALRANKID", world.rank)))
    # one GPU per process, chosen before CUDA starts here (the kernel library keeps its own current device)
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[local % len(visible)] if visible else str(local)
    uid = world.bcast(Nccl.unique_id() if world.rank == 0 else None, root=0)
    comm = Nccl(uid, world.size, world.rank)
    return CudaRuntime(engine_dir, manifest, rank=world.rank, comm=comm, **options)
