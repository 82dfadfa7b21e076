"""`expertmesh doctor`: what a user needs to know when a node will not run, on one screen."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from node.config import Settings
from node.serving import catalog, selfcheck
from peers.addresses import is_loopback_host

log = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail"]
MIN_FREE_BYTES = 1 << 30  # room for one more small model
GPU_BACKENDS = {"cuda": "CUDA", "hip": "ROCm/HIP", "metal": "Metal", "vulkan": "Vulkan", "sycl": "SYCL", "opencl": "OpenCL"}


@dataclass(frozen=True)
class Check:
    """One line of the report: what was looked at, how it stands, and what to do."""

    name: str
    status: Status
    detail: str


def _python() -> Check:
    version = platform.python_version()
    if sys.version_info < (3, 11):
        return Check("python", "fail", f"{version} at {sys.executable}: expertmesh needs 3.11 or newer")
    in_venv = sys.prefix != sys.base_prefix
    return Check("python", "ok", f"{version} at {sys.executable}{' (virtual environment)' if in_venv else ''}")


def _llama_cpp() -> Check:
    version = selfcheck.llama_cpp_version()
    try:
        import llama_cpp  # noqa: F401 - importing loads the native library
    except Exception as exc:  # noqa: BLE001 - a broken native library raises anything
        return Check("llama-cpp-python", "fail", f"{version}: cannot load ({type(exc).__name__}: {exc}); reinstall it")
    return Check("llama-cpp-python", "ok", version)


def compiled_backends() -> list[str]:
    """GPU backends this llama.cpp build carries, from the ggml libraries it ships."""
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001
        return []
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    names = " ".join(p.name.lower() for p in lib_dir.glob("*")) if lib_dir.is_dir() else ""
    return [label for key, label in GPU_BACKENDS.items() if f"ggml-{key}" in names]


def _backend() -> Check:
    try:
        import llama_cpp

        offload = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001
        return Check("backend", "fail", "unknown: llama-cpp-python does not load")
    backends = compiled_backends()
    if offload:
        return Check("backend", "ok", f"GPU offload compiled in ({', '.join(backends) or 'a GPU backend'}); --n-gpu-layers applies")
    return Check(
        "backend", "ok",
        "CPU only (no GPU offload compiled in; for a GPU reinstall with e.g. CMAKE_ARGS=\"-DGGML_CUDA=on\")",
    )


def _cpu() -> Check:
    features = selfcheck.notable_cpu_features(selfcheck.cpu_flags())
    listed = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in features.items() if name != "NEON" or present)
    detail = f"{platform.machine()}, {os.cpu_count()} cores: {listed}"
    if platform.machine() in ("x86_64", "AMD64") and not features["AVX2"]:
        return Check("cpu", "warn", detail + " (no AVX2: llama.cpp will be slow)")
    return Check("cpu", "ok", detail)


def _selfcheck(settings: Settings) -> Check:
    pulled = sorted(catalog.list_models(settings.models_dir), key=lambda m: m.size_bytes)
    if settings.safe_cpu_kernels in (True, False):
        verdict = selfcheck.decide(settings.safe_cpu_kernels, settings.data_dir, [])
    elif not pulled:
        cached = selfcheck.load_cached(settings.data_dir)
        if cached is None:
            return Check("cpu self-check", "warn", "not run: no model pulled yet (expertmesh pull smollm2-135m)")
        verdict = cached
    else:
        smallest = pulled[0]
        verdict = selfcheck.decide("auto", settings.data_dir, [(smallest.sha256, smallest.path)], n_threads=settings.n_threads)
    if verdict.safe_kernels_pass is False:
        return Check(
            "cpu self-check", "fail",
            f"llama.cpp died of {verdict.fault} with default and with safe kernels: reinstall llama-cpp-python "
            "built for this CPU (CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install --force-reinstall --no-cache-dir llama-cpp-python)",
        )
    status: Status = "warn" if verdict.safe_cpu_kernels and verdict.source != "setting" else "ok"
    return Check("cpu self-check", status, f"{verdict.reason} [{verdict.source}]")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _models_dir(settings: Settings) -> Check:
    directory = settings.models_dir
    free = shutil.disk_usage(_nearest_existing(directory)).free
    count = len(catalog.list_models(directory))
    detail = f"{directory}: {count} model{'s' if count != 1 else ''}, {free / 2**30:.1f} GiB free"
    if free < MIN_FREE_BYTES:
        return Check("models dir", "warn", detail + " (under 1 GiB: pulling another model may fail)")
    return Check("models dir", "ok", detail)


def _data_dir(settings: Settings) -> Check:
    directory = settings.data_dir
    existing = _nearest_existing(directory)
    if not os.access(existing, os.W_OK):
        return Check("data dir", "fail", f"{directory}: {existing} is not writable")
    return Check("data dir", "ok", f"{directory}{'' if directory.exists() else ' (created at first start)'}")


def _port(settings: Settings) -> Check:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, settings.port))
        except OSError as exc:
            return Check(
                "port", "fail",
                f"{settings.host}:{settings.port} is not free ({exc.strerror or exc}): a node already running, or "
                "another program; pick another with --port",
            )
    return Check("port", "ok", f"{settings.host}:{settings.port} is free")


def _mdns(settings: Settings) -> Check:
    if not settings.mdns:
        return Check("mdns", "ok", "off (mdns = false)")
    from zeroconf import InterfaceChoice, Zeroconf

    interfaces = list(settings.mdns_interfaces) or (["127.0.0.1"] if is_loopback_host(settings.host) else InterfaceChoice.All)
    try:
        zc = Zeroconf(interfaces=interfaces)  # binds UDP 5353 and joins the group; announces nothing
    except OSError as exc:
        return Check("mdns", "warn", f"cannot bind UDP 5353 ({exc}): LAN discovery off; --peer URL still works")
    zc.close()
    where = "loopback only (the node listens on loopback)" if interfaces == ["127.0.0.1"] else "its interfaces"
    return Check("mdns", "ok", f"UDP 5353 binds on {where}")


def diagnose(settings: Settings) -> list[Check]:
    """Every check, in the order a person reads them; failures mean the node cannot run."""
    checks = [_python(), _llama_cpp()]
    if checks[-1].status == "ok":
        checks += [_backend(), _cpu(), _selfcheck(settings)]
    else:
        checks.append(_cpu())
    checks += [_models_dir(settings), _data_dir(settings), _port(settings), _mdns(settings)]
    return checks


def render(checks: list[Check]) -> str:
    """The report as text for a terminal."""
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = [f"[{marks[c.status]}] {c.name:<17} {c.detail}" for c in checks]
    failed = [c.name for c in checks if c.status == "fail"]
    lines.append("")
    lines.append(f"the node cannot run: fix {', '.join(failed)}" if failed else "the node can run")
    return "\n".join(lines) + "\n"
