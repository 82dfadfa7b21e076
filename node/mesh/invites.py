"""Invites: joining a community with one (home side) and handing them out, admitting and revoking (inviter side)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from node import keys
from node.config import Settings
from node.errors import Forbidden, InvalidRequest, NodeError, PeerUnavailable
from node.mesh.relay import admissions_key, relay_links_key, relay_server_key
from node.peer_request import peer_body
from peers import auth
from peers.client import PEER_PATH
from peers.identity import NodeIdentity
from peers.invite import (
    SECRET_BYTES,
    InviteError,
    JoinReply,
    JoinRequest,
    check_join,
    make_invite,
    make_join,
    read_invite,
    secret_digest,
)
from peers.wire import CONTENT_TYPE, WireError, decode, encode

log = logging.getLogger(__name__)

JOINS_FILE = "joins.json"
JOIN_TIMEOUT_S = 10.0
JOIN_RETRY_MIN_S = 0.5
JOIN_RETRY_MAX_S = 30.0
DEFAULT_INVITE_TTL_S = 24 * 3600


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---- joining with invites (home side, at start) ----------------------------------------


def with_joins(settings: Settings) -> Settings:
    """Settings with the peers and relays of every invite given now or redeemed before (kept in the data dir)."""
    path = settings.data_dir / JOINS_FILE
    joins: list[dict] = json.loads(path.read_text()) if path.exists() else []
    known = {j["invite"] for j in joins}
    for text in settings.join:
        if text in known:
            continue
        try:
            read_invite(text, _now_ms())
        except InviteError as exc:
            raise InvalidRequest(f"--join: {exc}", param="join") from exc
        joins.append({"invite": text, "joined": False})
        known.add(text)
    peers, relays = list(settings.peers), list(settings.relays)
    # A relay is a peer too: our hellos tell it (and through it everyone) where we are.
    peers += [r for r in relays if r not in peers]
    if joins:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        _write_json(path, joins)
    for entry in joins:
        invite = _decode_unchecked(entry["invite"])
        if invite is None or entry.get("joined") == "refused":
            continue
        peers += [a for a in invite.addresses if a not in peers]
        if invite.relay:
            relays += [a for a in invite.addresses[:1] if a not in relays]
    return dataclasses.replace(settings, peers=tuple(peers), relays=tuple(relays))


def _decode_unchecked(text: str):
    """A stored invite whose signature still checks (its expiry no longer matters once redeemed)."""
    try:
        return read_invite(text, 0)
    except InviteError:
        return None


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


async def redeem_joins(session: aiohttp.ClientSession, identity: NodeIdentity, data_dir: Path) -> None:
    """Redeem every invite given at start that was not redeemed yet, retrying until the inviter answers."""
    path = data_dir / JOINS_FILE
    if not path.exists():
        return
    joins = json.loads(path.read_text())
    for entry in joins:
        if entry.get("joined"):
            continue
        invite = _decode_unchecked(entry["invite"])
        if invite is None:
            continue
        delay_s = JOIN_RETRY_MIN_S
        while True:
            try:
                reply = await join(session, identity, invite)
                log.info("joined node %s with its invite%s", reply.node_id, " (it relays for us)" if reply.relay else "")
                entry["joined"] = True
                break
            except PermissionError as exc:
                log.error("the invite of node %s was refused: %s", invite.node_id, exc)
                entry["joined"] = "refused"
                break
            except (TimeoutError, aiohttp.ClientError, OSError, WireError) as exc:
                log.info("join %s: %s; retrying in %.0f s", invite.node_id, exc, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, JOIN_RETRY_MAX_S)
        _write_json(path, joins)


async def join(session: aiohttp.ClientSession, identity: NodeIdentity, invite) -> JoinReply:
    """Redeem `invite` at the node that issued it; PermissionError when it refuses."""
    body = encode(make_join(identity, invite))
    last: Exception | None = None
    for address in invite.addresses:
        try:
            headers = {"Content-Type": CONTENT_TYPE, **auth.sign_request(identity, "POST", f"{PEER_PATH}/join", body)}
            async with session.post(
                f"{address.rstrip('/')}{PEER_PATH}/join", data=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=JOIN_TIMEOUT_S),
            ) as response:
                data = await response.read()
                if response.status == 403:
                    raise PermissionError(data[:300].decode(errors="replace"))
                if response.status != 200:
                    raise WireError(response.status, f"join answered {response.status}")
                reply = decode(data, JoinReply, max_bytes=4096)
                if reply.node_id != invite.node_id:
                    raise WireError(502, "a different node answered the join")
                return reply
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            last = exc
    raise aiohttp.ClientError(f"no address of {invite.node_id} answered: {last}")


# ---- routes ---------------------------------------------------------------------------------


async def invites_ctx(app: web.Application) -> AsyncIterator[None]:
    """Redeem pending invites in the background while the node runs."""
    links = app[relay_links_key]
    task = asyncio.create_task(redeem_joins(links.session, links.identity, app[keys.settings_key].data_dir))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _join_route(request: web.Request) -> web.Response:
    """`POST /peer/v1/join`: redeem an invite."""
    body = await peer_body(request, 4096)
    try:
        message = decode(body, JoinRequest, max_bytes=4096)
        node_id = check_join(message, request.config_dict[relay_server_key].identity.node_id)
    except WireError as exc:
        raise (Forbidden if exc.status == 403 else InvalidRequest)(str(exc)) from exc
    try:
        issued = request.config_dict[admissions_key].redeem(secret_digest(message.secret), node_id, _now_ms())
    except PermissionError as exc:
        raise Forbidden(str(exc)) from exc
    relays = issued.relay and request.config_dict[keys.settings_key].relay
    log.info("node %s joined with an invite%s", node_id, " (relayed here)" if relays else "")
    reply = JoinReply(node_id=request.config_dict[relay_server_key].identity.node_id, relay=relays)
    return web.Response(body=encode(reply), content_type=CONTENT_TYPE)


async def _create_invite(request: web.Request) -> web.Response:
    """`POST /v1/invites`: a one-line invite to this node (user API, needs the API key)."""
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError as exc:
        raise InvalidRequest("body must be JSON") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    ttl_s = body.get("ttl_s", DEFAULT_INVITE_TTL_S)
    one_time = body.get("one_time", True)
    if not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool) or not 0 < ttl_s <= 365 * 86400:
        raise InvalidRequest("ttl_s must be a number of seconds, at most a year", param="ttl_s")
    if not isinstance(one_time, bool):
        raise InvalidRequest("one_time must be true or false", param="one_time")
    settings = request.app[keys.settings_key]
    addresses = [u for u in request.app[keys.network_key].urls][:8]
    if not addresses:
        raise NodeError("this node has no address to put in an invite yet")
    now = _now_ms()
    expires_ms = now + int(ttl_s * 1000)
    secret = secrets.token_bytes(SECRET_BYTES)
    request.app[admissions_key].issue(secret_digest(secret), expires_ms, one_time=one_time, relay=settings.relay, now_ms=now)
    text = make_invite(request.app[relay_server_key].identity, addresses, secret, expires_ms, one_time=one_time, relay=settings.relay)
    return web.json_response({"invite": text, "expires_ms": expires_ms, "one_time": one_time, "relay": settings.relay})


async def _join_user(request: web.Request) -> web.Response:
    """`POST /v1/join`: join with an invite now (the web page's way), relayed when the inviter relays."""
    try:
        body = await request.json()
        text = body["invite"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest('body must be {"invite": "expertmesh-invite:..."}', param="invite") from exc
    try:
        invite = read_invite(str(text), _now_ms())
    except InviteError as exc:
        raise InvalidRequest(str(exc), param="invite") from exc
    links = request.app[relay_links_key]
    try:
        reply = await join(links.session, links.identity, invite)
    except PermissionError as exc:
        raise Forbidden(f"the inviter refused: {exc}") from exc
    except (aiohttp.ClientError, WireError) as exc:
        raise PeerUnavailable(f"cannot reach the inviter: {exc}") from exc
    settings = request.app[keys.settings_key]
    path = settings.data_dir / JOINS_FILE
    joins = json.loads(path.read_text()) if path.exists() else []
    joins.append({"invite": str(text).strip(), "joined": True})
    _write_json(path, joins)
    network = request.app[keys.network_key]
    for address in invite.addresses:
        network.learn_address(address.rstrip("/"))
    if reply.relay:
        links.add_relay(invite.addresses[0].rstrip("/"))
    return web.json_response({"joined": reply.node_id, "relayed": reply.relay})


async def _revoke(request: web.Request) -> web.Response:
    """`POST /v1/admissions/{node_id}/revoke`: revoke one node (kept across restarts)."""
    node_id = request.match_info["node_id"]
    if not re.fullmatch(r"[a-z2-7]{1,64}", node_id):
        raise InvalidRequest("not a node id", param="node_id")
    request.app[admissions_key].revoke(node_id, _now_ms())
    request.app[relay_server_key].close_tunnel(node_id)
    return web.json_response({"node_id": node_id, "revoked": True})


async def _admissions(request: web.Request) -> web.Response:
    """`GET /v1/admissions`: nodes admitted by invite, revoked ones included, and the tunnels open now."""
    admissions, server = request.app[admissions_key], request.app[relay_server_key]
    data = [
        {"id": n, "admitted_ms": a.admitted_ms, "revoked_ms": a.revoked_ms, "tunnel": n in server.tunnels}
        for n, a in sorted(admissions.nodes.items())
    ]
    return web.json_response({
        "object": "list", "data": data, "relay": request.app[keys.settings_key].relay,
        "tunnels": sorted(server.tunnels), "active_streams": server.active_streams, "relayed_bytes": server.relayed_bytes,
    })


def add_routes(app: web.Application, peer_app: web.Application) -> None:
    """Mount the join, invite and admission routes."""
    peer_app.router.add_post("/join", _join_route)  # the peer sub-app, mounted at PEER_PATH
    app.router.add_post("/v1/invites", _create_invite)
    app.router.add_post("/v1/join", _join_user)
    app.router.add_get("/v1/admissions", _admissions)
    app.router.add_post("/v1/admissions/{node_id}/revoke", _revoke)
