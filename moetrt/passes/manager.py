"""Pass framework: a pass is a named ``Graph -> Graph`` rewrite; the manager runs a pipeline in order,
validates the graph after each pass (ONNX checker, shape inference) and can save it after any pass."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from moetrt.errors import MoetrtError

log = logging.getLogger("moetrt.passes")


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[gs.Graph], gs.Graph]
    doc: str = ""


def validate(model: onnx.ModelProto, after: str) -> None:
    """ONNX checker + strict shape inference (plugin nodes are skipped by both)."""
    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise MoetrtError(f"graph invalid after pass {after!r}: {str(exc).splitlines()[0]}") from None


class PassManager:
    def __init__(self, passes: Sequence[Pass], dump_after: str | None = None, dump_dir: Path | None = None):
        names = [p.name for p in passes]
        if dump_after is not None and dump_after not in names:
            raise MoetrtError(f"--dump-after: unknown pass {dump_after!r}; passes: {', '.join(names)}")
        self.passes, self.dump_after, self.dump_dir = list(passes), dump_after, dump_dir

    def run(self, model: onnx.ModelProto, base_dir: str | Path | None = None) -> onnx.ModelProto:
        """Lower ``model``. Weights may stay in external data: pass the folder they are relative to
        (folding through ONNX Runtime and the checker resolve them from the working directory)."""
        with _working_directory(base_dir):
            return self._run(model)

    def _run(self, model: onnx.ModelProto) -> onnx.ModelProto:
        graph = gs.import_onnx(model)
        for p in self.passes:
            graph = p.run(graph)
            graph.cleanup().toposort()
            out = gs.export_onnx(graph)
            out.opset_import.extend([i for i in model.opset_import if i.domain not in {o.domain for o in out.opset_import}])
            validate(out, p.name)
            log.info("pass %s: %d nodes", p.name, len(graph.nodes))
            if p.name == self.dump_after and self.dump_dir is not None:
                self.dump_dir.mkdir(parents=True, exist_ok=True)
                onnx.save(out, str(self.dump_dir / f"after_{p.name}.onnx"), save_as_external_data=True,
                          location=f"after_{p.name}.weights", size_threshold=1024)
        result = gs.export_onnx(graph)
        result.doc_string = model.doc_string
        return result


@contextlib.contextmanager
def _working_directory(path):
    if path is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)
