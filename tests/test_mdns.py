"""mDNS advertise + browse with real zeroconf on 127.0.0.1: discovery, updates, goodbyes, DNS-SD interop."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import shutil
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import pytest
from zeroconf import ServiceInfo, Zeroconf
from zeroconf.asyncio import AsyncZeroconf

from peers.mdns import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Advertisement,
    MdnsError,
    MdnsEvent,
    MdnsService,
    PeerFound,
    PeerGone,
    peer_from_service,
)
from tests.nodes import MDNS_PORT, TYPE_PTR, TYPE_SRV, TYPE_TXT, legacy_query, wait_until

LOOPBACK = "127.0.0.1"
MDNS_GROUP = "224.0.0.251"
WAIT_S = 10.0


class Recorder:
    """An on_event callback that keeps every event it is given."""

    def __init__(self) -> None:
        self.events: list[MdnsEvent] = []

    def __call__(self, event: MdnsEvent) -> None:
        self.events.append(event)

    def found(self, node_id: str) -> list[PeerFound]:
        """PeerFound events for one node, oldest first."""
        return [e for e in self.events if isinstance(e, PeerFound) and e.node_id == node_id]

    def gone(self, node_id: str) -> bool:
        """Whether a PeerGone arrived for the node."""
        return any(isinstance(e, PeerGone) and e.node_id == node_id for e in self.events)


def unique_id(tag: str) -> str:
    """A node id no concurrent test run on this host will also use."""
    return f"{tag}-{secrets.token_hex(4)}"


def _ignored(caplog: pytest.LogCaptureFixture, node_id: str, why: str = "") -> bool:
    """Whether the mDNS service logged that it ignored `node_id`'s service (for `why`, when given)."""
    return any(
        r.name == "peers.mdns" and (m := r.getMessage()).startswith("ignoring") and node_id in m and why in m
        for r in caplog.records
    )


def advertisement(node_id: str, port: int, digest: str = "sha256:aaaa") -> Advertisement:
    """An advertisement for 127.0.0.1."""
    return Advertisement(node_id=node_id, port=port, card_digest=digest, addresses=[LOOPBACK])


async def start_all(stack: AsyncExitStack, services: Sequence[MdnsService]) -> None:
    """Start services concurrently (probing takes ~1 s each); close them when the stack unwinds."""
    for service in services:
        stack.push_async_callback(service.close)
    await asyncio.gather(*(service.start() for service in services))


def _info(node_id: str, port: int, txt: dict[str, str]) -> ServiceInfo:
    """A service on 127.0.0.1 registered by plain zeroconf, to feed our browser what we choose."""
    return ServiceInfo(
        SERVICE_TYPE,
        f"{node_id}.{SERVICE_TYPE}",
        port=port,
        properties=txt,
        server=f"{node_id}.local.",
        parsed_addresses=[LOOPBACK],
    )


# --- our service against our service ------------------------------------------------------------


async def test_three_nodes_find_each_other_see_updates_and_goodbyes() -> None:
    ids = [unique_id(tag) for tag in ("a", "b", "c")]
    ports = {ids[0]: 18101, ids[1]: 18102, ids[2]: 18103}
    recorders = {node_id: Recorder() for node_id in ids}
    services = {
        node_id: MdnsService(advertisement(node_id, ports[node_id]), recorders[node_id], interfaces=[LOOPBACK])
        for node_id in ids
    }
    async with AsyncExitStack() as stack:
        await start_all(stack, list(services.values()))

        def everyone_found_everyone() -> bool:
            return all(recorders[me].found(other) for me in ids for other in ids if other != me)

        await wait_until(everyone_found_everyone, "all three nodes to find each other")
        for me in ids:
            assert not recorders[me].found(me), "a node must not report itself"
            for other in ids:
                if other != me:
                    first = recorders[me].found(other)[0]
                    assert first.urls == (f"http://127.0.0.1:{ports[other]}",)
                    assert first.card_digest == "sha256:aaaa"
                    assert first.protocol_version == PROTOCOL_VERSION
                    assert first.url_path == "/peer/v1"

        a, b, c = ids
        await services[a].update("sha256:bbbb")
        assert services[a].advertisement.card_digest == "sha256:bbbb"
        await wait_until(
            lambda: all(recorders[me].found(a)[-1].card_digest == "sha256:bbbb" for me in (b, c)),
            "the new digest of a to reach b and c",
        )

        await services[c].close()
        await wait_until(lambda: recorders[a].gone(c) and recorders[b].gone(c), "a goodbye from c")
        assert not recorders[a].gone(b) and not recorders[b].gone(a)
        await services[c].close()  # idempotent


async def _next_event_about(queue: asyncio.Queue[MdnsEvent], node_id: str) -> MdnsEvent:
    # Skips nodes other test runs on this host may be advertising at the same time.
    while (event := await queue.get()).node_id != node_id:
        pass
    return event


async def test_events_can_go_to_a_queue() -> None:
    a, b = unique_id("qa"), unique_id("qb")
    queue: asyncio.Queue[MdnsEvent] = asyncio.Queue()
    async with AsyncExitStack() as stack:
        await start_all(
            stack,
            [
                MdnsService(advertisement(a, 18111), queue, interfaces=[LOOPBACK]),
                MdnsService(advertisement(b, 18112), Recorder(), interfaces=[LOOPBACK]),
            ],
        )
        event = await asyncio.wait_for(_next_event_about(queue, b), WAIT_S)
        assert event == PeerFound(node_id=b, urls=("http://127.0.0.1:18112",), card_digest="sha256:aaaa", protocol_version=1)


async def test_ignores_unsupported_versions_malformed_txt_and_impostors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="peers.mdns")
    me, good = unique_id("me"), unique_id("good")
    bad_version, no_card, impostor = unique_id("v2"), unique_id("nocard"), unique_id("imp")
    recorder = Recorder()
    txts = {
        bad_version: {"id": bad_version, "v": "2", "card": "sha256:aaaa", "path": "/peer/v1"},
        no_card: {"id": no_card, "v": "1", "path": "/peer/v1"},
        impostor: {"id": good, "v": "1", "card": "sha256:aaaa"},  # TXT id disagrees with the instance name
        good: {"id": good, "v": "1", "card": "sha256:good"},  # no path: the default applies
    }
    async with AsyncExitStack() as stack:
        await start_all(stack, [MdnsService(advertisement(me, 18121), recorder, interfaces=[LOOPBACK])])
        other = AsyncZeroconf(interfaces=[LOOPBACK])
        stack.push_async_callback(other.async_close)
        # The bad ones go first so that by the time the good one is seen they have been handled.
        for node_id, txt in txts.items():
            await other.async_register_service(_info(node_id, 18122, txt), cooperating_responders=True)
        await wait_until(lambda: bool(recorder.found(good)), "the well-formed service")
        # Not a pause: wait until the service has resolved and refused each bad one, then look at what it emitted.
        await wait_until(lambda: all(_ignored(caplog, n) for n in (bad_version, no_card, impostor)), "the bad ones refused")
        assert {e.node_id for e in recorder.events if e.node_id in txts} == {good}
        assert recorder.found(good)[0].url_path == "/peer/v1"
        assert recorder.found(good)[0].card_digest == "sha256:good"


async def test_tracked_services_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="peers.mdns")
    me = unique_id("cap")
    others = [unique_id(f"o{i}") for i in range(4)]
    recorder = Recorder()
    async with AsyncExitStack() as stack:
        await start_all(stack, [MdnsService(advertisement(me, 18131), recorder, interfaces=[LOOPBACK], max_services=2)])
        other = AsyncZeroconf(interfaces=[LOOPBACK])
        stack.push_async_callback(other.async_close)
        infos = [_info(node_id, 18132, {"id": node_id, "v": "1", "card": "sha256:aaaa"}) for node_id in others]
        for info in infos:
            await other.async_register_service(info, cooperating_responders=True)
        await wait_until(lambda: len({e.node_id for e in recorder.events}) >= 2, "two services")
        # Not a pause: wait until each of ours has been either tracked or turned away at the cap.
        found = lambda: {e.node_id for e in recorder.events}  # noqa: E731
        await wait_until(lambda: all(n in found() or _ignored(caplog, n, "already tracking") for n in others), "all four seen")
        # Counted over every node, ours or not: the cap holds whoever fills it.
        assert len({e.node_id for e in recorder.events}) == 2


# --- what other DNS-SD software sees ------------------------------------------------------------


def _lookup_with_plain_zeroconf(name: str) -> ServiceInfo | None:
    zc = Zeroconf(interfaces=[LOOPBACK])
    try:
        return zc.get_service_info(SERVICE_TYPE, name, timeout=5000)
    finally:
        zc.close()


async def test_plain_zeroconf_resolves_the_advertisement() -> None:
    node_id = unique_id("sd")
    async with AsyncExitStack() as stack:
        await start_all(
            stack, [MdnsService(advertisement(node_id, 18141, "sha256:cccc"), Recorder(), interfaces=[LOOPBACK])]
        )
        # Its own thread and loop, so our service keeps answering on this one meanwhile.
        info = await asyncio.to_thread(_lookup_with_plain_zeroconf, f"{node_id}.{SERVICE_TYPE}")
    assert info is not None
    assert info.port == 18141
    assert info.parsed_addresses() == [LOOPBACK]
    assert info.decoded_properties == {"id": node_id, "v": "1", "card": "sha256:cccc", "path": "/peer/v1"}


async def test_legacy_unicast_query_gets_a_unicast_reply() -> None:
    """RFC 6762 §6.7: a query from a port other than 5353 is answered by unicast to that port, question echoed.

    It goes to the mDNS group on loopback rather than to 127.0.0.1:5353: every zeroconf
    instance on this host binds 127.0.0.1:5353 with SO_REUSEPORT, so the kernel would hand
    a unicast datagram to just one of them, not necessarily ours. tests/test_mdns_netns.py
    sends the plain unicast form to a namespace where only one responder listens.
    """
    node_id = unique_id("legacy")
    name = f"{node_id}.{SERVICE_TYPE}"
    async with AsyncExitStack() as stack:
        await start_all(
            stack, [MdnsService(advertisement(node_id, 18151, "sha256:dddd"), Recorder(), interfaces=[LOOPBACK])]
        )
        questions = [(SERVICE_TYPE, TYPE_PTR), (name, TYPE_SRV), (name, TYPE_TXT)]
        reply, source, own_port = await asyncio.to_thread(
            legacy_query, MDNS_GROUP, questions, lambda r: name in r["ptr"], source_host=LOOPBACK
        )
    assert source == (LOOPBACK, MDNS_PORT)
    assert own_port != MDNS_PORT
    assert [SERVICE_TYPE, TYPE_PTR] in reply["questions"]
    assert reply["srv"][name] == 18151
    assert reply["txt"][name] == {"id": node_id, "v": "1", "card": "sha256:dddd", "path": "/peer/v1"}


@pytest.mark.skipif(shutil.which("avahi-browse") is None, reason="avahi-browse is not installed")
async def test_avahi_browse_sees_the_advertisement() -> None:
    node_id = unique_id("avahi")
    async with AsyncExitStack() as stack:
        await start_all(stack, [MdnsService(advertisement(node_id, 18161), Recorder(), interfaces=[LOOPBACK])])
        proc = await asyncio.create_subprocess_exec(
            "avahi-browse", "-rpt", "_expertmesh._tcp",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail("avahi-browse did not finish within 15 s")
    if proc.returncode != 0 and b"Daemon not running" in err:
        pytest.skip(f"avahi-browse cannot reach avahi-daemon: {err.decode(errors='replace').strip()}")
    assert node_id in out.decode(errors="replace")


# --- pure parts ---------------------------------------------------------------------------------


def test_peer_from_service_builds_urls() -> None:
    name = f"n1.{SERVICE_TYPE}"
    addresses = [
        ipaddress.ip_address("192.168.1.5"),
        ipaddress.ip_address("2001:db8::5"),
        ipaddress.ip_address("fe80::1"),  # unusable without a zone id
        ipaddress.ip_address("0.0.0.0"),
        ipaddress.ip_address("192.168.1.5"),
    ]
    txt = {b"id": b"n1", b"v": b"1", b"card": b"sha256:ab", b"path": b"/peer/v9", b"extra": b"ignored"}
    peer = peer_from_service(name, 8080, addresses, txt)
    assert peer == PeerFound(
        node_id="n1",
        urls=("http://192.168.1.5:8080", "http://[2001:db8::5]:8080"),
        card_digest="sha256:ab",
        protocol_version=1,
        url_path="/peer/v9",
    )


@pytest.mark.parametrize(
    ("name", "port", "txt"),
    [
        ("n1._other._tcp.local.", 80, {b"id": b"n1", b"v": b"1", b"card": b"d"}),
        (f"N1.{SERVICE_TYPE}", 80, {b"id": b"N1", b"v": b"1", b"card": b"d"}),
        (f"n1.{SERVICE_TYPE}", 80, {b"id": b"n2", b"v": b"1", b"card": b"d"}),
        (f"n1.{SERVICE_TYPE}", 80, {b"id": b"n1", b"v": b"x", b"card": b"d"}),
        (f"n1.{SERVICE_TYPE}", 80, {b"id": b"n1", b"v": b"2", b"card": b"d"}),
        (f"n1.{SERVICE_TYPE}", 80, {b"id": b"n1", b"v": b"1", b"card": b"has space"}),
        (f"n1.{SERVICE_TYPE}", 80, {b"id": b"n1", b"v": b"1", b"card": None}),
        (f"n1.{SERVICE_TYPE}", 80, {b"id": b"n1", b"v": b"1", b"card": b"\xff"}),
        (f"n1.{SERVICE_TYPE}", 80, {b"id": b"n1", b"v": b"1", b"card": b"d", b"path": b"no-slash"}),
        (f"n1.{SERVICE_TYPE}", None, {b"id": b"n1", b"v": b"1", b"card": b"d"}),
    ],
)
def test_peer_from_service_rejects_unusable_services(name: str, port: int | None, txt: dict[bytes, bytes | None]) -> None:
    assert peer_from_service(name, port, [ipaddress.ip_address("10.0.0.1")], txt) is None


def test_peer_from_service_needs_a_usable_address() -> None:
    txt = {b"id": b"n1", b"v": b"1", b"card": b"d"}
    assert peer_from_service(f"n1.{SERVICE_TYPE}", 80, [ipaddress.ip_address("fe80::1")], txt) is None


@pytest.mark.parametrize(
    "fields",
    [
        {"node_id": "Upper", "port": 1, "card_digest": "d"},
        {"node_id": "has.dot", "port": 1, "card_digest": "d"},
        {"node_id": "x" * 64, "port": 1, "card_digest": "d"},
        {"node_id": "ok", "port": 0, "card_digest": "d"},
        {"node_id": "ok", "port": 1, "card_digest": ""},
        {"node_id": "ok", "port": 1, "card_digest": "d", "addresses": ["not-an-ip"]},
        {"node_id": "ok", "port": 1, "card_digest": "d", "url_path": "peer"},
    ],
)
def test_advertisement_rejects_bad_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Advertisement(**fields)


def test_service_rejects_a_single_string_as_interfaces() -> None:
    with pytest.raises(ValueError):
        MdnsService(advertisement("x", 1), Recorder(), interfaces="127.0.0.1")


async def test_update_before_start_only_changes_the_advertisement_and_closed_is_final() -> None:
    service = MdnsService(advertisement("x", 1), Recorder(), interfaces=[LOOPBACK])
    await service.update("sha256:new")
    assert service.advertisement.card_digest == "sha256:new"
    await service.close()
    await service.close()
    with pytest.raises(MdnsError):
        await service.start()
    with pytest.raises(MdnsError):
        await service.update("sha256:newer")
