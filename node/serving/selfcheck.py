"""CPU self-check: a tiny generation in a child process tells whether llama.cpp's default kernels run here.

Some CPUs (many cloud VMs among them) advertise instructions, AMX above all, that trap when used, and a
llama.cpp built for the build machine then dies with SIGILL on its first matrix product. Such a fault
cannot be caught inside the process, so the check runs in a child: if the child dies of a signal, every
expert is loaded with the safe parameters (extra buffer types off: plain CPU kernels, no AMX, no weight
repacking). The verdict is cached in the data dir under a key made of the llama-cpp-python version and
the CPU's feature flags, so later starts pay nothing and a changed CPU or library checks again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

VERDICT_FILE = "cpu_selfcheck.json"
FATAL_SIGNALS = frozenset({signal.SIGILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE})
PROBE_TIMEOUT_S = 180.0  # loading and four tokens take about a second; a busy machine gets slack
# Fault injection for tests: the default-kernel child kills itself with this signal after loading.
INJECT_FAULT_ENV = "EXPERTMESH_SELFCHECK_INJECT_FAULT"
SafeSetting = Literal["auto"] | bool


@dataclass(frozen=True)
class ProbeOutcome:
    """How one child run ended."""

    returncode: int | None  # None: timed out
    stderr_tail: str = ""

    @property
    def fault(self) -> str | None:
        """The fatal signal's name when the child died of one."""
        if self.returncode is not None and self.returncode < 0 and -self.returncode in {int(s) for s in FATAL_SIGNALS}:
            return signal.Signals(-self.returncode).name
        return None

    @property
    def passed(self) -> bool:
        """The child generated and exited normally."""
        return self.returncode == 0


@dataclass(frozen=True)
class Verdict:
    """Whether experts load with the safe CPU kernels, and why."""

    safe_cpu_kernels: bool
    reason: str  # one line for the log and `expertmesh doctor`
    source: Literal["check", "cache", "setting", "inconclusive"]
    fault: str | None = None  # the signal the default kernels died of
    safe_kernels_pass: bool | None = None  # None: not tried
    key: str = ""
    checked_models: tuple[str, ...] = field(default=())  # sha256s the default kernels ran
    checked_at_s: float = 0.0


def cpu_flags() -> tuple[str, ...]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return tuple(sorted(set(value.split())))
    return ()


def notable_cpu_features(flags: Sequence[str]) -> dict[str, bool]:
    """The features that decide llama.cpp's CPU kernels."""
    present = set(flags)
    return {
        "AVX2": "avx2" in present,
        "AVX-512": "avx512f" in present,
        "AMX": bool({"amx_tile", "amx_int8", "amx_bf16"} & present),
        "NEON": "asimd" in present or platform.machine() in ("arm64", "aarch64"),
    }


def llama_cpp_version() -> str:
    """The installed llama-cpp-python version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return "not installed"


def verdict_key(library_version: str, flags: Sequence[str], machine: str | None = None) -> str:
    """What a cached verdict is valid for: this library build on a CPU with these flags."""
    material = json.dumps([library_version, machine or platform.machine(), sorted(flags)])
    return hashlib.sha256(material.encode()).hexdigest()[:24]


def run_probe(model_paths: Sequence[Path], *, safe: bool, n_threads: int | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeOutcome:
    """Load each model in a child process and generate a few tokens; report how the child ended."""
    command = [sys.executable, "-m", "node.serving.selfcheck", *(["--safe"] if safe else [])]
    if n_threads:
        command += ["--threads", str(n_threads)]
    command += [str(path) for path in model_paths]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return ProbeOutcome(None, (exc.stderr or b"")[-400:].decode(errors="replace"))
    return ProbeOutcome(done.returncode, done.stderr[-400:].decode(errors="replace"))


Prober = Callable[..., ProbeOutcome]


def load_cached(data_dir: Path) -> Verdict | None:
    """The verdict stored in the data dir, if any and readable."""
    try:
        raw = json.loads((data_dir / VERDICT_FILE).read_text())
        raw["checked_models"] = tuple(raw.get("checked_models", ()))
        raw["source"] = "cache"
        return Verdict(**raw)
    except (OSError, ValueError, TypeError):
        return None


def _store(data_dir: Path, verdict: Verdict) -> None:
    """Write the verdict atomically, so a crash never leaves half a file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / VERDICT_FILE
    temporary = target.with_suffix(".tmp")
    with open(temporary, "w") as handle:
        json.dump(asdict(verdict), handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)


def decide(
    setting: SafeSetting,
    data_dir: Path,
    models: Sequence[tuple[str, Path]],
    *,
    n_threads: int | None = None,
    prober: Prober = run_probe,
    flags: Sequence[str] | None = None,
) -> Verdict:
    """Whether to load experts with the safe CPU kernels: forced by the setting, cached, or checked now.

    `models` are (sha256, path) pairs; a model the cached verdict has not run yet is checked too.
    """
    if setting is True or setting is False:
        return Verdict(bool(setting), f"safe_cpu_kernels = {str(setting).lower()} (set by configuration)", "setting")
    flags = cpu_flags() if flags is None else flags
    key = verdict_key(llama_cpp_version(), flags)
    cached = load_cached(data_dir)
    shas = [sha for sha, _ in models]
    if cached is not None and cached.key == key:
        if cached.safe_cpu_kernels or all(sha in cached.checked_models for sha in shas):
            return cached
    unchecked = [(sha, path) for sha, path in models if cached is None or cached.key != key or sha not in cached.checked_models]
    previously = cached.checked_models if cached is not None and cached.key == key else ()
    started_s = time.monotonic()
    log.info("CPU self-check: a short generation with llama.cpp's default kernels in a child process")
    outcome = prober([path for _, path in unchecked], safe=False, n_threads=n_threads)
    if outcome.passed:
        verdict = Verdict(
            False, f"llama.cpp's default CPU kernels ran here (checked in {time.monotonic() - started_s:.1f} s)", "check",
            key=key, checked_models=tuple(dict.fromkeys([*previously, *shas])), checked_at_s=time.time(),
        )
        _store(data_dir, verdict)
        return verdict
    if outcome.fault is None:
        what = "timed out" if outcome.returncode is None else f"exited with {outcome.returncode}"
        log.warning("CPU self-check was inconclusive (the child %s): %s", what, outcome.stderr_tail.strip()[-200:])
        return Verdict(False, f"self-check inconclusive (child {what}); default kernels kept, not cached", "inconclusive", key=key)
    safe_outcome = prober([path for _, path in unchecked], safe=True, n_threads=n_threads)
    verdict = Verdict(
        True,
        f"llama.cpp's default CPU kernels died of {outcome.fault} here; experts load with safe kernels "
        "(extra buffer types off: no AMX or weight repacking)",
        "check",
        fault=outcome.fault,
        safe_kernels_pass=safe_outcome.passed,
        key=key,
        checked_models=tuple(dict.fromkeys([*previously, *shas])),
        checked_at_s=time.time(),
    )
    _store(data_dir, verdict)
    return verdict


def log_verdict(verdict: Verdict) -> None:
    """One line in the log; a warning that says what it costs when the safe kernels were chosen by the check."""
    if verdict.source == "setting" or not verdict.safe_cpu_kernels:
        log.info("CPU kernels: %s", verdict.reason)
        return
    if verdict.safe_kernels_pass is False:
        log.error(
            "CPU self-check: llama.cpp died of %s with its default kernels AND with the safe ones; generations will "
            "probably crash on this machine. Run `expertmesh doctor`, or reinstall llama-cpp-python built for this CPU "
            "(CMAKE_ARGS=\"-DGGML_NATIVE=OFF\").",
            verdict.fault,
        )
        return
    log.warning(
        "CPU self-check: llama.cpp's default kernels died of %s on this CPU (it advertises instructions it traps on, "
        "typical of cloud VMs); every expert now loads with safe CPU kernels (no AMX, no weight repacking). Cost: "
        "slower prompt processing on CPUs whose AMX does work; set safe_cpu_kernels = false to override.",
        verdict.fault,
    )


def _probe_main(argv: Sequence[str]) -> int:
    """The child: load each model (safe or default kernels) and generate four tokens."""
    import argparse

    from node.serving.native import load_llama

    parser = argparse.ArgumentParser(prog="python -m node.serving.selfcheck")
    parser.add_argument("--safe", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("models", nargs="+")
    args = parser.parse_args(argv)
    for path in args.models:
        llama = load_llama(
            path, safe_cpu_kernels=args.safe, n_ctx=128, n_threads=args.threads, n_threads_batch=args.threads, verbose=False
        )
        injected = os.environ.get(INJECT_FAULT_ENV)
        if injected and not args.safe:
            os.kill(os.getpid(), getattr(signal, injected))
        llama.create_completion("The capital of France is", max_tokens=4, temperature=0.0)
        llama.close()
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1:]))
