"""Plugin ops: specs (ONNX domain ``moetrt``), CPU reference implementations, CUDA kernels and launchers.

The kernels live in ``csrc/`` behind a C ABI (device pointers, sizes, a stream, an int error code,
no allocation); ``kernels.load_library()`` finds the built library and checks its ABI version.
"""

from moetrt.plugins.abi import PLUGIN_ABI_VERSION

__all__ = ["PLUGIN_ABI_VERSION"]
