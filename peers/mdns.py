"""mDNS / DNS-SD: advertise this node on the LAN and report the peers found there as events."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Literal, TypeAlias

from zeroconf import (
    InterfaceChoice,
    InterfacesType,
    IPVersion,
    NonUniqueNameException,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
    get_all_addresses,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_expertmesh._tcp.local."
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})
DEFAULT_URL_PATH = "/peer/v1"
DEFAULT_MAX_SERVICES = 256
DEFAULT_RESOLVE_TIMEOUT_S = 3.0

# Lowercase only: DNS compares names case-insensitively, node ids are compared exactly.
_NODE_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_TOKEN = re.compile(r"[\x21-\x7e]{1,128}", re.ASCII)
_URL_PATH = re.compile(r"/[\x21-\x7e]{0,127}", re.ASCII)
_VERSION = re.compile(r"[0-9]{1,4}", re.ASCII)
_INSTANCE_SUFFIX = "." + SERVICE_TYPE
_MAX_URLS = 16

Interfaces: TypeAlias = Sequence[str] | Literal["all"]
IpAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


class MdnsError(Exception):
    """mDNS could not start or advertise, or the service was used after close."""


@dataclass(frozen=True, kw_only=True)
class Advertisement:
    """What this node publishes: instance name, peer API port, addresses and TXT."""

    node_id: str
    port: int
    card_digest: str
    addresses: Sequence[str] = ()
    url_path: str = DEFAULT_URL_PATH

    def __post_init__(self) -> None:
        if not _NODE_ID.fullmatch(self.node_id):
            raise ValueError(f"node id is not a lowercase DNS label: {self.node_id!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if not _TOKEN.fullmatch(self.card_digest):
            raise ValueError(f"card digest must be 1-128 printable ASCII characters: {self.card_digest!r}")
        if not _URL_PATH.fullmatch(self.url_path):
            raise ValueError(f"url path must start with '/' and be printable ASCII: {self.url_path!r}")
        normalized = tuple(str(ipaddress.ip_address(a)) for a in self.addresses)
        object.__setattr__(self, "addresses", normalized)

    @property
    def instance_name(self) -> str:
        """The DNS-SD service instance name, `<node_id>._expertmesh._tcp.local.`."""
        return self.node_id + _INSTANCE_SUFFIX

    def txt(self) -> dict[str, str]:
        """The TXT record's key/value pairs."""
        return {"id": self.node_id, "v": str(PROTOCOL_VERSION), "card": self.card_digest, "path": self.url_path}


@dataclass(frozen=True)
class PeerFound:
    """A peer's service appeared or changed; `urls` are `http://host:port` bases of its peer API."""

    node_id: str
    urls: tuple[str, ...]
    card_digest: str
    protocol_version: int
    url_path: str = DEFAULT_URL_PATH


@dataclass(frozen=True)
class PeerGone:
    """A peer's service said goodbye or expired."""

    node_id: str


MdnsEvent: TypeAlias = PeerFound | PeerGone
EventSink: TypeAlias = Callable[[MdnsEvent], None] | asyncio.Queue[MdnsEvent]


def peer_from_service(
    name: str, port: int | None, addresses: Sequence[IpAddress], properties: Mapping[bytes, bytes | None]
) -> PeerFound | None:
    """The PeerFound a resolved service describes, or None (logged at debug) when it is unusable."""
    node_id = _node_id_from_name(name)
    if node_id is None:
        log.debug("ignoring %r: instance name is not a node id", name)
        return None
    txt = _decode_txt(properties)
    if txt is None or txt.get("id") != node_id:
        log.debug("ignoring %r: malformed TXT %r", name, properties)
        return None
    version, card, path = txt.get("v", ""), txt.get("card", ""), txt.get("path", DEFAULT_URL_PATH)
    if not _VERSION.fullmatch(version) or not _TOKEN.fullmatch(card) or not _URL_PATH.fullmatch(path):
        log.debug("ignoring %r: malformed TXT %r", name, txt)
        return None
    if int(version) not in SUPPORTED_VERSIONS:
        log.debug("ignoring %r: unsupported protocol version %s", name, version)
        return None
    if port is None or not 1 <= port <= 65535:
        log.debug("ignoring %r: bad port %r", name, port)
        return None
    urls = _urls(addresses, port)
    if not urls:
        log.debug("ignoring %r: no usable address in %r", name, addresses)
        return None
    return PeerFound(node_id=node_id, urls=urls, card_digest=card, protocol_version=int(version), url_path=path)


def _node_id_from_name(name: str) -> str | None:
    if not name.lower().endswith(_INSTANCE_SUFFIX.lower()):
        return None
    label = name[: -len(_INSTANCE_SUFFIX)]
    return label if _NODE_ID.fullmatch(label) else None


def _decode_txt(properties: Mapping[bytes, bytes | None]) -> dict[str, str] | None:
    try:
        return {k.decode("ascii"): v.decode("ascii") for k, v in properties.items() if v is not None}
    except UnicodeDecodeError:
        return None


def _urls(addresses: Sequence[IpAddress], port: int) -> tuple[str, ...]:
    urls: list[str] = []
    for address in addresses:
        # Link-local IPv6 needs a zone id that means nothing on the receiving host's side of a URL.
        if address.is_unspecified or address.is_multicast or (address.version == 6 and address.is_link_local):
            continue
        host = str(address) if address.version == 4 else f"[{ipaddress.IPv6Address(address.packed)}]"
        url = f"http://{host}:{port}"
        if url not in urls:
            urls.append(url)
    return tuple(urls[:_MAX_URLS])


def _interface_choice(interfaces: Interfaces) -> InterfacesType:
    return InterfaceChoice.All if interfaces == "all" else list(interfaces)


def _published_addresses(interfaces: Interfaces) -> list[str]:
    """Addresses to put in A records when the advertisement names none: those mDNS is bound to."""
    if interfaces != "all":
        return list(interfaces)
    found = get_all_addresses()
    routable = [a for a in found if not ipaddress.ip_address(a).is_loopback]
    return routable or found


def _service_info(advertisement: Advertisement, addresses: Sequence[str]) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        advertisement.instance_name,
        port=advertisement.port,
        properties=advertisement.txt(),
        server=f"{advertisement.node_id}.local.",
        parsed_addresses=list(addresses),
    )


class MdnsService:
    """Advertises one node over mDNS and reports the other nodes it browses as PeerFound / PeerGone."""

    def __init__(
        self,
        advertisement: Advertisement,
        on_event: EventSink,
        *,
        interfaces: Interfaces = "all",
        max_services: int = DEFAULT_MAX_SERVICES,
        resolve_timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S,
    ) -> None:
        if isinstance(interfaces, str) and interfaces != "all":
            raise ValueError(f"interfaces must be 'all' or a list of IP addresses, not {interfaces!r}")
        for address in [] if interfaces == "all" else interfaces:
            ipaddress.ip_address(address)
        if max_services < 1:
            raise ValueError(f"max_services must be positive: {max_services}")
        self._advertisement = advertisement
        self._on_event = on_event
        self._interfaces: Interfaces = "all" if interfaces == "all" else tuple(interfaces)
        self._max_services = max_services
        self._resolve_timeout_ms = resolve_timeout_s * 1000
        self._lock = asyncio.Lock()
        self._closed = False
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._addresses: list[str] = []
        # Keyed by lowercased instance name; None while a first resolution is in flight.
        self._tracked: dict[str, PeerFound | None] = {}
        self._resolving: dict[str, asyncio.Task[None]] = {}

    @property
    def advertisement(self) -> Advertisement:
        """What this service currently publishes."""
        return self._advertisement

    async def __aenter__(self) -> MdnsService:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the mDNS sockets, browse for peers and register (probe + announce) this node."""
        async with self._lock:
            if self._closed:
                raise MdnsError("mDNS service is closed")
            if self._zc is not None:
                raise MdnsError("mDNS service already started")
            try:
                await self._open()
            except (NonUniqueNameException, OSError) as exc:
                await self._shutdown()
                raise MdnsError(f"cannot advertise {self._advertisement.instance_name}: {exc!r}") from exc
            except BaseException:
                await self._shutdown()
                raise

    async def update(self, card_digest: str) -> None:
        """Publish a new card digest; peers see it as a PeerFound with the new digest."""
        async with self._lock:
            if self._closed:
                raise MdnsError("mDNS service is closed")
            self._advertisement = dataclasses.replace(self._advertisement, card_digest=card_digest)
            if self._zc is None:
                return
            info = _service_info(self._advertisement, self._addresses)
            announced = await self._zc.async_update_service(info)
            self._info = info
            await announced

    async def close(self) -> None:
        """Say goodbye, stop browsing and resolving, close the sockets; safe to call twice."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            await self._shutdown()

    async def _open(self) -> None:
        addresses = list(self._advertisement.addresses)
        if not addresses:
            addresses = await asyncio.to_thread(_published_addresses, self._interfaces)
        self._addresses = addresses
        zc = self._zc = AsyncZeroconf(interfaces=_interface_choice(self._interfaces))
        self._browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_state_change])
        info = _service_info(self._advertisement, addresses)
        announced = await zc.async_register_service(info)
        self._info = info
        await announced
        log.info("advertising %s on %s", info.name, addresses)

    async def _shutdown(self) -> None:
        zc, browser, info = self._zc, self._browser, self._info
        self._zc, self._browser, self._info = None, None, None
        if browser is not None:
            await browser.async_cancel()
        tasks = list(self._resolving.values())
        self._resolving.clear()
        self._tracked.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if zc is None:
            return
        if info is not None:
            await (await zc.async_unregister_service(info))
        await zc.async_close()

    def _on_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if self._zc is None:
            return
        if name.lower() == self._advertisement.instance_name:
            return
        key = name.lower()
        if state_change is ServiceStateChange.Removed:
            self._cancel_resolve(key)
            self._drop(key)
            return
        # A flood of distinct instance names must not grow memory or tasks without bound.
        if key not in self._tracked and len(self._tracked) >= self._max_services:
            log.debug("ignoring %r: already tracking %d services", name, len(self._tracked))
            return
        self._tracked.setdefault(key, None)
        self._cancel_resolve(key)
        task = asyncio.create_task(self._resolve(zeroconf, key, name), name=f"mdns-resolve {name}")
        self._resolving[key] = task
        task.add_done_callback(partial(self._resolve_done, key))

    async def _resolve(self, zeroconf: Zeroconf, key: str, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zeroconf, self._resolve_timeout_ms):
            log.debug("no answer resolving %r", name)
            if self._tracked.get(key) is None:
                self._tracked.pop(key, None)
            return
        addresses = info.ip_addresses_by_version(IPVersion.All)
        peer = peer_from_service(name, info.port, addresses, info.properties)
        if peer is None:
            self._drop(key)
            return
        previous = self._tracked.get(key)
        self._tracked[key] = peer
        if peer != previous:
            self._emit(peer)

    def _resolve_done(self, key: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(key) is task:
            del self._resolving[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("resolving %s failed", key, exc_info=task.exception())

    def _cancel_resolve(self, key: str) -> None:
        task = self._resolving.pop(key, None)
        if task is not None:
            task.cancel()

    def _drop(self, key: str) -> None:
        previous = self._tracked.pop(key, None)
        if previous is not None:
            self._emit(PeerGone(node_id=previous.node_id))

    def _emit(self, event: MdnsEvent) -> None:
        if isinstance(self._on_event, asyncio.Queue):
            try:
                self._on_event.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("mDNS event queue full, dropped %s", event)
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("mDNS event callback failed on %s", event)
