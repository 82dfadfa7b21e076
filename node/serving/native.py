"""Loading llama.cpp models with the CPU kernels this machine can actually run."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

# llama-cpp-python builds llama_model_params from llama_model_default_params() inside Llama.__init__ and
# offers no keyword for `use_extra_bufts`; swapping the factory is the one seam, so loads take turns.
_params_lock = threading.Lock()


@contextlib.contextmanager
def _without_extra_buffer_types() -> Iterator[None]:
    """While held, every new llama_model_params has extra buffer types (AMX, weight repacking) off."""
    import llama_cpp.llama_cpp as low_level

    original = low_level.llama_model_default_params

    def safe_defaults() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    with _params_lock:
        low_level.llama_model_default_params = safe_defaults
        try:
            yield
        finally:
            low_level.llama_model_default_params = original


def safe_kernels_supported() -> bool:
    """Whether this llama-cpp-python exposes the `use_extra_bufts` model parameter."""
    import llama_cpp.llama_cpp as low_level

    return any(name == "use_extra_bufts" for name, *_ in low_level.llama_model_params._fields_)


def load_llama(model_path: str, *, safe_cpu_kernels: bool, **kwargs: Any) -> Any:
    """A `llama_cpp.Llama`; with safe CPU kernels its weights stay in plain CPU buffers (no AMX, no repacking)."""
    from llama_cpp import Llama

    if not safe_cpu_kernels:
        return Llama(model_path=model_path, **kwargs)
    if not safe_kernels_supported():
        log.warning("this llama-cpp-python has no use_extra_bufts parameter; loading %s with its defaults", model_path)
        return Llama(model_path=model_path, **kwargs)
    with _without_extra_buffer_types():
        return Llama(model_path=model_path, **kwargs)
