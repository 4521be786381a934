"""Graph rewrites over ``onnx_graphsurgeon.Graph`` and the pass manager that runs them.

``PIPELINE`` is the lowering, in order: constant folding, LayerNorm (+ residual Add) fusion, attention
fusion, MoE fusion, bias + GeLU fusion (the dense MLPs). Each pass matches graph structure, never node names, and leaves what it does not
recognise unchanged with a warning. Tensor-parallel sharding (``shard.shard_graph``) then runs once per
rank on the lowered graph.
"""

from moetrt.passes.attention import ATTENTION_PASS
from moetrt.passes.bias_act import BIAS_ACT_PASS
from moetrt.passes.fold import FOLD
from moetrt.passes.layernorm import LAYERNORM
from moetrt.passes.manager import Pass, PassManager
from moetrt.passes.moe import MOE_PASS

PIPELINE = (FOLD, LAYERNORM, ATTENTION_PASS, MOE_PASS, BIAS_ACT_PASS)

__all__ = ["PIPELINE", "Pass", "PassManager"]
