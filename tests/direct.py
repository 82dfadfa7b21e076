"""llama-cpp-python's own `Llama`, the reference the batching worker is compared with, on the same CPU kernels."""

from __future__ import annotations

import contextlib
from pathlib import Path


def direct_llama(path: Path, *, n_ctx: int, n_threads: int, safe_cpu_kernels: bool):
    """A `Llama` like the old one-at-a-time expert loaded; without llama.cpp's repacked kernels when asked.

    `Llama` has no switch for `use_extra_bufts`, so its default model params are wrapped while it loads
    (on a CPU that dies in the repacked kernels, the worker runs without them and so must the reference).
    """
    import llama_cpp.llama_cpp as low
    from llama_cpp import Llama

    original = low.llama_model_default_params

    def params():
        value = original()
        value.use_extra_bufts = not safe_cpu_kernels
        return value

    with _patched(low, "llama_model_default_params", params):
        return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)


@contextlib.contextmanager
def _patched(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)
