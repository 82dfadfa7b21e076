"""Who this node admitted by invite, and whom it revoked: kept in one JSON file in the data dir."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ADMISSIONS_FILE = "admissions.json"
MAX_OPEN_INVITES = 1024


@dataclass
class IssuedInvite:
    """An invite this node handed out, by the hash of its secret."""

    expires_ms: int
    one_time: bool
    relay: bool
    used_by: list[str] = field(default_factory=list)


@dataclass
class Admitted:
    """A node admitted with an invite; `revoked_ms` set once revoked."""

    admitted_ms: int
    revoked_ms: int | None = None


class Admissions:
    """Issued invites and admitted nodes; every change is written to disk before it counts."""

    def __init__(self, data_dir: Path) -> None:
        self._path = Path(data_dir) / ADMISSIONS_FILE
        self._lock = threading.Lock()
        self.invites: dict[str, IssuedInvite] = {}
        self.nodes: dict[str, Admitted] = {}
        if self._path.exists():
            data = json.loads(self._path.read_text())
            self.invites = {k: IssuedInvite(**v) for k, v in data.get("invites", {}).items()}
            self.nodes = {k: Admitted(**v) for k, v in data.get("nodes", {}).items()}

    def _save(self) -> None:
        tmp = self._path.with_name(f".{self._path.name}.tmp")
        tmp.write_text(json.dumps({
            "invites": {k: asdict(v) for k, v in self.invites.items()},
            "nodes": {k: asdict(v) for k, v in self.nodes.items()},
        }))
        os.replace(tmp, self._path)

    def issue(self, digest: str, expires_ms: int, *, one_time: bool, relay: bool, now_ms: int) -> None:
        """Remember an invite's secret hash until it expires."""
        with self._lock:
            self.invites = {k: v for k, v in self.invites.items() if v.expires_ms >= now_ms}
            if len(self.invites) >= MAX_OPEN_INVITES:
                raise ValueError(f"{MAX_OPEN_INVITES} invites are open already; let some expire")
            self.invites[digest] = IssuedInvite(expires_ms, one_time, relay)
            self._save()

    def redeem(self, digest: str, node_id: str, now_ms: int) -> IssuedInvite:
        """Admit `node_id` with the invite whose secret hashes to `digest`; PermissionError when it may not."""
        with self._lock:
            invite = self.invites.get(digest)
            if invite is None or invite.expires_ms < now_ms:
                raise PermissionError("unknown or expired invite")
            known = self.nodes.get(node_id)
            if known is not None and known.revoked_ms is not None:
                raise PermissionError(f"node {node_id} was revoked here")
            if invite.one_time and invite.used_by and invite.used_by != [node_id]:
                raise PermissionError("this one-time invite was used already")
            if node_id not in invite.used_by:
                invite.used_by.append(node_id)
            if known is None:
                self.nodes[node_id] = Admitted(admitted_ms=now_ms)
            self._save()
            return invite

    def is_admitted(self, node_id: str) -> bool:
        """Admitted by invite and not revoked."""
        known = self.nodes.get(node_id)
        return known is not None and known.revoked_ms is None

    def is_revoked(self, node_id: str) -> bool:
        """Revoked here."""
        known = self.nodes.get(node_id)
        return known is not None and known.revoked_ms is not None

    def revoke(self, node_id: str, now_ms: int) -> None:
        """Revoke one node (admitted or not): no relay, no hellos, no invites for it from now on."""
        with self._lock:
            known = self.nodes.get(node_id) or Admitted(admitted_ms=now_ms)
            known.revoked_ms = now_ms
            self.nodes[node_id] = known
            self._save()
        log.warning("revoked node %s", node_id)
