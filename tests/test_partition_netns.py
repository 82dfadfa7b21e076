"""A network partition between two "hosts" (network namespaces joined by veth) and its healing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodes import wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.model,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 to create network namespaces"
    ),
]

API_KEY = "partition-test-key"
ADDRESSES = ("10.252.0.1", "10.252.0.2")
WAIT_S = 40.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture()
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """Two namespaces joined by a veth pair: (namespace A, namespace B, A's veth name)."""
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b, veth_a, veth_b = f"emA{tag}", f"emB{tag}", f"ema{tag}", f"emb{tag}"
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        _ip("link", "set", veth_a, "netns", ns_a)
        _ip("link", "set", veth_b, "netns", ns_b)
        for ns, veth, address in ((ns_a, veth_a, ADDRESSES[0]), (ns_b, veth_b, ADDRESSES[1])):
            _ip("-n", ns, "addr", "add", f"{address}/30", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b, veth_a
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _start(ns: str, address: str, data_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "node.log", "ab")
    process = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "node", "start", "--host", address, "--port", "0",
         "--data-dir", str(data_dir), "--model", "smollm2-135m", "--no-mdns", "--no-judge", "--api-key", API_KEY,
         "--hello-interval-s", "1", "--peer-dead-after-s", "3", *args],
        stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
    )
    log.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (data_dir / "node.json").exists():
            return process, json.loads((data_dir / "node.json").read_text())["url"]
        if process.poll() is not None:
            raise RuntimeError((data_dir / "node.log").read_text())
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("node did not start")


def _alive_peers(ns: str, url: str) -> set[str]:
    """GET /v1/peers from inside the namespace (the root namespace has no route to it)."""
    code = (
        "import json, sys, urllib.request\n"
        f"r = urllib.request.Request({url + '/v1/peers'!r}, headers={{'Authorization': 'Bearer {API_KEY}'}})\n"
        "print(json.dumps([p['id'] for p in json.load(urllib.request.urlopen(r, timeout=5))['data'] if p['alive']]))\n"
    )
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    return set(json.loads(result.stdout)) if result.returncode == 0 else set()


def _node_id(data_dir: Path) -> str:
    return json.loads((data_dir / "node.json").read_text())["node_id"]


def test_a_partition_is_noticed_and_healed(two_hosts, tmp_path: Path) -> None:
    ns_a, ns_b, veth_a = two_hosts
    a, url_a = _start(ns_a, ADDRESSES[0], tmp_path / "a")
    b, url_b = None, ""
    try:
        b, url_b = _start(ns_b, ADDRESSES[1], tmp_path / "b", "--peer", url_a)
        id_a, id_b = _node_id(tmp_path / "a"), _node_id(tmp_path / "b")
        met = lambda: _alive_peers(ns_a, url_a) == {id_b} and _alive_peers(ns_b, url_b) == {id_a}  # noqa: E731
        wait_for(met, "the hosts to meet", timeout_s=WAIT_S, interval_s=0.5)
        _ip("-n", ns_a, "link", "set", veth_a, "down")  # the partition
        apart = lambda: _alive_peers(ns_a, url_a) == set() and _alive_peers(ns_b, url_b) == set()  # noqa: E731
        wait_for(apart, "both sides to notice", timeout_s=WAIT_S, interval_s=0.5)
        _ip("-n", ns_a, "link", "set", veth_a, "up")  # the healing
        wait_for(met, "the hosts to meet again", timeout_s=WAIT_S, interval_s=0.5)
    finally:
        for process in (a, b):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
