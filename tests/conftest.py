import ctypes

import pytest
import torch

from moetrt.models import get_preset
from moetrt.models.checkpoints import init_checkpoint


def gpu_available() -> bool:
    """True when the CUDA driver sees a device (checked without torch, as the runtime will be)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


HAS_GPU = gpu_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_config():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_config):
    """The same random tiny model (fp32, seed 7) in every format; FasterTransformer split over 2 ranks."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for fmt, tp in (("moetrt", 1), ("megatron-deepspeed", 1), ("fastertransformer", 2)):
        paths[fmt] = init_checkpoint(root / fmt, tiny_config, fmt, torch.float32, tp=tp, seed=7)
    return paths
