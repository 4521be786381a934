"""Engine directory format (``format``), the CPU reference executor (``reference``), the runtime
(``runtime``) and its polygraphy runner. Imports no torch (tested)."""

from moetrt.engines.runtime import Runtime  # noqa: E402

__all__ = ["Runtime"]
