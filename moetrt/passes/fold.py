"""Constant folding and clean-up: evaluate every subgraph whose inputs are all constants (shape arithmetic,
Casts of weights, ...) and drop what no output needs."""

import onnx_graphsurgeon as gs
import onnxruntime


from moetrt.passes.manager import Pass


def fold_constants(graph: gs.Graph) -> gs.Graph:
    onnxruntime.set_default_logger_severity(3)  # graphsurgeon folds through ONNX Runtime; keep its notes quiet
    # Large weights stay as they are: folding Transpose/Cast of a weight would duplicate it.
    return graph.fold_constants(size_threshold=1 << 20).cleanup()


FOLD = Pass("fold", fold_constants, "constant folding and dead-node removal")
