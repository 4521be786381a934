"""The ``moetrt`` command line: a thin layer over the public API, one function per subcommand."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from moetrt.errors import MoetrtError


def _add_dtype(p: argparse.ArgumentParser, default: str | None, choices=("fp16", "fp32")) -> None:
    p.add_argument("--dtype", choices=choices, default=default,
                   help="storage dtype of the weights" + (f" (default {default})" if default else " (default: keep)"))


def cmd_init_checkpoint(args) -> int:
    from moetrt.models import get_preset
    from moetrt.models.checkpoints import init_checkpoint, parse_dtype

    config = get_preset(args.preset)
    if args.layers is not None:
        if not 1 <= args.layers <= config.num_layers:
            raise MoetrtError(f"--layers must be between 1 and {config.num_layers} (the layers of preset "
                              f"{args.preset!r}), got {args.layers}")
        moe_layers = tuple(i for i in config.moe_layers if i < args.layers)
        config = config.replace(num_layers=args.layers, moe_layers=moe_layers,
                                num_experts=config.num_experts if moe_layers else 0)
    start = time.perf_counter()
    out = init_checkpoint(args.out, config, args.format, parse_dtype(args.dtype), args.tp, args.seed,
                          progress=not args.quiet, force=args.force)
    layers = "" if args.layers is None else f", its first {args.layers} layer{'s' if args.layers > 1 else ''}"
    print(f"wrote {args.format} checkpoint of preset {args.preset!r}{layers} ({args.dtype}, tp={args.tp}) to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_convert(args) -> int:
    from moetrt.models.checkpoints import convert, parse_dtype

    start = time.perf_counter()
    out = convert(args.src, args.dst, args.to, args.tp, parse_dtype(args.dtype) if args.dtype else None,
                  progress=not args.quiet, force=args.force)
    print(f"converted {args.src} to {args.to} at {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def cmd_inspect(args) -> int:
    from moetrt.models.checkpoints import DTYPE_NAMES, open_checkpoint

    with open_checkpoint(args.checkpoint) as reader:
        config = reader.config
        counts = config.parameter_counts()
        itemsize = reader.dtype.itemsize
        gate = config.num_experts * config.hidden_size * len(config.moe_layers)
        info = {
            "path": str(reader.path), "format": reader.format, "dtype": DTYPE_NAMES.get(reader.dtype),
            "tensor_parallel": reader.tensor_parallel, "config": config.to_dict(),
            "parameters_total": counts["total"], "parameters_active_per_token": counts["active"],
            "bytes": (counts["total"] - gate) * itemsize + gate * 4,
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: {info['format']} checkpoint, {info['dtype']}, tensor-parallel {info['tensor_parallel']}")
    for key, value in info["config"].items():
        print(f"  {key:26s} {value}")
    print(f"  {'parameters (total)':26s} {counts['total']:,}")
    print(f"  {'parameters (active/token)':26s} {counts['active']:,}")
    print(f"  {'weight bytes':26s} {info['bytes']:,} ({_human_bytes(info['bytes'])})")
    return 0


def cmd_demo(args) -> int:
    """The whole path that exists so far on the built-in tiny preset."""
    import numpy as np
    import torch

    from moetrt.compiler.pipeline import compile
    from moetrt.compiler.validate import validate
    from moetrt.engines.runtime import Runtime
    from moetrt.models import SamplingParams, get_preset, load
    from moetrt.models.checkpoints import FORMATS, init_checkpoint

    config = get_preset("tiny")
    with tempfile.TemporaryDirectory(prefix="moetrt-demo-") as tmp:
        work = Path(args.workdir or tmp)
        print(f"[1/5] writing the tiny preset in every checkpoint format under {work}")
        for fmt in FORMATS:
            init_checkpoint(work / fmt, config, fmt, torch.float32, tp=2 if fmt == "fastertransformer" else 1,
                            seed=args.seed, force=True)
        print("[2/5] loading each and comparing logits of a random prompt (torch reference model)")
        prompt = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(args.seed))
        models = {fmt: load(work / fmt) for fmt in FORMATS}
        ref = models[FORMATS[0]](prompt)
        for fmt, model in models.items():
            diff = (model(prompt) - ref).abs().max().item()
            print(f"      {fmt:20s} max |logits - {FORMATS[0]}| = {diff:.3g}")
            if diff != 0.0:
                raise MoetrtError(f"demo: {fmt} checkpoint gives different logits ({diff:.3g})")
        print("[3/5] compiling the Megatron-DeepSpeed checkpoint (export, fold, fuse LayerNorm/attention/MoE)")
        engine = compile(work / FORMATS[0], work / "engine", dtype="fp32", max_batch=2, max_seq=64, force=True)
        print("[4/5] validating the engine against ONNX Runtime on the exported graph (polygraphy)")
        if not validate(engine, verbose=False):
            raise MoetrtError("demo: the engine does not match the exported graph")
        from moetrt.engines.runtime import gpu_available
        device = "cuda" if gpu_available() else "cpu"
        where = "GPU runtime: our CUDA kernels, cuBLASLt, CUDA graphs" if device == "cuda" else \
            "CPU reference runtime: no GPU here"
        if device == "cuda":
            print("      and against the GPU runtime")
            if not validate(engine, verbose=False, device="cuda"):
                raise MoetrtError("demo: the GPU runtime does not match the exported graph")
        print(f"[5/5] generating {args.max_new_tokens} tokens greedily with the engine ({where})")
        with Runtime(engine, device=device) as runtime:
            out = runtime.generate([prompt[0].tolist()], args.max_new_tokens)
            want = models[FORMATS[0]].generate([prompt[0].tolist()], args.max_new_tokens, SamplingParams())
            print(f"      prompt ids:    {prompt[0].tolist()}")
            print(f"      generated ids: {out[0]}")
            if out != want:
                raise MoetrtError(f"demo: engine tokens {out[0]} differ from the torch model's {want[0]}")
            print("      identical to the torch reference model's greedy tokens")
            logits_diff = float(np.abs(runtime.logits(prompt.numpy()) - ref.numpy()).max())
            print(f"      engine logits vs torch: max abs difference {logits_diff:.2e}")
    print(f"demo: ok (the engine ran on the {where.split(':')[0]})")
    return 0


def cmd_compile(args) -> int:
    from moetrt.compiler.pipeline import compile

    start = time.perf_counter()
    from moetrt.engines.runtime import gpu_available
    tokenizer = Path(args.tokenizer) if args.tokenizer else Path(args.checkpoint) / "tokenizer.json"
    if args.tokenizer:  # checked before the (long) compile
        _load_tokenizer(tokenizer)
    tune = not args.no_tune and args.tp == 1 and gpu_available()
    out = compile(args.checkpoint, args.output, tp=args.tp, dtype=args.dtype, max_batch=args.max_batch,
                  max_seq=args.max_seq, logits=args.logits, dump_after=args.dump_after, force=args.force,
                  progress=not args.quiet, tune=tune)
    if tokenizer.is_file():  # generate --prompt finds it in the engine
        shutil.copyfile(tokenizer, Path(out) / "tokenizer.json")
        print(f"      tokenizer: {tokenizer} copied to {Path(out) / 'tokenizer.json'}")
    print(f"compiled {args.checkpoint} to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_tune(args) -> int:
    from moetrt.compiler.pipeline import tune_engine
    tune_engine(args.engine, progress=True)
    return 0


def cmd_validate(args) -> int:
    from moetrt.compiler.validate import validate

    ok = validate(args.engine, args.checkpoint, steps=args.steps, rtol=args.rtol, atol=args.atol, device=args.device)
    print(f"validate: {'PASSED' if ok else 'FAILED'}: {args.engine} ({args.device} runtime) against ONNX Runtime on "
          "its exported graph")
    return 0 if ok else 1


def _id_list(text: str, option: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise MoetrtError(f"{option}: expected comma-separated token ids, got {text!r}") from None


def _load_tokenizer(path: Path):
    if not path.is_file():
        raise MoetrtError(f"{path}: no such tokenizer file")
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise MoetrtError(f"{path}: not a tokenizers JSON file: {exc}") from None


def _tokenizer(args):
    path = Path(args.tokenizer) if args.tokenizer else Path(args.engine) / "tokenizer.json"
    if not path.is_file():
        raise MoetrtError(f"--prompt needs a tokenizer: {path} not found (pass --tokenizer tokenizer.json, a "
                          "Hugging Face tokenizers file, compile with --tokenizer, or give --prompt-ids)")
    return _load_tokenizer(path)


def cmd_generate(args) -> int:
    from moetrt.engines.runtime import Runtime

    tok = None
    if args.prompt is not None:
        tok = _tokenizer(args)
        prompt = tok.encode(args.prompt).ids
        if not prompt:
            raise MoetrtError("--prompt encodes to no tokens")
    else:
        prompt = _id_list(args.prompt_ids, "--prompt-ids")
    if args.max_new_tokens < 1:
        raise MoetrtError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    with Runtime(args.engine, device=args.device) as runtime:
        if runtime.config.vocab_size and tok is not None and tok.get_vocab_size() > runtime.config.vocab_size:
            raise MoetrtError(f"the tokenizer has {tok.get_vocab_size()} tokens; the model {runtime.config.vocab_size}")
        generated = []

        def stream(step, tokens):
            if tokens[0] is None:
                return
            generated.append(tokens[0])
            if tok is None:
                print(tokens[0], end=" ", flush=True)
            else:  # the text the new token adds to the whole sequence (spacing depends on what precedes)
                before = tok.decode(prompt + generated[:-1])
                print(tok.decode(prompt + generated)[len(before):], end="", flush=True)

        if tok is not None:
            print(args.prompt, end="", flush=True)
        runtime.generate([prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, stop_tokens=_id_list(args.stop_ids or "", "--stop-ids"),
                         callback=stream)
    print()
    return 0


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise MoetrtError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise MoetrtError(f"{option}: empty")
    return values


def cmd_bench(args) -> int:
    if args.target == "kernels":
        from moetrt.plugins import bench
        bench.run(args.output)
        return 0
    if not (Path(args.target) / "engine.json").is_file():
        raise MoetrtError(f"bench: {args.target!r} is neither 'kernels' nor an engine directory (no engine.json)")
    from moetrt.compiler import bench_engine
    bench_engine.run(args.target, _int_list(args.batch, "--batch"), args.input_len, args.output_len,
                     checkpoint=args.checkpoint, output=args.output, plot=args.plot, eager=not args.no_eager)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from moetrt.models.checkpoints import FORMATS
    from moetrt.models.config import PRESETS

    parser = argparse.ArgumentParser(
        prog="moetrt", description="Compile GPT-style Mixture-of-Experts checkpoints into fast inference engines.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init-checkpoint", help="write a checkpoint of random weights for a preset",
                       description="Write a checkpoint of random (non-degenerate) weights for a preset model.")
    p.add_argument("out", help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model shape")
    p.add_argument("--format", default="moetrt", choices=FORMATS, help="checkpoint format (default moetrt)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel split (fastertransformer only; default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--layers", type=int, help="keep only the preset's first N layers (the same layer shapes, "
                                              "for quick experiments; default: all)")
    _add_dtype(p, "fp16")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_init_checkpoint)

    p = sub.add_parser("convert", help="re-write a checkpoint in another format",
                       description="Convert a checkpoint (format detected) to another format, tensor by tensor.")
    p.add_argument("src", help="source checkpoint folder")
    p.add_argument("dst", help="destination folder")
    p.add_argument("--to", required=True, choices=FORMATS, help="destination format")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel split (fastertransformer only; default 1)")
    _add_dtype(p, None)
    p.add_argument("--force", action="store_true", help="replace an existing destination folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="show a checkpoint's configuration and size",
                       description="Show a checkpoint's format, configuration, parameter counts and bytes.")
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in tiny model",
                       description="Run every stage that exists on the built-in tiny preset and check them.")
    p.add_argument("--workdir", help="keep the files here instead of a temporary folder")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compile", help="compile a checkpoint into an engine directory",
                       description="Export the checkpoint's step graph to ONNX, lower it with the graph passes "
                                   "and write the engine directory (engine.json + rank0/model.onnx + weights).")
    p.add_argument("checkpoint", help="checkpoint folder (any supported format)")
    p.add_argument("-o", "--output", required=True, help="engine directory to write")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size: must divide heads and ffn (default 1)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="engine dtype (default fp16)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the KV cache holds (default 8)")
    p.add_argument("--max-seq", type=int, default=None, help="longest sequence (default: the model's positions)")
    p.add_argument("--logits", choices=("all", "last"), default="all",
                   help="logits of every position, or of each sequence's last token (default all)")
    p.add_argument("--dump-after", metavar="PASS", help="also save the graph after this pass (under OUTPUT/dumps)")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer.json to keep in the engine for generate --prompt "
                                        "(default: CHECKPOINT/tokenizer.json when present)")
    p.add_argument("--no-tune", action="store_true",
                   help="skip timing cuBLASLt's GEMM algorithms on this machine's GPU (done by default when a GPU "
                        "is present; `moetrt tune ENGINE` does it later)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("tune", help="time cuBLASLt's GEMM algorithms for an engine on this GPU",
                       description="Time cuBLASLt's candidate algorithms for every GEMM shape of the engine's decode "
                                   "batch buckets and typical prefills on this machine's GPU, and keep the fastest in "
                                   "ENGINE/rank0/gemm_algos.json (keyed by GPU and cuBLASLt version).")
    p.add_argument("engine", help="engine directory")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("validate", help="compare an engine with ONNX Runtime on the exported graph",
                       description="polygraphy Comparator: ONNX Runtime on the un-lowered exported graph vs the "
                                   "engine (on the CPU reference executor or the GPU runtime), over a prefill and "
                                   "decode steps. Exit 1 on mismatch.")
    p.add_argument("engine", help="engine directory")
    p.add_argument("--checkpoint", help="the checkpoint it was compiled from (default: the path in engine.json)")
    p.add_argument("--steps", type=int, default=3, help="decode steps after the prefill (default 3)")
    p.add_argument("--rtol", type=float, help="relative tolerance (default by dtype)")
    p.add_argument("--atol", type=float, help="absolute tolerance (default by dtype)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="runtime under test: cpu reference executor, cuda GPU runtime, auto = cuda when a GPU is "
                        "present (default)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("generate", help="generate tokens from an engine, streaming them",
                       description="Continue a prompt with an engine, printing each new token as it comes.")
    p.add_argument("engine", help="engine directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer: --tokenizer or ENGINE/tokenizer.json)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated (e.g. 1,2,3)")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizers JSON file for --prompt and the printed text")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop-ids", help="token ids that end the sequence, comma-separated")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="cuda GPU runtime, cpu reference executor, auto = cuda when a GPU is present (default)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="benchmark an engine (or the kernels) against PyTorch and the bandwidth floor",
                       description="`moetrt bench ENGINE`: prefill latency, per-token decode latency, tokens/s and "
                                   "device memory of the GPU runtime, beside PyTorch on the same weights (eager, and a "
                                   "static-cache CUDA-graph decoder) and the bandwidth floor measured in the same run; "
                                   "prints ratios, writes JSON and a PNG plot. `moetrt bench kernels` times each CUDA "
                                   "kernel against its floor and PyTorch. Both need a GPU.")
    p.add_argument("target", help="an engine directory, or 'kernels'")
    p.add_argument("--batch", default="1,8,32", help="batch sizes, comma-separated (default 1,8,32)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--output-len", type=int, default=32, help="new tokens (default 32)")
    p.add_argument("--checkpoint", help="weights for the PyTorch baselines (default: the engine's checkpoint)")
    p.add_argument("--no-eager", action="store_true", help="skip the (slow) eager PyTorch baseline")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG plot here")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MoetrtError as exc:
        if args.debug:
            raise
        print(f"moetrt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moetrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
