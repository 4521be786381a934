"""``compile()``: checkpoint -> exported step graph -> lowering passes -> (sharding) -> engine directory."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import onnx

from moetrt.compiler.export import export_checkpoint
from moetrt.engines.format import EngineManifest, checkpoint_fingerprint
from moetrt.errors import MoetrtError
from moetrt.models.checkpoints import DTYPES, open_checkpoint
from moetrt.passes import PIPELINE, PassManager

log = logging.getLogger("moetrt.compile")


def shard_model(lowered: onnx.ModelProto, rank: int, tp: int) -> tuple[onnx.ModelProto, dict]:
    """Rank ``rank``'s graph, and the slices still to apply to its external weights (see ``write_rank``)."""
    import onnx_graphsurgeon as gs

    from moetrt.passes.shard import recorded_slices, shard_graph

    graph = shard_graph(gs.import_onnx(lowered), rank, tp)
    slices = recorded_slices(graph)
    model = gs.export_onnx(graph)
    model.opset_import.extend([i for i in lowered.opset_import if i.domain not in {o.domain for o in model.opset_import}])
    model.doc_string = lowered.doc_string
    return model, slices


def write_rank(model: onnx.ModelProto, src_dir: Path, dst_dir: Path, slices: dict | None = None) -> None:
    """Save ``model`` with every initializer moved, one at a time, into ``dst_dir/weights.bin``, applying
    ``slices`` (name -> (axis, rank, tp, zero)) to external weights as they are copied."""
    import numpy as np
    from onnx.external_data_helper import uses_external_data

    slices = slices or {}
    dst_dir.mkdir(parents=True, exist_ok=True)
    offset = 0
    with open(dst_dir / "weights.bin", "wb") as out:
        for tensor in model.graph.initializer:
            info = {e.key: e.value for e in tensor.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            if uses_external_data(tensor) and "location" in info and not tensor.raw_data:
                array = np.memmap(src_dir / info["location"], dtype=dtype, mode="r",
                                  offset=int(info.get("offset", 0)), shape=tuple(tensor.dims))
            else:  # inline (graphsurgeon may leave a stale external flag on tensors it rewrote)
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
                array = onnx.numpy_helper.to_array(tensor)
            if tensor.name in slices:  # this rank's part, cut from the unsharded weights as they are copied
                axis, rank, tp, zero = slices[tensor.name]
                array = np.split(array, tp, axis=axis)[rank]
                if zero:
                    array = np.zeros(array.shape, dtype)
                del tensor.dims[:]
                tensor.dims.extend(array.shape)
            data = np.ascontiguousarray(array).tobytes()
            del array
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "external_data"):
                tensor.ClearField(field)
            if len(data) < 1024:  # small tensors stay inline
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = data
                continue
            pad = (-offset) % 64
            out.write(b"\0" * pad)
            offset += pad
            out.write(data)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(len(data)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(data)
    onnx.save(model, str(dst_dir / "model.onnx"))


def compile(checkpoint: str | Path, out_dir: str | Path, tp: int = 1, dtype: str = "fp16", max_batch: int = 8,
            max_seq: int | None = None, logits: str = "all", dump_after: str | None = None, force: bool = False,
            progress: bool = False, tune: bool = False) -> Path:
    """Build the engine directory for ``checkpoint``; returns its path."""
    out_dir = Path(out_dir)
    if dtype == "bf16":
        raise MoetrtError("--dtype bf16: not supported yet (the exported graph's Einsum has no bfloat16 at ONNX "
                          "opset 17, and the CPU executors have no bf16 arithmetic); use fp16 or fp32")
    if dtype not in DTYPES:
        raise MoetrtError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if logits not in ("all", "last"):
        raise MoetrtError(f"--logits: expected 'all' or 'last', got {logits!r}")
    if max_batch < 1:
        raise MoetrtError(f"--max-batch must be >= 1, got {max_batch}")
    with open_checkpoint(checkpoint) as reader:
        config, fmt = reader.config, reader.format
    max_seq = max_seq or config.max_position_embeddings
    if not 1 <= max_seq <= config.max_position_embeddings:
        raise MoetrtError(f"--max-seq must be in 1..{config.max_position_embeddings} (the model's positions), got {max_seq}")
    if not isinstance(tp, int) or tp < 1 or config.num_heads % tp or config.ffn_hidden_size % tp:
        raise MoetrtError(f"--tp {tp}: must divide num_heads ({config.num_heads}) and ffn_hidden_size "
                          f"({config.ffn_hidden_size})")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise MoetrtError(f"{out_dir}: already exists and is not empty (use --force to replace it)")
        shutil.rmtree(out_dir)
    start = time.perf_counter()
    rank_dir = out_dir / ("rank0" if tp == 1 else "export")
    try:
        say = print if progress else log.info
        say(f"[1/3] exporting the step graph ({config.num_layers} layers, {dtype}, max batch {max_batch}, "
            f"max seq {max_seq})")
        exported = export_checkpoint(checkpoint, rank_dir, DTYPES[dtype], max_batch, max_seq,
                                     last_token_logits=logits == "last", progress=progress)
        say(f"[2/3] lowering: {', '.join(p.name for p in PIPELINE)}")
        manager = PassManager(PIPELINE, dump_after, out_dir / "dumps")
        lowered = manager.run(onnx.load(str(exported), load_external_data=False), base_dir=rank_dir)
        if tp == 1:
            onnx.save(lowered, str(exported))  # weights stay in rank0/weights.bin, referenced by name
        else:
            for rank in range(tp):
                say(f"      sharding rank {rank} of {tp}")
                model, slices = shard_model(lowered, rank, tp)
                write_rank(model, rank_dir, out_dir / f"rank{rank}", slices)
                del model
            shutil.rmtree(rank_dir)
        say("[3/3] checking that the CUDA backend runs every node; writing the manifest")
        from moetrt.engines.program import check_engine
        check_engine(out_dir, tp)
        EngineManifest(model=config.to_dict(), dtype=dtype, max_batch=max_batch, max_seq=max_seq,
                       tensor_parallel=tp, logits=logits,
                       checkpoint={"path": str(Path(checkpoint).resolve()), "format": fmt,
                                   "fingerprint": checkpoint_fingerprint(checkpoint)},
                       build_options={"passes": [p.name for p in PIPELINE], "opset": 17,
                                      "seconds": round(time.perf_counter() - start, 1)}).write(out_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    if tune:
        tune_engine(out_dir, progress)
    return out_dir


def tune_engine(engine_dir: str | Path, progress: bool = False) -> dict:
    """Time the GEMM algorithms of an engine on this machine's GPU and cache the fastest in the engine."""
    from moetrt.engines.runtime import Runtime
    say = print if progress else log.info
    with Runtime(engine_dir, device="cuda") as runtime:
        say(f"tuning cuBLASLt GEMMs on {runtime.engine.device.name}")
        entries = runtime.tune(progress=say)
    say(f"      {len(entries)} GEMM shapes tuned; kept in {Path(engine_dir) / 'rank0' / 'gemm_algos.json'}")
    return entries
