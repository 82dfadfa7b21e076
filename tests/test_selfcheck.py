"""The CPU self-check: a child's fatal signal picks the safe kernels, the verdict is cached and keyed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from node.config import load_settings
from node.errors import InvalidRequest
from node.serving import catalog, selfcheck
from tests.nodes import SMOLLM2_ID, start_node

FLAGS = ("avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16")
MODELS = [("a" * 64, Path("/models/a.gguf"))]


class ScriptedProber:
    """Answers probes as a CPU would that traps on (or runs) the default kernels; counts the calls."""

    def __init__(self, default: int | None, safe: int | None = 0) -> None:
        self.outcomes = {False: default, True: safe}
        self.calls: list[bool] = []

    def __call__(self, paths, *, safe: bool, n_threads=None) -> selfcheck.ProbeOutcome:
        self.calls.append(safe)
        return selfcheck.ProbeOutcome(self.outcomes[safe], "")


def test_a_child_killed_by_sigill_picks_safe_kernels_and_caches_the_verdict(tmp_path: Path) -> None:
    prober = ScriptedProber(default=-signal.SIGILL)
    verdict = selfcheck.decide("auto", tmp_path, MODELS, prober=prober, flags=FLAGS)
    assert verdict.safe_cpu_kernels and verdict.fault == "SIGILL" and verdict.safe_kernels_pass is True
    assert prober.calls == [False, True]
    stored = json.loads((tmp_path / selfcheck.VERDICT_FILE).read_text())
    assert stored["safe_cpu_kernels"] is True and stored["fault"] == "SIGILL"

    again = selfcheck.decide("auto", tmp_path, MODELS, prober=prober, flags=FLAGS)
    assert again.source == "cache" and again.safe_cpu_kernels
    assert prober.calls == [False, True], "a cached verdict must cost no probe"


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGBUS])
def test_other_fatal_signals_also_pick_safe_kernels(tmp_path: Path, sig: signal.Signals) -> None:
    verdict = selfcheck.decide("auto", tmp_path, MODELS, prober=ScriptedProber(default=-sig), flags=FLAGS)
    assert verdict.safe_cpu_kernels and verdict.fault == sig.name


def test_a_passing_child_keeps_the_default_kernels(tmp_path: Path) -> None:
    prober = ScriptedProber(default=0)
    verdict = selfcheck.decide("auto", tmp_path, MODELS, prober=prober, flags=FLAGS)
    assert not verdict.safe_cpu_kernels and verdict.source == "check" and prober.calls == [False]
    assert selfcheck.decide("auto", tmp_path, MODELS, prober=prober, flags=FLAGS).source == "cache"


def test_a_changed_cpu_or_library_checks_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prober = ScriptedProber(default=0)
    selfcheck.decide("auto", tmp_path, MODELS, prober=prober, flags=FLAGS)
    selfcheck.decide("auto", tmp_path, MODELS, prober=prober, flags=FLAGS[:2])  # another CPU
    assert prober.calls == [False, False]
    monkeypatch.setattr(selfcheck, "llama_cpp_version", lambda: "9.9.9")  # another library
    selfcheck.decide("auto", tmp_path, MODELS, prober=prober, flags=FLAGS[:2])
    assert prober.calls == [False, False, False]


def test_a_model_not_yet_checked_is_checked(tmp_path: Path) -> None:
    prober = ScriptedProber(default=0)
    selfcheck.decide("auto", tmp_path, MODELS, prober=prober, flags=FLAGS)
    verdict = selfcheck.decide("auto", tmp_path, [*MODELS, ("b" * 64, Path("/models/b.gguf"))], prober=prober, flags=FLAGS)
    assert prober.calls == [False, False] and set(verdict.checked_models) == {"a" * 64, "b" * 64}


def test_an_inconclusive_child_is_not_cached(tmp_path: Path) -> None:
    for code in (1, None):  # a Python error, a timeout: not the CPU's fault
        verdict = selfcheck.decide("auto", tmp_path, MODELS, prober=ScriptedProber(default=code), flags=FLAGS)
        assert not verdict.safe_cpu_kernels and verdict.source == "inconclusive"
        assert not (tmp_path / selfcheck.VERDICT_FILE).exists()


def test_the_setting_forces_either_way_without_a_probe(tmp_path: Path) -> None:
    prober = ScriptedProber(default=-signal.SIGILL)
    assert selfcheck.decide(True, tmp_path, MODELS, prober=prober).safe_cpu_kernels
    assert not selfcheck.decide(False, tmp_path, MODELS, prober=prober).safe_cpu_kernels
    assert prober.calls == []


def test_setting_values_from_toml_env_and_flags(tmp_path: Path) -> None:
    assert load_settings(environ={}).safe_cpu_kernels == "auto"
    assert load_settings(environ={"EXPERTMESH_SAFE_CPU_KERNELS": "true"}).safe_cpu_kernels is True
    assert load_settings(overrides={"safe_cpu_kernels": "false"}, environ={}).safe_cpu_kernels is False
    config = tmp_path / "node.toml"
    config.write_text('[node]\nsafe_cpu_kernels = true\n')
    assert load_settings(config, environ={}).safe_cpu_kernels is True
    with pytest.raises(InvalidRequest, match="safe_cpu_kernels"):
        load_settings(overrides={"safe_cpu_kernels": "sometimes"}, environ={})


@pytest.mark.model
def test_self_check_end_to_end_with_a_real_child_and_model(tmp_path: Path) -> None:
    model = catalog.resolve("smollm2-135m", catalog.default_models_dir(), progress=False)
    default = selfcheck.run_probe([model.path], safe=False, n_threads=1)
    safe = selfcheck.run_probe([model.path], safe=True, n_threads=1)
    assert safe.passed, safe.stderr_tail
    # Whichever way this CPU goes, the child either generated or died of a fatal signal, never hung.
    assert default.passed or default.fault is not None, default
    verdict = selfcheck.decide("auto", tmp_path, [(model.sha256, model.path)], n_threads=1)
    assert verdict.source == "check" and verdict.safe_cpu_kernels == (not default.passed)
    assert selfcheck.load_cached(tmp_path) is not None


@pytest.mark.model
def test_real_child_killed_by_injected_sigill_is_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = catalog.resolve("smollm2-135m", catalog.default_models_dir(), progress=False)
    monkeypatch.setenv(selfcheck.INJECT_FAULT_ENV, "SIGILL")
    verdict = selfcheck.decide("auto", tmp_path, [(model.sha256, model.path)], n_threads=1)
    assert verdict.safe_cpu_kernels and verdict.fault == "SIGILL" and verdict.safe_kernels_pass is True


@pytest.mark.model
async def test_node_on_a_trapping_cpu_warns_loads_safe_kernels_and_serves(tmp_path: Path) -> None:
    env = {"EXPERTMESH_SAFE_CPU_KERNELS": "auto", selfcheck.INJECT_FAULT_ENV: "SIGILL", "EXPERTMESH_N_THREADS": "1"}
    node = start_node(tmp_path / "node", "--model", "smollm2-135m", env=env)
    try:
        async with aiohttp.ClientSession() as session:
            body = {"model": SMOLLM2_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            async with session.post(node.url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200
        log = node.log()
        assert "default kernels died of SIGILL" in log and "safe CPU kernels" in log
        assert json.loads((node.data_dir / selfcheck.VERDICT_FILE).read_text())["safe_cpu_kernels"] is True
    finally:
        node.stop()
    # A second start reads the cached verdict: no probe, no second warning about a fresh check.
    restarted = start_node(tmp_path / "node", "--model", "smollm2-135m", env=env)
    try:
        assert "CPU self-check: a short generation" not in restarted.log().split("node id")[-1]
    finally:
        restarted.stop()


@pytest.mark.model
def test_a_native_fault_mid_answer_is_reported_naming_the_expert(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", "--model", "smollm2-135m")
    try:
        ask = subprocess.Popen(
            [sys.executable, "-m", "node", "ask", "Count from one to five hundred.", "--stream", "--no-rate",
             "--node", node.url, "--model", SMOLLM2_ID, "--max-tokens", "400"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline_s = time.monotonic() + 60
        assert ask.stdout is not None
        os.set_blocking(ask.stdout.fileno(), False)
        while time.monotonic() < deadline_s and not (ask.stdout.read(1) or ""):
            time.sleep(0.05)  # wait for the first streamed token
        os.kill(node.process.pid, signal.SIGILL)  # what a trapping AMX kernel does to the node
        _, stderr = ask.communicate(timeout=60)
        assert ask.returncode == 1
        assert f"while expert {SMOLLM2_ID} was answering" in stderr and "crashed" in stderr
        node.process.wait(timeout=30)
        assert node.process.returncode == -signal.SIGILL
        assert "Fatal Python error: Illegal instruction" in node.log()
    finally:
        node.stop()
