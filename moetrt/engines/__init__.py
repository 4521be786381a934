"""Engine directory format, builders, runtime, CPU reference executor (see docs/architecture.md).

Must not import torch at run time.
"""

from moetrt.engines.runtime import Runtime  # noqa: E402

__all__ = ["Runtime"]
