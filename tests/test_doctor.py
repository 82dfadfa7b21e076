"""`expertmesh doctor`: one screen, exit 0 when the node can run, 1 naming what stops it."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from node import cli
from node.serving import selfcheck


@dataclasses.dataclass
class Done:
    """What `expertmesh doctor` returned and printed."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def doctor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., Done]:
    """`expertmesh doctor` run through the CLI's entry point in this process (no interpreter start per check)."""

    def run(*args: str) -> Done:
        capsys.readouterr()
        returncode = cli.main(["doctor", "--data-dir", str(tmp_path / "data"), "--models-dir", str(tmp_path / "models"), *args])
        out = capsys.readouterr()
        return Done(returncode, out.out, out.err)

    return run


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_doctor_reports_everything_and_passes_on_a_usable_machine(doctor: Callable[..., Done]) -> None:
    done = doctor("--port", str(_free_port()))
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("python", "llama-cpp-python", "backend", "cpu", "cpu self-check", "models dir", "data dir", "port", "mdns"):
        assert f"] {name} " in done.stdout, (name, done.stdout)
    assert "AVX2" in done.stdout and "AMX" in done.stdout and "GiB free" in done.stdout
    assert "no model pulled yet" in done.stdout  # an empty models dir: the self-check cannot run yet
    assert done.stdout.strip().endswith("the node can run")


def test_doctor_fails_when_the_port_is_taken(doctor: Callable[..., Done]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        done = doctor("--port", str(holder.getsockname()[1]))
    assert done.returncode == 1
    assert "[FAIL] port" in done.stdout and "cannot run: fix port" in done.stdout


def test_doctor_shows_a_cached_safe_kernel_verdict(tmp_path: Path, doctor: Callable[..., Done]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    verdict = selfcheck.Verdict(True, "llama.cpp's default CPU kernels died of SIGILL here", "check", fault="SIGILL", safe_kernels_pass=True)
    (data / selfcheck.VERDICT_FILE).write_text(json.dumps(dataclasses.asdict(verdict)))
    done = doctor("--port", str(_free_port()))
    assert done.returncode == 0
    assert "[WARN] cpu self-check" in done.stdout and "SIGILL" in done.stdout


def test_doctor_fails_when_even_safe_kernels_crash(tmp_path: Path, doctor: Callable[..., Done]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    verdict = selfcheck.Verdict(True, "died", "check", fault="SIGILL", safe_kernels_pass=False)
    (data / selfcheck.VERDICT_FILE).write_text(json.dumps(dataclasses.asdict(verdict)))
    done = doctor("--port", str(_free_port()))
    assert done.returncode == 1 and "[FAIL] cpu self-check" in done.stdout and "GGML_NATIVE=OFF" in done.stdout


@pytest.mark.model
def test_doctor_runs_the_self_check_with_a_pulled_model(tmp_path: Path) -> None:
    from node.serving import catalog

    models_dir = catalog.default_models_dir()
    catalog.resolve("smollm2-135m", models_dir, progress=False)
    done = subprocess.run(
        [sys.executable, "-m", "node", "doctor", "--data-dir", str(tmp_path), "--models-dir", str(models_dir),
         "--port", str(_free_port())],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[check]" in done.stdout and (tmp_path / selfcheck.VERDICT_FILE).exists()
