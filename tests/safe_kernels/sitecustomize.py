"""Test-only stopgap (issue 16's branch): node processes load llama.cpp models without AMX/repacked kernels.

This machine's CPU advertises AMX and a default llama.cpp build dies with SIGILL on the first
generation. Main's issue 11 fixes this in the node itself (node/native.py, a CPU self-check);
once that is merged this file and the PYTHONPATH that points here can go.
"""

try:
    import llama_cpp.llama_cpp as _low_level

    if any(name == "use_extra_bufts" for name, *_ in _low_level.llama_model_params._fields_):
        _original = _low_level.llama_model_default_params

        def _safe_defaults():
            params = _original()
            params.use_extra_bufts = False
            return params

        _low_level.llama_model_default_params = _safe_defaults
except ImportError:
    pass
