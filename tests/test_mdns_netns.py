"""Two nodes in two network namespaces joined by a veth pair find each other over real multicast.

Run as a module, this file is also the child each namespace runs:
`python -m tests.test_mdns_netns peer NODE_ID PORT ADDRESS` prints the node's events as JSON lines
until its stdin closes; `python -m tests.test_mdns_netns query SOURCE DEST NAME` sends one legacy
unicast DNS query and prints the reply as JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peers.mdns import SERVICE_TYPE, Advertisement, MdnsEvent, MdnsService
from tests.nodes import MDNS_PORT, TYPE_SRV, TYPE_TXT, legacy_query

pytestmark = pytest.mark.netns

REPO_ROOT = Path(__file__).resolve().parent.parent
ADDRESS_A, ADDRESS_B = "10.251.0.1", "10.251.0.2"
PORT_A, PORT_B = 18201, 18202
WAIT_S = 15.0


@dataclass(frozen=True)
class NetnsPair:
    """Two namespaces whose veth ends carry ADDRESS_A and ADDRESS_B."""

    ns_a: str
    ns_b: str


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """Fresh namespaces joined by a veth pair, multicast routed onto it; always torn down."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` command")
    tag = f"{os.getpid()}{secrets.token_hex(2)}"
    pair = NetnsPair(ns_a=f"emesh{tag}a", ns_b=f"emesh{tag}b")
    devices = {pair.ns_a: (f"emv{tag}a", ADDRESS_A), pair.ns_b: (f"emv{tag}b", ADDRESS_B)}
    created: list[str] = []
    try:
        for ns in devices:
            try:
                _ip("netns", "add", ns)
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"`ip netns add` failed here: {exc.stderr.strip()}")
            created.append(ns)
        (dev_a, _), (dev_b, _) = devices.values()
        _ip("link", "add", dev_a, "netns", pair.ns_a, "type", "veth", "peer", "name", dev_b, "netns", pair.ns_b)
        for ns, (dev, address) in devices.items():
            _ip("-n", ns, "addr", "add", f"{address}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", dev)
        yield pair
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


async def _spawn_in(ns: str, log_path: Path, *args: str) -> asyncio.subprocess.Process:
    with log_path.open("wb") as log_file:
        return await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, sys.executable, "-m", "tests.test_mdns_netns", *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file,
            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip


async def _read_until(
    proc: asyncio.subprocess.Process, wanted: Callable[[dict[str, Any]], bool], what: str, log_path: Path
) -> dict[str, Any]:
    """The first JSON line from the child that `wanted` accepts, within WAIT_S."""
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            pytest.fail(f"timed out after {WAIT_S} s waiting for {what}; child log:\n{log_path.read_text()}")
        if not line:
            pytest.fail(f"child exited before {what}; child log:\n{log_path.read_text()}")
        record = json.loads(line)
        if wanted(record):
            return record


async def _stop(proc: asyncio.subprocess.Process) -> int:
    """Close the child's stdin (it then says goodbye and exits); kill it if it lingers."""
    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.close()
    try:
        return await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        return await proc.wait()


async def test_nodes_in_two_namespaces_find_each_other(netns_pair: NetnsPair, tmp_path: Path) -> None:
    id_a, id_b = f"nsa-{secrets.token_hex(4)}", f"nsb-{secrets.token_hex(4)}"
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    proc_a = await _spawn_in(netns_pair.ns_a, log_a, "peer", id_a, str(PORT_A), ADDRESS_A)
    proc_b = await _spawn_in(netns_pair.ns_b, log_b, "peer", id_b, str(PORT_B), ADDRESS_B)
    try:
        b_seen_by_a, a_seen_by_b = await asyncio.gather(
            _read_until(proc_a, lambda r: r.get("node_id") == id_b, "a to find b", log_a),
            _read_until(proc_b, lambda r: r.get("node_id") == id_a, "b to find a", log_b),
        )
        assert b_seen_by_a == {
            "event": "PeerFound", "node_id": id_b, "urls": [f"http://{ADDRESS_B}:{PORT_B}"],
            "card_digest": f"sha256:{id_b}", "protocol_version": 1, "url_path": "/peer/v1",
        }  # fmt: skip
        assert a_seen_by_b["urls"] == [f"http://{ADDRESS_A}:{PORT_A}"]
        assert a_seen_by_b["card_digest"] == f"sha256:{id_a}"

        # Legacy unicast (RFC 6762 §6.7) straight to a's address: a is the only responder in its namespace.
        name_a = f"{id_a}.{SERVICE_TYPE}"
        query = await _spawn_in(netns_pair.ns_b, tmp_path / "query.log", "query", ADDRESS_B, ADDRESS_A, name_a)
        try:
            out, _ = await asyncio.wait_for(query.communicate(), WAIT_S)
        except TimeoutError:
            query.kill()
            await query.wait()
            pytest.fail("legacy unicast query did not finish")
        assert query.returncode == 0, (tmp_path / "query.log").read_text()
        answer = json.loads(out)
        assert answer["source"] == [ADDRESS_A, MDNS_PORT]
        assert answer["own_port"] != MDNS_PORT
        assert [name_a, TYPE_SRV] in answer["reply"]["questions"]
        assert answer["reply"]["srv"][name_a] == PORT_A
        assert answer["reply"]["txt"][name_a]["card"] == f"sha256:{id_a}"

        assert await _stop(proc_a) == 0, log_a.read_text()
        await _read_until(proc_b, lambda r: r == {"event": "PeerGone", "node_id": id_a}, "a's goodbye at b", log_b)
        assert await _stop(proc_b) == 0, log_b.read_text()
    finally:
        for proc in (proc_a, proc_b):
            await _stop(proc)


# --- the child ---------------------------------------------------------------------------------


def _write_line(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _report(event: MdnsEvent) -> None:
    _write_line({"event": type(event).__name__, **dataclasses.asdict(event)})


async def _run_peer(node_id: str, port: int, address: str) -> None:
    advertisement = Advertisement(
        node_id=node_id, port=port, card_digest=f"sha256:{node_id}", addresses=[address]
    )
    async with MdnsService(advertisement, _report, interfaces=[address]):
        _write_line({"event": "started"})
        await asyncio.to_thread(sys.stdin.buffer.read)


def _run_query(source: str, destination: str, name: str) -> None:
    reply, replier, own_port = legacy_query(
        destination, [(name, TYPE_SRV), (name, TYPE_TXT)], lambda r: name in r["srv"], source_host=source
    )
    _write_line({"reply": reply, "source": list(replier), "own_port": own_port})


def _main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "peer":
        node_id, port, address = args
        asyncio.run(_run_peer(node_id, int(port), address))
    elif mode == "query":
        _run_query(*args)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    _main(sys.argv[1:])
