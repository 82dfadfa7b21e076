"""Opening the node's SQLite state: caches are moved aside and rebuilt when corrupt; the ledger stops start-up with one clear line."""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from node.errors import NodeError

log = logging.getLogger(__name__)


class StateFileError(NodeError):
    """A state file the node cannot rebuild is unreadable."""


def _connect(path: Path, statements: Sequence[str]) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        for statement in statements:
            db.execute(statement)
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def open_cache_db(path: Path, statements: Sequence[str]) -> sqlite3.Connection:
    """Open a database that only caches what the network tells again; a corrupt one is moved aside and rebuilt."""
    path = Path(path)
    try:
        return _connect(path, statements)
    except sqlite3.DatabaseError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{path}{suffix}")
            if part.exists():
                part.rename(f"{aside}{suffix}")
        log.warning("%s was unreadable (%s): moved it to %s and started an empty one", path, exc, aside)
        return _connect(path, statements)


def corrupt_ledger(path: Path, exc: Exception) -> StateFileError:
    """The one-line error for a decision ledger that cannot be opened (it holds ratings: never discarded silently)."""
    return StateFileError(
        f"the decision ledger {path} is unreadable ({exc}); move it aside to start a new one, "
        "or restore it from a backup"
    )


def write_private_atomically(path: Path, data: bytes) -> None:
    """Write a mode-0600 file so that a crash leaves either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must reach the disk too
    finally:
        os.close(dir_fd)
