"""Locate and load ``libmoetrt_kernels`` (built by CMake during ``pip install``) through ctypes.

Search order: ``$MOETRT_KERNELS_LIB`` (a file), beside this module, then each site-packages'
``moetrt/plugins`` (an editable or source-tree import still finds the installed library).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import site
import sysconfig
from pathlib import Path

from moetrt.errors import KernelError
from moetrt.plugins.abi import PLUGIN_ABI_VERSION

LIBRARY_NAME = "libmoetrt_kernels.so"
DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}  # enum moetrt_dtype in csrc/moetrt_kernels.h


def candidate_paths() -> list[Path]:
    paths = []
    if env := os.environ.get("MOETRT_KERNELS_LIB"):
        paths.append(Path(env))
    paths.append(Path(__file__).with_name(LIBRARY_NAME))
    dirs = [sysconfig.get_paths()["platlib"], sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    for d in dict.fromkeys(dirs):
        paths.append(Path(d) / "moetrt" / "plugins" / LIBRARY_NAME)
    return paths


@functools.lru_cache(maxsize=None)
def load_library() -> ctypes.CDLL:
    """The kernel library, checked against this package's plugin ABI version."""
    tried = candidate_paths()
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise KernelError(f"{LIBRARY_NAME} not found (looked in {', '.join(map(str, tried))}); "
                          "install moetrt with `pip install .` so CMake builds it, or set MOETRT_KERNELS_LIB")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelError(f"{path}: cannot load: {exc}") from None
    lib.moetrt_abi_version.restype = ctypes.c_int
    lib.moetrt_error_string.restype = ctypes.c_char_p
    lib.moetrt_error_string.argtypes = [ctypes.c_int]
    lib.moetrt_cuda_archs.restype = ctypes.c_char_p
    built = lib.moetrt_abi_version()
    if built != PLUGIN_ABI_VERSION:
        raise KernelError(f"{path}: built for plugin ABI {built}, this moetrt needs {PLUGIN_ABI_VERSION}; "
                          "rebuild with `pip install .`")
    lib.moetrt_set_programmatic_launch.restype = ctypes.c_int
    lib.moetrt_set_programmatic_launch.argtypes = [ctypes.c_int]
    if os.environ.get("MOETRT_PROGRAMMATIC_LAUNCH", "1") == "0":
        lib.moetrt_set_programmatic_launch(0)
    lib.path = path
    lib.cuda_archs = tuple(int(a) for a in lib.moetrt_cuda_archs().decode().split(",") if a.strip().isdigit())
    return lib


@contextlib.contextmanager
def programmatic_launch(enable: bool):
    """Within the block, launches use programmatic dependent launch (Hopper+: a kernel may start while the one
    before it finishes, and waits for its results in-kernel) or not; the previous setting returns afterwards.
    CUDA graphs keep what they were captured with. On by default; ``MOETRT_PROGRAMMATIC_LAUNCH=0`` starts with it
    off."""
    lib = load_library()
    previous = lib.moetrt_set_programmatic_launch(int(bool(enable)))
    try:
        yield
    finally:
        lib.moetrt_set_programmatic_launch(previous)


def check(code: int, what: str) -> None:
    """Raise ``KernelError`` naming the launch if a kernel entry point returned non-zero."""
    if code:
        message = load_library().moetrt_error_string(code).decode()
        raise KernelError(f"{what}: error {code} ({message})")
