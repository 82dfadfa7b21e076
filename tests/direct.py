"""llama-cpp-python's own `Llama`, the reference the batching worker is compared with, on the same CPU kernels."""

from __future__ import annotations

from pathlib import Path

from node.serving.native import load_llama


def direct_llama(path: Path, *, n_ctx: int, n_threads: int, safe_cpu_kernels: bool):
    """A `Llama` like the old one-at-a-time expert loaded, on the kernels the worker uses."""
    return load_llama(
        str(path), safe_cpu_kernels=safe_cpu_kernels, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False
    )
