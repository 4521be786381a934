"""A polygraphy runner for moetrt engines, so ``moetrt validate`` compares it with any other runner."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from moetrt.engines.runtime import Runtime


class MoetrtRunner(BaseRunner):
    """Runs one step of an engine per ``infer(feed_dict)``: the feeds are the step graph's inputs."""

    def __init__(self, engine_dir, device: str = "cpu", name: str | None = None):
        super().__init__(name=name, prefix="moetrt-runner")
        self.engine_dir, self.device = engine_dir, device

    def activate_impl(self):
        self.runtime = Runtime(self.engine_dir, self.device)

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name in ("input_ids", "position_ids"):
            meta.add(name, dtype=np.int32, shape=["batch", "tokens"])
        meta.add("past_lengths", dtype=np.int32, shape=["batch"])
        for l, cache in enumerate(self.runtime.new_cache()):
            meta.add(f"kv_cache_{l}", dtype=self.runtime.cache_dtype, shape=list(cache.shape))
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        outputs = OrderedDict(self.runtime.run(dict(feed_dict)))
        self.inference_time = time.perf_counter() - start
        return outputs

    def deactivate_impl(self):
        self.runtime.close()
        del self.runtime
