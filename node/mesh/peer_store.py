"""Known peers remembered across restarts, in the node's SQLite database."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peers.identity import NodeId

_SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    url TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    source TEXT NOT NULL,
    last_seen_ms INTEGER NOT NULL
)
"""
MAX_REMEMBERED = 256


@dataclass(frozen=True)
class RememberedPeer:
    """A peer address that answered a hello before."""

    url: str
    node_id: NodeId
    source: str
    last_seen_ms: int


class PeerStore:
    """Peer addresses that were verified once; blocking calls, run them off the loop."""

    def __init__(self, path: Path) -> None:
        from node.state_files import open_cache_db

        self._db = open_cache_db(path, (_SCHEMA,))

    def load(self) -> list[RememberedPeer]:
        """Every remembered peer, most recently seen first."""
        rows = self._db.execute(
            "SELECT url, node_id, source, last_seen_ms FROM peers ORDER BY last_seen_ms DESC LIMIT ?", (MAX_REMEMBERED,)
        ).fetchall()
        return [RememberedPeer(*row) for row in rows]

    def remember(self, peer: RememberedPeer) -> None:
        """Insert or refresh a verified peer address, keeping the table bounded."""
        with self._db:
            self._db.execute(
                "INSERT INTO peers (url, node_id, source, last_seen_ms) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(url) DO UPDATE SET node_id=excluded.node_id, last_seen_ms=excluded.last_seen_ms",
                (peer.url, peer.node_id, peer.source, peer.last_seen_ms),
            )
            self._db.execute(
                "DELETE FROM peers WHERE url NOT IN (SELECT url FROM peers ORDER BY last_seen_ms DESC LIMIT ?)",
                (MAX_REMEMBERED,),
            )

    def forget_older_than(self, cutoff_ms: int) -> None:
        """Drop peers not seen since `cutoff_ms`."""
        with self._db:
            self._db.execute("DELETE FROM peers WHERE last_seen_ms < ?", (cutoff_ms,))

    def close(self) -> None:
        """Close the database."""
        self._db.close()
