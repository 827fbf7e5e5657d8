"""SqliteStore: the StateStore contract, durability, corruption handling, sharing."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlsmitm._errors import ConfigurationError
from tlsmitm._sqlite_store import SqliteStore
from tlsmitm._store import MemoryStore, StateStore, StoredItem

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.sqlite3"


@pytest.fixture(params=["memory", "sqlite"])
def any_store(request: pytest.FixtureRequest, db: Path) -> Iterator[StateStore]:
    if request.param == "memory":
        yield MemoryStore()
    else:
        store = SqliteStore(db)
        yield store
        store.close()


# --- the StateStore contract, identical for MemoryStore and SqliteStore ----------------------


def test_is_a_state_store(db: Path) -> None:
    with SqliteStore(db) as store:
        assert isinstance(store, StateStore)


def test_get_put_delete(any_store: StateStore) -> None:
    assert any_store.get("ns", "k") is None
    any_store.put("ns", "k", b"v1", expires=10.5)
    assert any_store.get("ns", "k") == StoredItem(key="k", value=b"v1", expires=10.5)
    any_store.put("ns", "k", bytearray(b"v2"), expires=20)  # type: ignore[arg-type]
    item = any_store.get("ns", "k")
    assert item == StoredItem(key="k", value=b"v2", expires=20.0)
    assert item is not None
    assert type(item.value) is bytes
    assert any_store.get("other", "k") is None  # namespaces are separate
    any_store.delete("ns", "k")
    any_store.delete("ns", "k")  # absent: no error
    assert any_store.get("ns", "k") is None


def test_expired_entries_are_still_returned_by_get(any_store: StateStore) -> None:
    any_store.put("ns", "old", b"x", expires=-5.0)
    assert any_store.get("ns", "old") == StoredItem(key="old", value=b"x", expires=-5.0)


def test_items(any_store: StateStore) -> None:
    for i in range(5):
        any_store.put("ns", f"k{i}", bytes([i]), expires=float(i))
    any_store.put("other", "x", b"", expires=1.0)
    items = sorted(any_store.items("ns"), key=lambda item: item.key)
    assert items == [StoredItem(key=f"k{i}", value=bytes([i]), expires=float(i)) for i in range(5)]
    assert list(any_store.items("empty")) == []


def test_evict(any_store: StateStore) -> None:
    for i in range(10):
        any_store.put("ns", f"k{i}", b"", expires=100.0 + i)
    any_store.put("other", "keep", b"", expires=0.0)
    # k0..k2 expired at now=102.0 (expires <= now); then the soonest-expiring until 4 remain.
    assert any_store.evict("ns", now=102.0, keep=4) == 6
    assert sorted(item.key for item in any_store.items("ns")) == ["k6", "k7", "k8", "k9"]
    assert any_store.evict("ns", now=0.0, keep=4) == 0
    assert any_store.evict("ns", now=0.0, keep=-3) == 4
    assert any_store.get("other", "keep") is not None


def test_unicode_keys_and_binary_values(any_store: StateStore) -> None:
    any_store.put("ns", "bücher.example\u20ac", b"\x00\xff" * 100, expires=float("inf"))
    item = any_store.get("ns", "bücher.example\u20ac")
    assert item is not None
    assert item.value == b"\x00\xff" * 100
    assert item.expires == float("inf")


# --- SqliteStore specifics ---------------------------------------------------------------------


def test_get_many(db: Path) -> None:
    with SqliteStore(db) as store:
        for i in range(600):
            store.put("ns", f"k{i}", str(i).encode(), expires=1.0)
        assert store.get_many("ns", []) == {}
        got = store.get_many("ns", ["k1", "k1", "missing", "k2"])
        assert got == {
            "k1": StoredItem(key="k1", value=b"1", expires=1.0),
            "k2": StoredItem(key="k2", value=b"2", expires=1.0),
        }
        everything = store.get_many("ns", [f"k{i}" for i in range(700)])  # > 500: in chunks
        assert len(everything) == 600


def test_file_and_directory_permissions(db: Path) -> None:
    with SqliteStore(db) as store:
        store.put("ns", "k", b"v", expires=1.0)
        assert stat.S_IMODE(db.stat().st_mode) == 0o600
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
        wal = Path(f"{db}-wal")
        assert wal.exists()
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600


def test_wal_and_synchronous_chosen_per_namespace(db: Path) -> None:
    with SqliteStore(db) as store:
        store.put("hsts", "k", b"v", expires=1.0)
        (durable,) = store._idle[True]
        assert durable.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert durable.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert durable.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        assert store._idle[False] == []
        store.put("page", "k", b"v", expires=1.0)
        (relaxed,) = store._idle[False]
        assert relaxed.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert relaxed.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        store.delete("page", "k")  # a delete withdraws permission: always FULL
        assert len(store._idle[True]) == 1
        assert store.get("page", "k") is None


def test_add_if_absent_one_winner_across_threads(db: Path) -> None:
    with SqliteStore(db) as store:
        winners: list[int] = []
        barrier = threading.Barrier(6)

        def race(n: int) -> None:
            barrier.wait()
            if store.add_if_absent("nonce", "n", b"spent", expires=100.0, now=10.0):
                winners.append(n)

        threads = [threading.Thread(target=race, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(winners) == 1
        assert not store.add_if_absent("nonce", "n", b"x", expires=200.0, now=99.0)
        assert store.add_if_absent("nonce", "n", b"x", expires=200.0, now=100.0)  # expired


def make_read_only(path: Path) -> None:
    """Read-only for this process: chmod for a user, the immutable flag for root."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o444)


def undo_read_only(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o600)


def test_check_writable_names_a_read_only_file_and_what_to_do(db: Path) -> None:
    with SqliteStore(db) as store:
        store.put("hsts", "k", b"v", expires=1.0)
        assert store.check_writable() is None
    make_read_only(db)
    try:
        with SqliteStore(db) as store:
            problem = store.check_writable()
            assert problem is not None
            assert "read-only" in problem
            assert "--state-dir" in problem
            assert store.get("hsts", "k") is not None  # reads still work
            with pytest.raises(ConfigurationError):
                store.put("hsts", "k2", b"v", expires=1.0)
    finally:
        undo_read_only(db)


def test_persistence_across_reopen(db: Path) -> None:
    with SqliteStore(db) as store:
        store.put("ns", "k", b"v", expires=7.0)
    with SqliteStore(db) as store:
        assert store.get("ns", "k") == StoredItem(key="k", value=b"v", expires=7.0)


def test_closed_store_refuses_work(db: Path) -> None:
    store = SqliteStore(db)
    store.close()
    store.close()  # idempotent
    with pytest.raises(ConfigurationError, match="closed") as info:
        store.get("ns", "k")
    assert info.value.reason == "store_closed"
    assert repr(store) == f"SqliteStore({str(db)!r})"
    assert store.path == db


def test_bad_arguments(db: Path) -> None:
    with pytest.raises(ValueError, match="timeout"):
        SqliteStore(db, timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        SqliteStore(db, timeout=float("nan"))
    with SqliteStore(db) as store, pytest.raises(ValueError, match="NaN"):
        store.put("ns", "k", b"", expires=float("nan"))


def test_uncreatable_location_is_a_configuration_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigurationError, match="cannot create") as info:
        SqliteStore(blocker / "sub" / "state.sqlite3")
    assert info.value.reason == "state_store"


def test_busy_writer_times_out_with_a_clear_error(db: Path) -> None:
    with SqliteStore(db, timeout=0.2) as store:
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(ConfigurationError, match="locked") as info:
                store.put("ns", "k", b"", expires=1.0)
            assert info.value.reason == "state_busy"
            assert store.get("ns", "k") is None  # WAL readers are not blocked by the writer
        finally:
            other.execute("ROLLBACK")
            other.close()
        store.put("ns", "k", b"", expires=1.0)


def test_newer_schema_is_refused(db: Path) -> None:
    SqliteStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ConfigurationError, match="newer tlsmitm") as info:
        SqliteStore(db)
    assert info.value.reason == "state_schema"
    assert db.exists()  # not moved: it is not corrupt


# --- corruption --------------------------------------------------------------------------------


def test_garbage_file_is_moved_aside_not_emptied(db: Path) -> None:
    db.parent.mkdir(mode=0o700)
    garbage = b"this is not an SQLite database, it is a text file\n" * 100
    db.write_bytes(garbage)
    Path(f"{db}-wal").write_bytes(b"stale log")
    with pytest.raises(ConfigurationError) as info:
        SqliteStore(db)
    assert info.value.reason == "corrupt_state"
    moved = db.with_name("state.sqlite3.corrupt-1")
    assert str(moved.name) in str(info.value)
    assert moved.read_bytes() == garbage  # the evidence is kept intact
    assert Path(f"{moved}-wal").read_bytes() == b"stale log"
    assert not db.exists()
    assert not Path(f"{db}-wal").exists()
    # A later open starts an empty store; a second corruption gets the next number.
    with SqliteStore(db) as store:
        assert list(store.items("ns")) == []
    db.write_bytes(garbage)
    with pytest.raises(ConfigurationError, match=r"corrupt-2"):
        SqliteStore(db)
    assert moved.exists()


def test_garbage_behind_a_valid_header_is_moved_aside_with_its_log(db: Path) -> None:
    db.parent.mkdir(mode=0o700)
    damaged = b"SQLite format 3\x00" + b"\xa5" * 8000
    db.write_bytes(damaged)
    Path(f"{db}-wal").write_bytes(b"log evidence")
    with pytest.raises(ConfigurationError) as info:
        SqliteStore(db)
    assert info.value.reason == "corrupt_state"
    moved = db.with_name("state.sqlite3.corrupt-1")
    assert moved.read_bytes() == damaged
    assert Path(f"{moved}-wal").read_bytes() == b"log evidence"
    assert not db.exists()


def test_corrupt_file_that_cannot_be_moved_is_reported(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db.parent.mkdir(mode=0o700)
    db.write_bytes(b"garbage" * 10)

    def refuse(self: Path, target: object) -> Path:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "rename", refuse)
    with pytest.raises(ConfigurationError, match="could not be moved aside") as info:
        SqliteStore(db)
    assert info.value.reason == "corrupt_state"
    assert db.read_bytes() == b"garbage" * 10


def test_damaged_pages_are_detected(db: Path) -> None:
    with SqliteStore(db) as store:
        for i in range(2000):
            store.put("ns", f"key-{i:05d}", b"x" * 40, expires=float(i))
    conn = sqlite3.connect(db)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(db.read_bytes())
    assert len(data) > 6 * page_size
    for page in (3, 4, 5):  # b-tree pages: overwrite their headers and cells
        start = page * page_size
        data[start : start + 200] = os.urandom(200)
    db.write_bytes(bytes(data))
    with pytest.raises(ConfigurationError) as info:
        SqliteStore(db)
    assert info.value.reason == "corrupt_state"
    assert db.with_name("state.sqlite3.corrupt-1").exists()


# --- concurrency -------------------------------------------------------------------------------


def test_threads_share_one_store(db: Path) -> None:
    errors: list[BaseException] = []
    with SqliteStore(db) as store:

        def work(n: int) -> None:
            try:
                for i in range(40):
                    store.put("ns", f"t{n}-{i}", b"v", expires=float(i))
                    assert store.get("ns", f"t{n}-{i}") is not None
                store.evict("ns", now=-1.0, keep=10_000)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert sum(1 for _ in store.items("ns")) == 240


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tlsmitm._sqlite_store import SqliteStore
    path, prefix, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    store = SqliteStore(path, timeout=30)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    for i in range(count):
        store.put("ns", f"{prefix}-{i}", f"{prefix}:{i}".encode(), expires=float(i))
        store.put("ns", "shared", prefix.encode(), expires=float(i))
    store.close()
    """
)


def test_two_processes_write_concurrently(db: Path) -> None:
    SqliteStore(db).close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), prefix, "150"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=ENV,
            text=True,
        )
        for prefix in ("a", "b")
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            assert proc.wait(timeout=120) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
    with SqliteStore(db) as store:
        keys = {item.key: item.value for item in store.items("ns")}
    for prefix in ("a", "b"):
        for i in range(150):
            assert keys[f"{prefix}-{i}"] == f"{prefix}:{i}".encode()
    assert keys["shared"] in (b"a", b"b")
    assert len(keys) == 301


CRASHER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tlsmitm._sqlite_store import SqliteStore
    store = SqliteStore(Path(sys.argv[1]))
    big = b"x" * 3000  # several pages per write, so a kill lands inside a commit more often
    i = 0
    while True:
        key = f"k{i}"
        store.put("acked", key, key.encode() + big, expires=float(i))
        print("ack", key, flush=True)  # acknowledged only after put() returned
        if i % 25 == 24:
            for j in range(300):
                store.put("bulk", f"b{i}-{j}", big, expires=0.0)
            print("evicting", f"b{i}", flush=True)
            store.evict("bulk", now=1.0, keep=0)  # one 300-row delete transaction
        i += 1
    """
)


@pytest.mark.parametrize(
    ("kill_on", "count"),
    [("ack", 30), ("ack", 77), ("evicting", 1), ("evicting", 3)],
)
def test_kill_9_mid_write_loses_no_acknowledged_entry(db: Path, kill_on: str, count: int) -> None:
    SqliteStore(db).close()
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(db)], stdout=subprocess.PIPE, env=ENV, text=True
    )
    lines: list[tuple[str, str]] = []
    try:
        assert proc.stdout is not None
        while sum(1 for kind, _ in lines if kind == kill_on) < count:
            line = proc.stdout.readline()
            assert line, "the writer died on its own"
            kind, name = line.split()
            lines.append((kind, name))
        os.kill(proc.pid, signal.SIGKILL)  # mid-put or mid-evict: no chance to clean up
        proc.wait(timeout=30)
        killed_after = len(lines)
        for line in proc.stdout:  # printed before the kill landed
            if not line.endswith("\n"):
                break  # a line the kill cut short: nothing to read from it
            kind, name = line.split()
            lines.append((kind, name))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with SqliteStore(db) as store:  # opens cleanly: the integrity check passes, nothing moved
        stored = {item.key: item.value for item in store.items("acked")}
        bulk = [item.key for item in store.items("bulk")]
    acked = [name for kind, name in lines if kind == "ack"]
    assert len(acked) >= 25
    for key in acked:
        assert stored[key] == key.encode() + b"x" * 3000
    assert not db.with_name("state.sqlite3.corrupt-1").exists()
    if kill_on == "evicting":
        batch = lines[killed_after - 1][1]
        in_batch = sum(1 for key in bulk if key.startswith(batch + "-"))
        if len(lines) == killed_after:  # killed during (or just before) the evict
            assert in_batch in (0, 300)  # one transaction: all rows or none
        else:  # the evict committed before the kill landed
            assert in_batch == 0
