"""The embedded default :class:`~tlsmitm.StateStore`: one SQLite file in the state directory.

Theory of operation
-------------------

* **Durability, chosen per namespace.** The database runs in WAL mode. Every write is a single
  auto-committed statement (or one ``BEGIN IMMEDIATE`` transaction for :meth:`SqliteStore.evict`),
  so any write that has returned survives ``kill -9`` of the process. Against a power cut or an
  OS crash it depends on ``synchronous``, which SQLite sets per connection, so the store keeps
  two pools: writes that *add* state in a namespace of :data:`DURABLE_NAMESPACES` (HSTS
  knowledge) and every ``delete`` and ``evict`` (they withdraw permission: a revoked override must
  stay revoked) run with ``synchronous=FULL``, which fsyncs the log before the commit returns;
  the other namespaces (pages, spent nonces, override grants, learned bypasses) run with
  ``synchronous=NORMAL``, whose last commits may be lost to a power cut but never corrupt the
  file. ``docs/hsts.rst`` explains the choice for each namespace. A writer killed in the
  middle of a transaction leaves an uncommitted tail in the WAL, which SQLite discards on the
  next open: the store is never half-written.
* **Several processes, several threads.** Each operation borrows a connection from a small pool
  (one per concurrently active thread), so WAL readers never wait for a writer's ``fsync``.
  Writers from other threads or processes queue on SQLite's lock for up to ``timeout`` seconds
  (``busy_timeout``), then fail with a :class:`~tlsmitm.ConfigurationError`.
* **Corruption is loud.** Opening runs ``PRAGMA integrity_check``. A file that is not a database, or
  fails the check, is renamed to ``<name>.corrupt-<n>`` (with its ``-wal`` and ``-shm`` companions,
  so a stale log can never be replayed into a fresh database) and the constructor raises
  :class:`~tlsmitm.ConfigurationError` with ``reason="corrupt_state"`` saying what was moved
  where. It does *not* quietly start afresh in the same call: the caller decides. A later
  ``SqliteStore(path)`` finds no file and creates an empty store.
* **Permissions.** The directory is created ``0700`` and the file ``0600`` (SQLite gives its
  ``-wal`` and ``-shm`` files the same mode as the database).

This module is the one edge where :mod:`sqlite3` exceptions are mapped into tlsmitm's tree.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from ._errors import ConfigurationError
from ._store import StoredItem

__all__ = ["DURABLE_NAMESPACES", "SqliteStore"]

#: Namespaces whose new entries are fsynced before ``put`` returns (``synchronous=FULL``).
#: Losing the last HSTS entry to a power cut would let a user be offered an override for a host
#: that asked never to be overridden (RFC 6797 §12.1) until it is visited again: a safety loss.
#: Losing a page, a spent nonce, an override grant or a learned bypass costs the user one more
#: click or one more failed connection: a nuisance, not worth an fsync per write.
DURABLE_NAMESPACES: frozenset[str] = frozenset({"hsts"})

_T = TypeVar("_T")

_SCHEMA_VERSION = 1
_MAX_IDLE_CONNECTIONS = 8
# SQLite primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF).
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_CORRUPTION_CODES = frozenset({_SQLITE_CORRUPT, _SQLITE_NOTADB})

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries ("
    " namespace TEXT NOT NULL,"
    " key TEXT NOT NULL,"
    " value BLOB NOT NULL,"
    " expires REAL NOT NULL,"
    " PRIMARY KEY (namespace, key)"
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS entries_by_expiry ON entries (namespace, expires)",
)


def _error_code(exc: sqlite3.Error) -> int:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else -1


class SqliteStore:
    """A :class:`~tlsmitm.StateStore` in one SQLite file, shared safely by threads and processes.

    Args:
        path: the database file, normally ``<state dir>/state.sqlite3``. Missing parent
            directories are created (mode ``0700``), a missing file is created (mode ``0600``).
        timeout: how long (seconds) to wait for another writer's lock before failing.
        durable_namespaces: namespaces whose ``put`` is fsynced before it returns (see the
            module's theory of operation); deletes and evictions always are.

    Raises:
        ConfigurationError: ``reason="corrupt_state"`` when the file is damaged (it has been moved
            aside; the message says where), ``"state_schema"`` when it was written by a newer
            tlsmitm, ``"state_store"`` when it cannot be created or opened at all.
    """

    def __init__(
        self,
        path: Path,
        *,
        timeout: float = 5.0,
        durable_namespaces: frozenset[str] = DURABLE_NAMESPACES,
    ) -> None:
        if not (timeout >= 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a finite number of seconds >= 0, not {timeout!r}")
        self._path = Path(path)
        self._timeout = float(timeout)
        self._durable_namespaces = frozenset(durable_namespaces)
        self._lock = threading.Lock()
        # Idle connections by durability: True = synchronous=FULL, False = NORMAL.
        self._idle: dict[bool, list[sqlite3.Connection]] = {True: [], False: []}
        self._closed = False
        self._prepare_file()
        self._idle[True].append(self._open_checked())

    # -- opening -----------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def _prepare_file(self) -> None:
        try:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the state store {self._path}: {exc.strerror or exc}; make its "
                "directory writable by this user or choose another state directory",
                reason="state_store",
            ) from exc
        os.close(fd)

    def _connect(self, durable: bool) -> sqlite3.Connection:
        conn = self._raw_connect()
        try:
            self._configure(conn, durable=durable)
        except BaseException:
            conn.close()
            raise
        return conn

    def _raw_connect(self) -> sqlite3.Connection:
        return sqlite3.connect(
            self._path,
            timeout=self._timeout,
            isolation_level=None,  # autocommit: each statement is its own durable transaction
            check_same_thread=False,  # the pool hands connections between threads, one at a time
        )

    def _configure(self, conn: sqlite3.Connection, *, durable: bool = True) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
        # WAL + FULL: the log is fsynced at every commit (durable against a power cut). WAL +
        # NORMAL: fsynced only at checkpoints; a commit survives the process dying, and the file
        # is never corrupted, but the last commits may be lost to a power cut.
        conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")

    def _open_checked(self) -> sqlite3.Connection:
        """Open the first connection: WAL, integrity check, schema. Moves a corrupt file aside."""
        self._check_header()
        try:
            conn = self._raw_connect()
        except sqlite3.Error as exc:
            raise self._map_error(exc, "open") from exc
        try:
            self._configure(conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigurationError(
                    f"the state store {self._path} cannot use write-ahead logging (journal mode "
                    f"{mode!r}); put the state directory on a local file system",
                    reason="state_store",
                )
            problems = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                # Move aside *before* closing: closing the last connection would checkpoint
                # and delete the WAL, destroying evidence.
                error = self._quarantine("; ".join(problems[:3]))
                conn.close()
                raise error
            self._ensure_schema(conn)
        except sqlite3.Error as exc:
            if _error_code(exc) in _CORRUPTION_CODES:
                error = self._quarantine(str(exc))
                conn.close()
                raise error from exc
            conn.close()
            raise self._map_error(exc, "open") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_header(self) -> None:
        """Refuse a non-empty file that is not SQLite before SQLite touches it or its WAL."""
        try:
            with open(self._path, "rb") as file:
                header = file.read(16)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the state store {self._path}: {exc.strerror or exc}; check its "
                "permissions",
                reason="state_store",
            ) from exc
        if header and header != b"SQLite format 3\x00":
            raise self._quarantine("not an SQLite database")

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise ConfigurationError(
                f"the state store {self._path} was written by a newer tlsmitm (schema "
                f"{version}, this one understands {_SCHEMA_VERSION}); upgrade tlsmitm or use "
                "another state directory",
                reason="state_schema",
            )
        if version == _SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def _quarantine(self, why: str) -> ConfigurationError:
        """Move the damaged database and its WAL/SHM companions aside; return the error to raise."""
        n = 1
        while any(
            self._path.with_name(f"{self._path.name}.corrupt-{n}{suffix}").exists()
            for suffix in ("", "-wal", "-shm")
        ):
            n += 1
        target = self._path.with_name(f"{self._path.name}.corrupt-{n}")
        moved: list[str] = []
        failed: list[str] = []
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self._path}{suffix}")
            try:
                source.rename(f"{target}{suffix}")
            except FileNotFoundError:
                continue
            except OSError as exc:
                failed.append(f"{source.name} ({exc.strerror or exc})")
                continue
            moved.append(f"{source.name} -> {target.name}{suffix}")
        if failed:
            return ConfigurationError(
                f"the state store {self._path} is corrupted ({why}) and could not be moved "
                f"aside: {', '.join(failed)}; move or delete it by hand (restore a backup if you "
                "have one), then start again",
                reason="corrupt_state",
            )
        return ConfigurationError(
            f"the state store {self._path} is corrupted ({why}); moved it aside "
            f"({', '.join(moved) or 'nothing to move'}) in {self._path.parent}. Its learned state "
            "(HSTS hosts, bypasses, overrides) is not loaded; open the store again to start an "
            "empty one, or restore a backup to that path first",
            reason="corrupt_state",
        )

    def _map_error(self, exc: sqlite3.Error, doing: str) -> ConfigurationError:
        code = _error_code(exc)
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return ConfigurationError(
                f"the state store {self._path} stayed locked by another writer for more than "
                f"{self._timeout:g} s during {doing}; raise the timeout or reduce the number of "
                "processes sharing it",
                reason="state_busy",
            )
        if code in _CORRUPTION_CODES:
            return ConfigurationError(
                f"the state store {self._path} is corrupted ({exc}); restart so that it is moved "
                "aside and a fresh store is created",
                reason="corrupt_state",
            )
        return ConfigurationError(
            f"the state store {self._path} failed during {doing}: {exc}; check that the file "
            "and its directory are writable and the disk is not full",
            reason="state_store",
        )

    # -- connection pool -----------------------------------------------------------------------

    def _run(
        self,
        doing: str,
        operation: Callable[[sqlite3.Connection], _T],
        *,
        durable: bool = True,
    ) -> _T:
        with self._lock:
            if self._closed:
                raise ConfigurationError(
                    f"the state store {self._path} is closed; open a new SqliteStore",
                    reason="store_closed",
                )
            pool = self._idle[durable]
            conn = pool.pop() if pool else None
        if conn is None:
            try:
                conn = self._connect(durable)
            except sqlite3.Error as exc:
                raise self._map_error(exc, doing) from exc
        try:
            return operation(conn)
        except sqlite3.Error as exc:
            raise self._map_error(exc, doing) from exc
        finally:
            self._release(conn, durable)

    def _release(self, conn: sqlite3.Connection, durable: bool) -> None:
        with self._lock:
            pool = self._idle[durable]
            if not self._closed and len(pool) < _MAX_IDLE_CONNECTIONS:
                pool.append(conn)
                return
        conn.close()

    def check_writable(self) -> str | None:
        """``None`` when the store accepts writes, else why not, in one line saying what to do.

        Writes nothing: it starts a write transaction and rolls it back. A file that is
        read-only for this user opens and reads fine, then fails every write; ``serve`` calls
        this at start so that the deployer hears about it at once, not at the first HSTS header.
        """

        def operation(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM entries WHERE namespace = ?", ("\x00probe",))
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")

        try:
            self._run("a write check", operation)
        except ConfigurationError as exc:
            cause = exc.__cause__
            if isinstance(cause, sqlite3.Error) and _error_code(cause) == _SQLITE_READONLY:
                return (
                    f"the state store {self._path} is read-only for this user; what is learned "
                    "now (HSTS hosts, overrides, bypasses) is kept in memory only until the "
                    f"process ends. Make it writable (chown/chmod {self._path.name} and its "
                    "directory) or choose another --state-dir"
                )
            return str(exc)
        return None

    def close(self) -> None:
        """Close every idle connection; operations still running close theirs when they end.

        Idempotent. Any later operation raises :class:`~tlsmitm.ConfigurationError`.
        """
        with self._lock:
            self._closed = True
            idle = self._idle[True] + self._idle[False]
            self._idle = {True: [], False: []}
        for conn in idle:
            conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self._path)!r})"

    # -- StateStore ------------------------------------------------------------------------------

    def get(self, namespace: str, key: str) -> StoredItem | None:
        """The entry for ``key``, expired or not; ``None`` if absent."""

        def operation(conn: sqlite3.Connection) -> StoredItem | None:
            row = conn.execute(
                "SELECT value, expires FROM entries WHERE namespace = ? AND key = ?",
                (namespace, key),
            ).fetchone()
            return None if row is None else StoredItem(key=key, value=row[0], expires=row[1])

        return self._run("get", operation)

    def get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, StoredItem]:
        """The entries for those of ``keys`` that are present, in one query.

        An optional extension of :class:`~tlsmitm.StateStore`: :class:`~tlsmitm.HstsStore` uses it,
        when a store has it, to look up every superdomain of a name at once.
        """
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        if len(wanted) > 500:  # far below SQLITE_MAX_VARIABLE_NUMBER; names have <= 127 labels
            result: dict[str, StoredItem] = {}
            for start in range(0, len(wanted), 500):
                result.update(self.get_many(namespace, wanted[start : start + 500]))
            return result
        marks = ",".join("?" * len(wanted))

        def operation(conn: sqlite3.Connection) -> dict[str, StoredItem]:
            rows = conn.execute(
                "SELECT key, value, expires FROM entries "  # noqa: S608 (only "?" marks)
                f"WHERE namespace = ? AND key IN ({marks})",
                (namespace, *wanted),
            ).fetchall()
            return {k: StoredItem(key=k, value=v, expires=e) for k, v, e in rows}

        return self._run("get", operation)

    def put(self, namespace: str, key: str, value: bytes, *, expires: float) -> None:
        """Insert or replace the entry for ``key``; durable when this returns."""
        expires = float(expires)
        if math.isnan(expires):
            raise ValueError("expires must be a number of POSIX seconds, not NaN")
        blob = bytes(value)

        def operation(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO entries (namespace, key, value, expires) "
                "VALUES (?, ?, ?, ?)",
                (namespace, key, blob, expires),
            )

        self._run("put", operation, durable=namespace in self._durable_namespaces)

    def add_if_absent(
        self, namespace: str, key: str, value: bytes, *, expires: float, now: float
    ) -> bool:
        """Insert ``key`` unless an unexpired entry holds it; ``True`` when this call inserted.

        Atomic across threads and processes (one ``BEGIN IMMEDIATE`` transaction): of several
        callers racing for one key, exactly one wins. Single-use nonces rely on it.
        """
        expires = float(expires)
        if math.isnan(expires):
            raise ValueError("expires must be a number of POSIX seconds, not NaN")
        blob = bytes(value)

        def operation(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "DELETE FROM entries WHERE namespace = ? AND key = ? AND expires <= ?",
                    (namespace, key, float(now)),
                )
                added = conn.execute(
                    "INSERT OR IGNORE INTO entries (namespace, key, value, expires) "
                    "VALUES (?, ?, ?, ?)",
                    (namespace, key, blob, expires),
                ).rowcount
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            return added == 1

        return self._run("put", operation, durable=namespace in self._durable_namespaces)

    def delete(self, namespace: str, key: str) -> None:
        """Remove the entry for ``key`` if present; durable when this returns."""

        def operation(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM entries WHERE namespace = ? AND key = ?", (namespace, key))

        self._run("delete", operation)  # durable: a delete withdraws permission

    def items(self, namespace: str) -> Iterator[StoredItem]:
        """Every entry in ``namespace``, as a snapshot taken when called."""

        def operation(conn: sqlite3.Connection) -> list[StoredItem]:
            rows = conn.execute(
                "SELECT key, value, expires FROM entries WHERE namespace = ?", (namespace,)
            ).fetchall()
            return [StoredItem(key=k, value=v, expires=e) for k, v, e in rows]

        return iter(self._run("items", operation))

    def evict(self, namespace: str, *, now: float, keep: int) -> int:
        """Drop expired entries, then the soonest-expiring ones until at most ``keep`` remain.

        One transaction: a crash in the middle removes nothing. Returns the number removed.
        """
        now = float(now)
        keep = max(int(keep), 0)

        def operation(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                removed = conn.execute(
                    "DELETE FROM entries WHERE namespace = ? AND expires <= ?", (namespace, now)
                ).rowcount
                (count,) = conn.execute(
                    "SELECT COUNT(*) FROM entries WHERE namespace = ?", (namespace,)
                ).fetchone()
                if count > keep:
                    removed += conn.execute(
                        "DELETE FROM entries WHERE namespace = ? AND key IN ("
                        " SELECT key FROM entries WHERE namespace = ?"
                        " ORDER BY expires, key LIMIT ?)",
                        (namespace, namespace, count - keep),
                    ).rowcount
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            return int(removed)

        return self._run("evict", operation)
