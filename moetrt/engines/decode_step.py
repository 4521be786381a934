"""The batch-1 decode step as one persistent kernel: a rank's ops up to the LM head as an instruction table.

``build(engine, shapes)`` turns the program's ops for a step of one token (B = T = 1) into the int64 instruction
rows that ``moetrt_decode_step`` runs (``csrc/decode_step.cu``, fields in ``moetrt_kernels.h`` and
``launch.STEP_FIELDS``), on the engine's own buffers, or says why it cannot (the engine then plans the usual
kernel-per-op launches). A LayerNorm whose normalised output feeds the next GEMV or MoE gate becomes that stage's
prologue, as the fused LayerNorm + GEMV does in ordinary plans; an MoE layer becomes three stages (gate, FC1, FC2).
"""

from __future__ import annotations

import math
import struct

import numpy as np

from moetrt.plugins import launch

_F = {name: i for i, name in enumerate(launch.STEP_FIELDS)}


class Unsupported(Exception):
    """The step has an op or a size the decode-step kernel does not take (the message says which)."""


def _row(**fields) -> np.ndarray:
    row = np.zeros(len(launch.STEP_FIELDS), np.int64)
    for name, value in fields.items():
        row[_F[name]] = int(value or 0)
    return row


def _eps_bits(eps: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(eps)))[0]


def workspace_bytes(engine) -> tuple[int, int]:
    """(bytes, offset of the attention split workspace) of the decode step's workspace for this engine: the MoE
    gate's logits (fp32) and hidden vectors (top_k x ffn), the attention's chunk partials and per-head counters."""
    p = engine.program
    logits = hid = 0
    for op in p.ops:
        if op.kind == "moe":
            E, f, _ = p.initializers[op.inputs[2]].shape
            logits = max(logits, 4 * E)
            hid = max(hid, 2 * op.attrs["top_k"] * f)
    attn = 0
    for op in p.ops:
        if op.kind == "attention":
            _, _, H, S, D = engine.cache_shapes[op.inputs[1]]
            attn = max(attn, 4 * H * math.ceil(S / 64) * (D + 2) + 4 * H)
    off = (logits + 255) // 256 * 256 + (hid + 255) // 256 * 256
    return off + attn, off


def build(engine, shapes: dict) -> np.ndarray:
    """The instruction table of a one-token step (raises ``Unsupported``)."""
    p = engine.program
    dtype = engine.dtype
    if dtype not in ("fp16", "bf16"):
        raise Unsupported(f"activations are {dtype}; the decode-step kernel takes fp16 or bf16")
    if engine.device.arch < 90:
        raise Unsupported(f"sm_{engine.device.arch}: the decode-step kernel needs sm_90 (bulk copies)")
    itemsize = 2
    grid = launch.decode_step_grid()
    ws = engine.step_ws.ptr
    _, attn_off = workspace_bytes(engine)
    logits_ptr = ws
    hid_ptr = ws + (max((4 * p.initializers[op.inputs[2]].shape[0] for op in p.ops if op.kind == "moe"), default=0)
                    + 255) // 256 * 256
    head_index = p.ops.index(engine.head)
    if any(op.kind not in ("alias", "select") for op in p.ops[head_index + 1:]):
        raise Unsupported("ops follow the LM head")

    def view(name, shape=()):
        return engine._view(name, shape).ptr

    # LayerNorms absorbed by the stage after them: a GEMV reading the normalised tensor (as plan() pairs them; the
    # buffer planner keeps the LayerNorm's inputs alive through that GEMV), or an MoE gate (its inputs are read in
    # the gate stage, before any MoE output is written)
    fused = dict(engine._layernorm_gemm_pairs()) if engine.fuse_layernorm else {}
    readers: dict[str, list[int]] = {}
    for i, op in enumerate(p.ops):
        if op.kind not in ("alias", "select"):
            for t in op.inputs:
                if t:
                    readers.setdefault(engine.resolve(t), []).append(i)
    for i, op in enumerate(p.ops):
        if op.kind in ("add_layernorm", "embed_ln") and i not in fused:
            r = readers.get(engine.resolve(op.outputs[1]), [])
            if len(r) == 1 and p.ops[r[0]].kind == "moe" and \
                    engine.resolve(p.ops[r[0]].inputs[0]) == engine.resolve(op.outputs[1]) and \
                    all(p.ops[k].kind in ("alias", "select") for k in range(i + 1, r[0])):
                fused[i] = r[0]
    pending: dict[int, dict] = {}  # stage op index -> its LayerNorm prologue fields
    rows: list[np.ndarray] = []

    def check_stage(name: str, N: int, K: int, kk: int = 1, x_elems: int | None = None) -> None:
        if K % 8:
            raise Unsupported(f"node {name!r}: K = {K} is not a multiple of 8")
        if math.ceil(N / grid) * kk > launch.STEP_MAX_RESULTS:
            raise Unsupported(f"node {name!r}: {N} outputs over {grid} blocks exceed the kernel's "
                              f"{launch.STEP_MAX_RESULTS} per block")
        if (x_elems or K) * itemsize > launch.STEP_X_BYTES:
            raise Unsupported(f"node {name!r}: an input of {x_elems or K} elements exceeds the kernel's "
                              f"{launch.STEP_X_BYTES} bytes")

    for index, op in enumerate(p.ops[:head_index]):
        ins, outs = op.inputs, op.outputs
        if op.kind in ("alias", "select"):
            continue
        if op.kind == "all_reduce":
            if op.attrs.get("tp_size", 1) > 1:
                raise Unsupported(f"node {op.node!r}: all-reduce over {op.attrs['tp_size']} ranks")
            continue
        if op.kind in ("add_layernorm", "embed_ln"):
            if op.kind == "embed_ln":
                ids, pos, wte, wpe, gamma, beta = ins
                vocab, h = p.initializers[wte].shape
                ln = dict(ln_kind=launch.STEP_LN["embed"], ids=view(ids), pos=view(pos), wte=view(wte),
                          wpe=view(wpe), vocab=vocab, max_pos=p.initializers[wpe].shape[0], ln_sum=view(outs[0]))
            else:
                x, delta, gamma, beta = ins
                h = shapes[x][-1]
                ln = dict(ln_kind=launch.STEP_LN["add" if delta else "plain"], ln_x=view(x),
                          ln_delta=view(delta) if delta else 0, ln_sum=view(outs[0]) if delta else 0)
            ln.update(ln_gamma=view(gamma), ln_beta=view(beta), eps=_eps_bits(op.attrs["epsilon"]))
            if h % 8 or h * itemsize > launch.STEP_X_BYTES:
                raise Unsupported(f"node {op.node!r}: hidden size {h}")
            if index in fused:
                pending[fused[index]] = ln
            else:
                rows.append(_row(op=launch.STEP_OPS["layernorm"], ln_normed=view(outs[1]), k=h, **ln))
            continue
        ln = pending.pop(index, {})
        if op.kind == "gemm":
            x, w, bias = ins
            K, N = op.attrs["K"], op.attrs["N"]
            if not op.attrs["trans"]:
                raise Unsupported(f"node {op.node!r}: weight not stored [N, K]")
            check_stage(op.node, N, K)
            act = launch.ACTIVATION_CODES[op.attrs.get("act") or "none"]
            rows.append(_row(op=launch.STEP_OPS["gemv"], x=0 if ln else view(x), w=view(w),
                             bias=view(bias) if bias else 0, y=view(outs[0]), n=N, k=K, act=act, **ln))
        elif op.kind == "attention":
            qkv, cache, past = ins
            _, max_batch, H, S, D = engine.cache_shapes[cache]
            if D not in launch.STEP_HEAD_DIMS:
                raise Unsupported(f"node {op.node!r}: head_dim {D} (the kernel takes {launch.STEP_HEAD_DIMS})")
            base = engine.caches[engine.resolve(cache)].ptr
            rows.append(_row(op=launch.STEP_OPS["attention"], x=view(qkv), w=base,
                             bias=base + max_batch * H * S * D * itemsize, y=view(outs[0]), past=view(past),
                             heads=H, head_dim=D, max_seq=S, ws=ws + attn_off,
                             counters=ws + attn_off + 4 * H * math.ceil(S / 64) * (D + 2),
                             max_splits=math.ceil(S / 64)))
        elif op.kind == "moe":
            x, gate, w1, b1, w2, b2 = ins
            E, f, h = p.initializers[w1].shape
            k = op.attrs["top_k"]
            if k not in (1, 2) or E > 256 or engine.weight_views[gate].dtype != "fp32":
                raise Unsupported(f"node {op.node!r}: top_k {k}, {E} experts (at most 256), gate weights "
                                  f"{engine.weight_views[gate].dtype}")
            if h % 8 or f % 8:
                raise Unsupported(f"node {op.node!r}: hidden {h} / ffn {f} not multiples of 8")
            check_stage(op.node, E, h)
            check_stage(op.node, f, h, k)
            check_stage(op.node, h, f, k, k * f)
            act = launch.ACTIVATION_CODES[op.attrs["activation"]]
            route = dict(logits=logits_ptr, experts=E, top_k=k)
            normed = view(x)
            rows.append(_row(op=launch.STEP_OPS["gate"], x=0 if ln else normed, w=view(gate), y=logits_ptr, n=E,
                             k=h, **({**ln, "ln_normed": normed} if ln else {})))
            rows.append(_row(op=launch.STEP_OPS["fc1"], x=normed, w=view(w1), bias=view(b1), y=hid_ptr, n=f, k=h,
                             act=act, **route))
            rows.append(_row(op=launch.STEP_OPS["fc2"], x=hid_ptr, w=view(w2), bias=view(b2), y=view(outs[0]), n=h,
                             k=f, **route))
        else:
            raise Unsupported(f"node {op.node!r}: {op.kind} has no decode-step stage")
    if pending:
        raise Unsupported(f"LayerNorms left without a stage: {sorted(pending)}")
    if not rows:
        raise Unsupported("no ops before the LM head")
    return np.stack(rows)
