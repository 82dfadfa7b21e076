"""Which learned peer addresses may be dialled: origins only, never loopback unless this node is on loopback."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from peers.relay import parse_relayed_url, relayed_url

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback_name(host: str) -> bool:
    """Whether a host name or address means this machine."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def dialable_origin(url: str, *, allow_loopback: bool) -> str | None:
    """`scheme://host[:port]` of a learned address (or the relay protocol's own address for a node behind a
    relay: a relay origin plus `/peer/v1/relay/<node id>`), or None when it must not be dialled."""
    relayed = parse_relayed_url(url)
    if relayed is not None:
        origin = _origin(relayed.relay_url, allow_loopback=allow_loopback)
        return None if origin is None else relayed_url(origin, relayed.node_id)
    return _origin(url, allow_loopback=allow_loopback)


def _origin(url: str, *, allow_loopback: bool) -> str | None:
    """`scheme://host[:port]` of an address, or None when it must not be dialled.

    A peer only tells us where it is; the path is the protocol's. So anything beyond an origin
    (user info, a path, a query, a fragment) marks an address crafted to make us hit some other
    service, and so does loopback when this node itself is reachable from elsewhere.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or "#" in url or "?" in url:
        return None
    if not allow_loopback and is_loopback_name(parts.hostname):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def is_loopback_host(host: str) -> bool:
    """Whether a bind address only accepts local connections."""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
