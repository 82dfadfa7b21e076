"""Issue 13, items 4, 5, 7-9 and 11-13: access, authenticated peers, SSRF, starvation and robustness, against live nodes on loopback."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bandit.ledger import Ledger
from node.state_files import StateFileError
from peers import auth
from peers.addresses import dialable_origin
from peers.client import PeerClient, PeerTimedOut
from peers.identity import NodeId, NodeIdentity
from peers.table import AddressLearned
from peers.wire import (
    CONTENT_TYPE,
    ChatMessage,
    GenerateFrame,
    GenerateRequest,
    HelloReply,
    NodeCard,
    encode,
    sign_card,
)
from tests.nodes import LiveNode, fake_expert, hello_body, signed_post, start_live_node, wait_until

SHA = "6" * 64


def _generate_request(expert_id: str = "nobody@000000000000") -> bytes:
    return encode(GenerateRequest(
        request_id="r1", expert_id=expert_id, messages=(ChatMessage(role="user", content="Hi"),), max_tokens=4,
        temperature=0.0, top_p=None, stop=(), seed=0, origin_node=NodeId("x"), hops=1,
    ))


async def test_an_empty_api_key_file_never_turns_authentication_off(tmp_path: Path, caplog) -> None:
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    (data_dir / "api_key").write_text("")  # what a crash mid-write used to leave
    caplog.set_level(logging.WARNING)
    node = await start_live_node(data_dir, host="0.0.0.0")  # listens on loopback; configured as if public
    try:
        key = (data_dir / "api_key").read_text().strip()
        async with aiohttp.ClientSession() as session:
            statuses = []
            for header in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {key}"}):
                async with session.get(node.url + "/v1/models", headers=header) as response:
                    statuses.append(response.status)
        print(f"\nitem 4: empty key file replaced by a {len(key)}-char key; /v1/models without/empty/wrong/right key: {statuses}")
        assert statuses == [401, 401, 401, 200]
        assert len(key) > 20 and (data_dir / "api_key").stat().st_mode & 0o777 == 0o600
        assert "was empty: replaced it" in caplog.text
        assert not list(data_dir.glob(".api_key.*.tmp"))  # written to a temp file, fsynced, renamed
    finally:
        await node.stop()


async def test_a_public_node_without_a_secret_generates_only_for_verified_peers(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    friend = await start_live_node(tmp_path / "friend")
    # A public node dials no loopback address it merely heard of: the friend is configured (bootstrap).
    node = await start_live_node(tmp_path / "node", [fake_expert("e", SHA)], host="0.0.0.0", peers=(friend.url,))
    try:
        stranger = NodeIdentity.generate()
        body = _generate_request()
        await wait_until(lambda: node.network.is_verified_peer(friend.node_id), what="the node to verify its friend")
        async with aiohttp.ClientSession() as session:
            unsigned, _, _ = await signed_post(session, node.url, "/peer/v1/generate", body, None)
            strange, _, _ = await signed_post(session, node.url, "/peer/v1/generate", body, stranger)
            friendly, _, _ = await signed_post(session, node.url, "/peer/v1/generate", body, friend.identity)
        print(f"\nitem 5: /peer/v1/generate unsigned {unsigned}, signed by a stranger {strange}, by a verified peer {friendly} (unknown expert)")
        assert (unsigned, strange, friendly) == (401, 403, 404)
        assert f"refused /peer/v1/generate from unverified node {stranger.node_id}" in caplog.text
    finally:
        await friend.stop()
        await node.stop()


class Recorder:
    """A loopback HTTP server that records every request it gets: the service an SSRF would hit."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        async def anything(request: web.Request) -> web.Response:
            self.seen.append(f"{request.method} {request.path_qs}")
            return web.Response(status=404)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"


async def test_learned_addresses_are_dialled_only_as_protocol_origins(tmp_path: Path) -> None:
    recorder = Recorder()
    await recorder.start()
    local = await start_live_node(tmp_path / "local")
    public = await start_live_node(tmp_path / "public", host="0.0.0.0")
    try:
        crafted = [f"{recorder.url}/internal/admin/delete_all?confirm=yes#", f"{recorder.url}/?q=1", f"http://user@{recorder.url[7:]}"]
        async with aiohttp.ClientSession() as session:
            for node in (local, public):
                for address in crafted:
                    stranger = NodeIdentity.generate()
                    await signed_post(session, node.url, "/peer/v1/hello", hello_body(stranger, addresses=[address]), stranger)
            # A bare origin is a peer address: the loopback node dials its protocol path, the public one not at all.
            for node in (public, local):
                stranger = NodeIdentity.generate()
                await signed_post(session, node.url, "/peer/v1/hello", hello_body(stranger, addresses=[recorder.url]), stranger)
            # Not a pause: wait until the loopback node has dialled the bare origin, sent last, and handled the answer;
            # every address sent before it has been handled by then.
            pending = lambda: local.network.table.unverified.get(recorder.url)  # noqa: E731
            await wait_until(lambda: (p := pending()) is not None and p.failures >= 1, what="the dial of the bare origin")
        known = [u for n in (local, public) for u in (*n.network.table.unverified, *(p.url for p in n.network.table.peers.values()))]
        print(f"\nitem 7: addresses known from the crafted hellos: {[u for u in known if u != recorder.url]}; "
              f"requests to the recorder: {recorder.seen}")
        assert known == [recorder.url]  # of every address sent, only the bare origin, and only at the loopback node
        assert recorder.seen and set(recorder.seen) == {"POST /peer/v1/hello"} and len(recorder.seen) <= 4
        assert not any(u.startswith(recorder.url) for u in public.network.table.unverified)
        assert dialable_origin("http://10.0.0.7:8470/", allow_loopback=False) == "http://10.0.0.7:8470"
        assert dialable_origin("http://[::1]:22", allow_loopback=False) is None
        assert dialable_origin("http://localhost:6379", allow_loopback=False) is None
    finally:
        await public.stop()
        await local.stop()
        if recorder.runner is not None:
            await recorder.runner.cleanup()
        await local.stop()
        await recorder.runner.cleanup()


async def test_browsers_and_rebinding_pages_cannot_drive_a_loopback_node(tmp_path: Path) -> None:
    node = await start_live_node(tmp_path / "node")
    try:
        stranger = NodeIdentity.generate()
        body = hello_body(stranger)
        async with aiohttp.ClientSession() as session:
            plain, _, _ = await signed_post(session, node.url, "/peer/v1/hello", body, stranger, headers={"Content-Type": "text/plain"})
            rebound, _, _ = await signed_post(session, node.url, "/peer/v1/hello", body, stranger, headers={"Host": "rebind.example"})
            async with session.get(node.url + "/v1/models", headers={"Host": "rebind.example:8470"}) as response:
                user_rebound = response.status
            async with session.get(node.url + "/v1/models", headers={"Host": "localhost:8470"}) as response:
                by_name = response.status
        print(f"\nitem 8: text/plain hello {plain}; Host rebind.example on the peer API {rebound}, on /v1 {user_rebound}; Host localhost {by_name}")
        assert (plain, rebound, user_rebound, by_name) == (415, 403, 403, 200)
    finally:
        await node.stop()


class Impostor:
    """Answers hellos with a genuine card of its own key, but its replies are not bound to the request."""

    def __init__(self, mode: str) -> None:
        self.identity = NodeIdentity.generate()
        self.mode = mode  # "unsigned", or "replayed" (a signature made for another nonce)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        async def hello(request: web.Request) -> web.Response:
            card = NodeCard(node_id=self.identity.node_id, public_key=self.identity.public_key_raw, addresses=(self.url,), experts=(), issued_ms=1)
            body = encode(HelloReply(card=sign_card(card, self.identity), echo_sent_ms=0))
            headers = {} if self.mode == "unsigned" else auth.sign_reply(self.identity, auth.new_nonce(), 200, body)
            return web.Response(body=body, content_type=CONTENT_TYPE, headers=headers)

        app = web.Application()
        app.router.add_post("/peer/v1/hello", hello)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"


async def test_requests_cannot_be_replayed_and_unauthenticated_replies_make_no_peer(tmp_path: Path) -> None:
    impostors = [Impostor("unsigned"), Impostor("replayed")]
    for impostor in impostors:
        await impostor.start()
    node = await start_live_node(tmp_path / "node", peers=tuple(i.url for i in impostors))
    secret = b"open sesame"
    member = await start_live_node(tmp_path / "member", community_secret="open sesame")
    outsider = await start_live_node(tmp_path / "outsider", community_secret="wrong", peers=(member.url,))
    try:
        stranger = NodeIdentity.generate()
        body = hello_body(stranger)
        headers = {"Content-Type": CONTENT_TYPE, **auth.sign_request(stranger, "POST", "/peer/v1/hello", body)}
        stale = auth.sign_request(stranger, "POST", "/peer/v1/hello", body, now_ms=int(time.time() * 1000) - 120_000)
        async with aiohttp.ClientSession() as session:
            statuses = []
            for _ in range(2):  # the same captured request, twice
                async with session.post(node.url + "/peer/v1/hello", data=body, headers=headers) as response:
                    statuses.append(response.status)
            async with session.post(node.url + "/peer/v1/hello", data=body, headers={"Content-Type": CONTENT_TYPE, **stale}) as response:
                statuses.append(response.status)
            tampered = {**headers, **auth.sign_request(stranger, "POST", "/peer/v1/peers", body)}
            async with session.post(node.url + "/peer/v1/hello", data=body, headers=tampered) as response:
                statuses.append(response.status)  # a signature for another path
            unsigned_member, _, _ = await signed_post(session, member.url, "/peer/v1/hello", body, stranger)
            wrong_member, _, _ = await signed_post(session, member.url, "/peer/v1/hello", body, stranger, secret=b"wrong")
            right_member, _, _ = await signed_post(session, member.url, "/peer/v1/hello", hello_body(stranger), stranger, secret=secret)
        # Not a pause: wait until the node has dialled each impostor twice and the outsider has been refused twice.
        def failures(table_of: LiveNode, url: str) -> int:
            pending = table_of.network.table.unverified.get(url)
            return pending.failures if pending is not None else 0

        await wait_until(lambda: all(failures(node, i.url) >= 2 for i in impostors), "two hellos to each impostor")
        await wait_until(lambda: failures(outsider, member.url) >= 2, "the member to refuse the outsider twice")
        alive = {p.node_id for p in node.network.alive_peers()}
        print(f"\nitem 9: hello, its replay, a 2-minute-old copy, a signature for another path: {statuses}; "
              f"impostors alive: {sorted(alive & {i.identity.node_id for i in impostors})}; "
              f"community: no secret {unsigned_member}, wrong {wrong_member}, right {right_member}; "
              f"outsider alive at the member: {outsider.node_id in {p.node_id for p in member.network.alive_peers()}}")
        assert statuses == [200, 401, 401, 401]
        assert not alive & {i.identity.node_id for i in impostors}
        assert (unsigned_member, wrong_member, right_member) == (403, 403, 200)
        assert outsider.node_id not in {p.node_id for p in member.network.alive_peers()}
        assert member.node_id not in {p.node_id for p in outsider.network.alive_peers()}
    finally:
        for live in (outsider, member, node):
            await live.stop()
        for impostor in impostors:
            await impostor.runner.cleanup()


async def test_tarpit_addresses_cannot_starve_an_honest_peers_hellos(tmp_path: Path) -> None:
    held: list[asyncio.StreamWriter] = []

    async def tarpit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, read nothing, answer nothing

    servers = [await asyncio.start_server(tarpit, "127.0.0.1", 0) for _ in range(256)]
    urls = [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
    node = await start_live_node(tmp_path / "node", hello_interval_s=1.0, peer_dead_after_s=4.0)
    honest = await start_live_node(tmp_path / "honest", [fake_expert("h", SHA)])
    try:
        node.network._apply(AddressLearned(honest.url, "bootstrap", int(time.time() * 1000)))
        await wait_until(lambda: node.network.is_verified_peer(honest.node_id), what="the node to meet its honest peer")
        async with aiohttp.ClientSession() as session:
            for i in range(0, 256, 4):
                stranger = NodeIdentity.generate()
                await signed_post(session, node.url, "/peer/v1/hello", hello_body(stranger, addresses=urls[i : i + 4]), stranger)
        dead_samples, samples = 0, 0
        started = time.monotonic()
        while time.monotonic() - started < 15:
            samples += 1
            # The honest peer stops hello-ing us, so only the node's own hellos keep it alive.
            dead_samples += not node.network.is_verified_peer(honest.node_id)
            await asyncio.sleep(0.25)
        print(
            f"\nitem 11: 256 tarpit addresses learned, {len(held)} connections held;"
            f" honest peer dead in {dead_samples}/{samples} samples over 15 s"
        )
        assert len(held) > 0  # the tarpits were dialled
        assert dead_samples == 0
    finally:
        await honest.stop()
        await node.stop()
        for writer in held:
            writer.close()
        for server in servers:
            server.close()


async def test_a_hello_in_two_segments_is_read_whole(tmp_path: Path) -> None:
    node = await start_live_node(tmp_path / "node")
    try:
        stranger = NodeIdentity.generate()
        body = hello_body(stranger, addresses=[f"http://10.9.{i}.1:8470" for i in range(16)])
        headers = {"Content-Type": CONTENT_TYPE, "Content-Length": str(len(body)), "Host": "127.0.0.1",
                   **auth.sign_request(stranger, "POST", "/peer/v1/hello", body)}
        head = "POST /peer/v1/hello HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "Connection: close\r\n\r\n"
        port = int(node.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.encode() + body[: len(body) // 2])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(body[len(body) // 2 :])
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        print(f"\nitem 12: a {len(body)}-byte hello in two segments 50 ms apart: {status_line.decode().strip()}")
        assert b" 200 " in status_line
    finally:
        await node.stop()


async def test_odd_headers_corrupt_files_trickling_peers_and_the_ledger_keep_their_promises(tmp_path: Path, caplog) -> None:
    # A non-UTF-8 Authorization header is a 401, not a 500.
    node = await start_live_node(tmp_path / "keyed", api_key="a-long-enough-key")
    try:
        port = int(node.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\xfd\r\nConnection: close\r\n\r\n")
        await writer.drain()
        auth_status = (await reader.readline()).decode().strip()
        writer.close()
    finally:
        await node.stop()
    assert " 401 " in auth_status, auth_status

    # Corrupt caches are moved aside and rebuilt; a corrupt ledger is one clear line naming the file.
    data_dir = tmp_path / "corrupt"
    data_dir.mkdir()
    for name in ("peers.db", "cards.db"):
        (data_dir / name).write_bytes(b"this is not a database" * 100)
    caplog.set_level(logging.WARNING)
    node = await start_live_node(data_dir)
    await node.stop()
    moved = sorted(p.name.split(".corrupt-")[0] for p in data_dir.glob("*.corrupt-*") if not p.name.endswith(("-wal", "-shm")))
    assert moved == ["cards.db", "peers.db"]
    (data_dir / "ledger.db").unlink(missing_ok=True)
    (data_dir / "ledger.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateFileError) as raised:
        await start_live_node(data_dir)
    message = str(raised.value)
    print(f"\nitem 13: non-UTF-8 Authorization -> {auth_status!r}; corrupt caches moved aside: {moved}; corrupt ledger: {message!r}")
    assert "\n" not in message and str(data_dir / "ledger.db") in message


async def test_a_trickling_peer_is_given_up_at_the_stream_deadline(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()

    async def trickle(request: web.Request) -> web.StreamResponse:
        nonce = request.headers[auth.NONCE_HEADER]
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE, **auth.sign_reply(identity, nonce, 200, None)})
        await response.prepare(request)
        for _ in range(100):  # one frame well inside the idle timeout, forever
            await response.write(encode(GenerateFrame(kind="delta", text=".")))
            await asyncio.sleep(0.3)
        return response

    app = web.Application()
    app.router.add_post("/peer/v1/generate", trickle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            client = PeerClient(session, idle_timeout_s=1.0, stream_deadline_s=2.0)
            started = time.monotonic()
            frames = 0
            with pytest.raises(PeerTimedOut) as raised:
                async for _ in client.generate(url, GenerateRequest(
                    request_id="r", expert_id="e", messages=(ChatMessage(role="user", content="Hi"),), max_tokens=4,
                    temperature=0.0, top_p=None, stop=(), seed=0, origin_node=NodeId("x"), hops=1,
                ), expected_key=identity.public_key_raw):
                    frames += 1
            elapsed = time.monotonic() - started
        print(f"\nitem 13: a peer sending a frame every 0.3 s was given up after {elapsed:.1f} s ({frames} frames): {raised.value}")
        assert 1.9 < elapsed < 3.5 and "deadline" in str(raised.value)
    finally:
        await runner.cleanup()


async def test_the_ledger_keeps_hashed_words_and_honours_its_retention(tmp_path: Path) -> None:
    from node.routing.router import RouteConstraints

    node = await start_live_node(tmp_path / "node", [fake_expert("e", SHA)])
    try:
        routed = await node.router.route("Explain the zebrafish regeneration pathway in detail", RouteConstraints())
        assert routed.decision.query.words and all(w.startswith("h") and len(w) == 13 for w in routed.decision.query.words)
    finally:
        await node.stop()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "node").glob("ledger.db*"))
    assert b"zebrafish" not in raw and b"regeneration" not in raw
    ledger = Ledger(tmp_path / "node" / "ledger.db")
    try:
        assert ledger.delete_older_than(int(time.time() * 1000) + 1) == 1
        assert ledger.get(routed.decision.decision_id) is None
    finally:
        ledger.close()
    print("\nitem 13: ledger.db holds no query word in plain text; retention deleted the decision past the limit")


async def test_slowloris_connections_are_closed(tmp_path: Path) -> None:
    node = await start_live_node(tmp_path / "node", idle_connection_timeout_s=2.0)
    port = int(node.url.rsplit(":", 1)[1])
    connections = []
    try:
        for _ in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            connections.append((reader, writer))
        started = time.monotonic()

        async def trickle_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
            while time.monotonic() - started < 10:
                try:
                    writer.write(b"a")  # a byte every half second: never a complete request
                    await writer.drain()
                    if await asyncio.wait_for(reader.read(1), 0.5) == b"":
                        return time.monotonic() - started
                except TimeoutError:
                    continue
                except (ConnectionError, OSError):
                    return time.monotonic() - started
            return float("inf")

        closed_after = await asyncio.gather(*(trickle_until_closed(r, w) for r, w in connections))
        async with aiohttp.ClientSession() as session:
            async with session.get(node.url + "/healthz") as response:
                healthy = response.status
        print(f"\nitem 13: 100 slowloris connections closed by the node after {max(closed_after):.1f} s at most; /healthz {healthy}")
        assert max(closed_after) < 5 and healthy == 200
    finally:
        for _, writer in connections:
            writer.close()
        await node.stop()


async def test_deeply_nested_json_is_a_400(tmp_path: Path) -> None:
    node = await start_live_node(tmp_path / "node", [fake_expert("e", SHA)])
    try:
        statuses = []
        async with aiohttp.ClientSession() as session:
            for path, body in (
                ("/v1/chat/completions", b"[" * 5000),
                ("/v1/completions", b"[" * 5000),
                ("/v1/chat/completions", b'{"model": "auto", "expertmesh": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001),
            ):
                async with session.post(node.url + path, data=body, headers={"Content-Type": "application/json"}) as response:
                    statuses.append((response.status, (await response.json())["error"]["message"]))
        print(f"\nitem 6: 5,000 levels of nesting -> {statuses}")
        assert [s for s, _ in statuses] == [400, 400, 400]
    finally:
        await node.stop()


async def test_the_peer_api_is_a_guarded_sub_app_and_relay_routes_stay_outside_it(tmp_path: Path) -> None:
    node = await start_live_node(tmp_path / "node")
    try:
        sub_apps = [r for r in node.app.router.resources() if isinstance(r, web.PrefixedSubAppResource)]
        assert [r.canonical for r in sub_apps] == ["/peer/v1"]
        peer_paths = {route.resource.canonical for route in sub_apps[0] if route.resource is not None}
        # Wire paths are unchanged: the sub-app's routes sit under /peer/v1, with those other modules add.
        assert {"/peer/v1/hello", "/peer/v1/generate", "/peer/v1/join", "/peer/v1/gossip"} <= peer_paths
        main_paths = {r.canonical for r in node.app.router.resources() if not isinstance(r, web.PrefixedSubAppResource)}
        assert "/peer/v1/relay-connect" in main_paths and not any(p.endswith("/hello") for p in main_paths)
        stranger = NodeIdentity.generate()
        async with aiohttp.ClientSession() as session:
            # An unknown peer route still meets the guard: unsigned is 401, signed gets a signed 404 (not the user API's).
            unsigned, _, _ = await signed_post(session, node.url, "/peer/v1/nothing-here", b"\x80", None)
            sent = auth.sign_request(stranger, "POST", "/peer/v1/nothing-here", b"\x80")
            status, body, headers = await signed_post(session, node.url, "/peer/v1/nothing-here", b"\x80", None, headers=sent)
            # The relay's forward route is not behind the guard: an unsigned request reaches the relay (which refuses
            # it: this node offers no relay), instead of the guard's 401.
            relayed, _, _ = await signed_post(session, node.url, f"/peer/v1/relay/{stranger.node_id}/peer/v1/hello", b"\x80", None)
        assert unsigned == 401 and status == 404 and relayed != 401
        signer = auth.verify_reply(headers, sent[auth.NONCE_HEADER], status, body, expected_key=node.identity.public_key_raw)
        assert signer == node.identity.public_key_raw
    finally:
        await node.stop()
