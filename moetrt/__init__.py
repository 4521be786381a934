"""moetrt: compile GPT-style Mixture-of-Experts checkpoints into per-GPU inference engines.

Packages (see docs/architecture.md): ``models`` (config, torch reference, checkpoints),
``compiler`` (export, pipeline, CLI), ``passes`` (graph rewrites), ``plugins`` (op specs,
CUDA kernels), ``engines`` (engine format, builders, runtime).
"""

from moetrt.errors import CheckpointError, ConfigError, KernelError, MoetrtError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "KernelError", "MoetrtError", "Runtime", "__version__"]


def __getattr__(name):  # moetrt.Runtime without importing the engines at package import
    if name == "Runtime":
        from moetrt.engines.runtime import Runtime
        return Runtime
    raise AttributeError(name)
