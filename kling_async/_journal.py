"""The batch journal: every item's state in an SQLite file, so a crashed batch resumes.

One row per input index: its fingerprint (so a different input is caught), the
`external_task_id` fixed before its first submit, its state (``pending`` = may have
been sent, ``submitted`` = task id known, ``finished``), and the last task and error.

What a journal guarantees:

- One owner. `Journal.open` takes SQLite's own lock on the file (``locking_mode =
  EXCLUSIVE``, taken at once with ``BEGIN EXCLUSIVE`` and no busy wait) and keeps it until
  `Journal.close`, so a second run on a journal in use, in this process or another, is
  refused before it sends anything (a `ValidationError` naming the file). The lock is the
  operating system's: a run that dies (even ``kill -9``) leaves none behind. Like every
  POSIX lock it is the process's: code in the owning process that opens and closes the
  journal file by other means releases it.
- A durable ``pending`` row. WAL mode with ``synchronous=FULL``: a write returns once it
  is on the disk, so the row saying an item is about to be sent survives even a power
  loss. Exclusive locking mode is set before WAL mode, so no ``-shm`` file is needed.
- A resume looks up before it submits. The batch id (and so every item's external id,
  ``kling-batch-<batch id>-<index>``) is written to the main database file, fsynced,
  before WAL mode is switched on and before any item is sent, so even a copy of the file
  without its ``-wal`` (or an OS crash that lost the rest) keeps it. A journal that
  existed before this open is a resume (`Journal.resumed`): the batch looks every item it
  has not finished up by its external id before a POST, row or no row. A journal this
  open created looks nothing up.

All SQLite work runs on one worker thread, so the event loop never waits on the
disk. Writes are group-committed: every write made while a commit is running joins
the next one, and a writer's ``await`` returns only once its row is committed, so one
fsync serves every writer in it.

A journal also remembers the service it was written against (the client's base URL),
so a rerun against another one says so instead of failing every unfinished row with a
404 for a task that service never saw.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import orjson

from kling_async import errors as errors_module
from kling_async._converter import converter
from kling_async._models import ExtendRequest, Task
from kling_async.errors import (
    KlingError,
    ValidationError,
)

T = TypeVar("T")

SCHEMA_VERSION: Final = "1"
PENDING: Final = "pending"
SUBMITTED: Final = "submitted"
FINISHED: Final = "finished"
#: SQLite's result code for a lock held by another connection (`sqlite3.SQLITE_BUSY`,
#: which Python 3.10 lacks).
_SQLITE_BUSY: Final = 5

_SCHEMA: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE items (
        idx INTEGER PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        external_task_id TEXT NOT NULL,
        state TEXT NOT NULL,
        task TEXT,
        error TEXT,
        updated_at REAL NOT NULL,
        trace TEXT
    )""",
)


def fingerprint(request: ExtendRequest) -> str:
    """A stable digest of a request, to tell whether a rerun's input matches the journal."""
    document = orjson.dumps(converter.unstructure(request), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(document).hexdigest()[:32]


def encode_error(error: KlingError) -> str:
    """An error as JSON: its class, its message and its `KlingError.parts`."""
    message, parts = error.parts()
    document: dict[str, Any] = {"type": type(error).__name__, "message": message}
    for key, value in parts.items():  # tasks are kept as the converter writes them
        if key == "task":
            value = converter.unstructure(value)
        elif key == "steps":
            value = [converter.unstructure(step) for step in value]
        document[key] = value
    return orjson.dumps(document).decode()


def decode_error(text: str) -> KlingError:
    """Rebuild an error stored by `encode_error` (an unknown kind becomes a `KlingError`)."""
    document = orjson.loads(text)
    cls = getattr(errors_module, str(document.pop("type", "")), None)
    message = str(document.pop("message", ""))
    if not (isinstance(cls, type) and issubclass(cls, KlingError)):
        return KlingError(message)
    if "task" in document:
        document["task"] = converter.structure(document["task"], Task)
    if "steps" in document:
        document["steps"] = tuple(converter.structure(step, Task) for step in document["steps"])
    try:
        return cls.rebuild(message, document)
    except (TypeError, KeyError):  # written by another version: keep what it says
        return KlingError(message)


@attrs.frozen
class JournalRow:
    index: int
    fingerprint: str
    external_task_id: str
    state: str
    task: Task | None
    error: KlingError | None
    #: The W3C ``traceparent`` of the create that made the task (telemetry on), or None.
    trace: str | None = None


class Journal:
    """An open batch journal. Use `Journal.open` and `close`."""

    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        batch_id: str,
        executor: ThreadPoolExecutor,
        *,
        resumed: bool = False,
    ) -> None:
        self.path = path
        self.batch_id = batch_id
        #: Whether the journal existed before this open (its batch id was not made now):
        #: a resumed batch looks every unfinished item up before submitting it.
        self.resumed = resumed
        self._db = connection
        self._executor = executor
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flushing: asyncio.Future[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: str | Path, *, service: str) -> Journal:
        """Open (or create) the journal file at `path` for a client of `service`.

        Args:
            path: the journal file; a missing or empty file becomes a new journal. It is
                held (locked) until `close`.
            service: the base URL of the service the batch talks to. A new journal
                records it; an existing one must have been written against the same
                service (a journal from before this check gets it recorded now).

        Raises:
            ValidationError: the file is in use by another run (held by another open
                journal, in this process or another), is not a journal, comes from an
                incompatible version, or was written against another service (each
                named).
        """
        path = Path(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kling-journal")
        loop = asyncio.get_running_loop()
        try:
            connection, batch_id, created = await loop.run_in_executor(
                executor, _connect, path, service_of(service)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, connection, batch_id, executor, resumed=not created)

    def external_id(self, index: int) -> str:
        """The external task id of item `index`: fixed by the batch id, so a rerun agrees."""
        return f"kling-batch-{self.batch_id}-{index}"

    async def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError(f"the journal {self.path} is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((operation, future))
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())
        return await asyncio.shield(future)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    outcomes = await loop.run_in_executor(
                        self._executor, _apply, self._db, [op for op, _ in batch]
                    )
                except BaseException as error:  # a failed commit fails every writer in it
                    _name_the_file(error, self.path)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(
                                error if isinstance(error, Exception) else RuntimeError(error)
                            )
                    if not isinstance(error, Exception):
                        raise
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
        finally:
            self._flushing = None

    async def load(self, index: int) -> JournalRow | None:
        """The row of item `index`, if the journal has one."""
        row = await self._run(
            lambda db: db.execute(
                "SELECT idx, fingerprint, external_task_id, state, task, error, trace "
                "FROM items WHERE idx = ?",
                (index,),
            ).fetchone()
        )
        if row is None:
            return None
        return JournalRow(
            index=row[0],
            fingerprint=row[1],
            external_task_id=row[2],
            state=row[3],
            task=converter.structure(orjson.loads(row[4]), Task) if row[4] else None,
            error=decode_error(row[5]) if row[5] else None,
            trace=row[6],
        )

    async def record(
        self,
        index: int,
        *,
        fingerprint: str,
        external_task_id: str,
        state: str,
        task: Task | None = None,
        error: KlingError | None = None,
        trace: str | None = None,
    ) -> None:
        """Write item `index`'s state; returns once it is committed.

        `trace` (a W3C ``traceparent``) is kept from the write that gives one on, so a
        resumed run can link its spans to the run that created the task.
        """
        values = (
            index,
            fingerprint,
            external_task_id,
            state,
            orjson.dumps(converter.unstructure(task)).decode() if task is not None else None,
            encode_error(error) if error is not None else None,
            time.time(),
            trace,
        )
        await self._run(
            lambda db: db.execute(
                "INSERT INTO items "
                "(idx, fingerprint, external_task_id, state, task, error, updated_at, trace) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (idx) DO UPDATE SET "
                "fingerprint = excluded.fingerprint, "
                "external_task_id = excluded.external_task_id, state = excluded.state, "
                "task = excluded.task, error = excluded.error, "
                "updated_at = excluded.updated_at, "
                "trace = coalesce(excluded.trace, items.trace)",
                values,
            )
        )

    async def close(self) -> None:
        """Finish pending writes and close the file, which releases it for another run."""
        if self._closed:
            return
        self._closed = True
        while self._flushing is not None:
            await asyncio.shield(self._flushing)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._db.close)
        finally:
            self._executor.shutdown(wait=True)


def service_of(url: str) -> str:
    """The service a base URL names: scheme, host, port and path, never credentials or query."""
    parts = urllib.parse.urlsplit(url.strip())
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address goes back in brackets
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urllib.parse.urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


def _connect(path: Path, service: str) -> tuple[sqlite3.Connection, str, bool]:
    """The open connection, holding the file's lock; its batch id; whether it was created."""
    try:
        # timeout=0: a journal held by another run is refused at once, not waited for.
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    except sqlite3.Error as error:
        raise ValidationError("journal", f"{path} cannot be opened ({error})") from None
    try:
        # Before the first access: the lock taken below is then kept until close, and WAL
        # mode keeps its index in memory (no -shm file, which another run could share).
        connection.execute("PRAGMA locking_mode=EXCLUSIVE")
        try:
            connection.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError as error:
            if not _is_busy(error):
                raise
            raise ValidationError(
                "journal",
                f"{path} is in use by another run (SQLite: {error}; a program that has "
                "the file open holds it too); a journal has one run at a time: wait for "
                "that run to end, or use another journal file",
            ) from None
        batch_id, created = _check_or_create(connection, path, service)
        # In rollback mode (a new file is not in WAL mode yet), with SQLite's default
        # synchronous=FULL: the batch id is in the main file, fsynced, before any item
        # is sent, so a copy of the file without its -wal still resumes the same batch.
        connection.execute("COMMIT")
        # Outside the transaction: SQLite cannot change the journal mode inside one.
        connection.execute("PRAGMA journal_mode=WAL")
        # Every commit fsyncs the WAL: a "pending" row is on the disk before its POST.
        connection.execute("PRAGMA synchronous=FULL")
    except sqlite3.DatabaseError as error:
        connection.close()
        raise ValidationError(
            "journal", f"{path} is not a usable SQLite journal ({error})"
        ) from None
    except BaseException:
        connection.close()
        raise
    return connection, batch_id, created


def _is_busy(error: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused for a lock another connection holds (SQLITE_BUSY)."""
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return bool(code & 0xFF == _SQLITE_BUSY)
    return "database is locked" in str(error)


def _check_or_create(connection: sqlite3.Connection, path: Path, service: str) -> tuple[str, bool]:
    """The journal's batch id, after checking the file is one of ours for `service`, and
    whether this call created it (a new journal) rather than found it (a resume)."""
    tables = {
        row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    meta: dict[str, str] = {}
    if "meta" in tables:
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
    if "batch_id" not in meta:
        if tables - {"meta", "items"} or (
            "items" in tables and connection.execute("SELECT 1 FROM items").fetchone()
        ):
            # Someone else's database: never add our tables to it.
            raise ValidationError(
                "journal",
                f"{path} is an SQLite database but not a kling_async journal; "
                "give the batch a file of its own",
            )
        for statement in _SCHEMA:
            if statement.split()[2] not in tables:
                connection.execute(statement)
        batch_id = uuid.uuid4().hex[:16]
        connection.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [("batch_id", batch_id), ("schema_version", SCHEMA_VERSION), ("service", service)],
        )
        return batch_id, True
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValidationError(
            "journal",
            f"{path} was written by an incompatible kling_async version (journal format "
            f"{version or 'unknown'}, this version reads format {SCHEMA_VERSION}); "
            "use a new journal file",
        )
    recorded = meta.get("service")
    if recorded is None:  # written before journals recorded their service
        connection.execute("INSERT INTO meta (key, value) VALUES ('service', ?)", (service,))
    elif recorded != service:
        raise ValidationError(
            "journal",
            f"{path} was written against {recorded}, this client talks to {service}; "
            "use a new journal or the same service",
        )
    columns = {row[1] for row in connection.execute("PRAGMA table_info(items)")}
    if "trace" not in columns:  # written before journals kept each item's trace context
        connection.execute("ALTER TABLE items ADD COLUMN trace TEXT")
    return meta["batch_id"], False


def _name_the_file(error: BaseException, path: Path) -> None:
    """Say which journal failed, in the traceback (Python 3.11+), keeping the error's type."""
    if isinstance(error, sqlite3.Error) and hasattr(error, "add_note"):
        error.add_note(f"while writing the batch journal {path}")


def _apply(
    db: sqlite3.Connection, operations: list[Callable[[sqlite3.Connection], Any]]
) -> list[Any]:
    db.execute("BEGIN")
    try:
        outcomes = [operation(db) for operation in operations]
        db.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (a full disk does); a second ROLLBACK
        # would fail and hide the error that matters.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return outcomes
