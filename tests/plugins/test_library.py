import ctypes

import pytest

from conftest import HAS_GPU
from moetrt.errors import KernelError
from moetrt.plugins import PLUGIN_ABI_VERSION
from moetrt.plugins.kernels import check, load_library


def test_kernel_library_is_built_and_matches_the_abi():
    lib = load_library()
    assert lib.moetrt_abi_version() == PLUGIN_ABI_VERSION
    from moetrt.plugins.launch import _SIGNATURES
    for symbol in ("moetrt_abi_version", "moetrt_error_string", *_SIGNATURES):  # every entry the launchers bind
        assert hasattr(lib, symbol), symbol
    # Ampere and Hopper machine code, not the compiler's default target (which lacks the tensor-core paths)
    assert {80, 90} <= set(lib.cuda_archs), lib.cuda_archs


def test_library_reports_argument_errors_by_code():
    lib = load_library()
    lib.moetrt_embedding.restype = ctypes.c_int
    null = ctypes.c_void_p(0)
    args = [null] * 5 + [ctypes.c_int64(v) for v in (1, 64, 512, 256)]
    code = lib.moetrt_embedding(*args, ctypes.c_int(7), null)  # dtype code 7 does not exist
    assert code == 1001
    with pytest.raises(KernelError, match="embedding: error 1001 \\(unsupported dtype code\\)"):
        check(code, "embedding")
    args[6] = ctypes.c_int64(0)  # hidden = 0
    assert lib.moetrt_embedding(*args, ctypes.c_int(1), null) == 1002


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU path")
def test_launch_without_a_gpu_fails_with_a_cuda_error_not_a_crash():
    lib = load_library()
    null = ctypes.c_void_p(0)
    args = [null] * 5 + [ctypes.c_int64(v) for v in (1, 64, 512, 256)]
    code = lib.moetrt_embedding(*args, ctypes.c_int(1), null)
    assert code != 0
    with pytest.raises(KernelError, match="embedding: error"):
        check(code, "embedding")


def test_missing_library_is_a_clear_error(monkeypatch, tmp_path):
    from moetrt.plugins import kernels
    monkeypatch.setattr(kernels, "candidate_paths", lambda: [tmp_path / "libmoetrt_kernels.so"])
    kernels.load_library.cache_clear()
    try:
        with pytest.raises(KernelError, match="libmoetrt_kernels.so not found"):
            kernels.load_library()
    finally:
        kernels.load_library.cache_clear()


def test_a_library_without_an_entry_is_a_clear_error(monkeypatch, tmp_path):
    """A library built from older sources (same ABI number, an entry point missing) names itself and the entry."""
    from moetrt.plugins import launch

    class Stale:
        path = tmp_path / "libmoetrt_kernels.so"

    monkeypatch.setattr(launch, "load_library", lambda: Stale())
    with pytest.raises(KernelError, match=r"libmoetrt_kernels.so: has no moetrt_gemv_folded; .*pip install"):
        launch._fn("moetrt_gemv_folded")
