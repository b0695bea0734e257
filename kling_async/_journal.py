"""The batch journal: every item's state in an SQLite file, so a crashed batch resumes.

One row per input index: its fingerprint (so a different input is caught), the
`external_task_id` fixed before its first submit, its state (``pending`` = may have
been sent, ``submitted`` = task id known, ``finished``), and the last task and error.

All SQLite work runs on one worker thread, so the event loop never waits on the
disk. Writes are group-committed: every write made while a commit is running joins
the next one, and a writer's ``await`` returns only once its row is committed. WAL
mode with ``synchronous=NORMAL`` keeps committed rows through a ``kill -9`` (the OS
has them) at a fraction of the cost of an fsync per row.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
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
    APIConnectionError,
    APIStatusError,
    ContentPolicyError,
    InvalidRequestError,
    KlingError,
    ResponseFormatError,
    TaskFailedError,
    ValidationError,
    WaitTimeoutError,
)

T = TypeVar("T")

SCHEMA_VERSION: Final = "1"
PENDING: Final = "pending"
SUBMITTED: Final = "submitted"
FINISHED: Final = "finished"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    idx INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    external_task_id TEXT NOT NULL,
    state TEXT NOT NULL,
    task TEXT,
    error TEXT,
    updated_at REAL NOT NULL
);
"""

#: Errors that stay final when a batch is run again; any other error gets another try.
_FINAL_ERRORS: Final = (TaskFailedError, InvalidRequestError, ContentPolicyError, ValidationError)


def fingerprint(request: ExtendRequest) -> str:
    """A stable digest of a request, to tell whether a rerun's input matches the journal."""
    document = orjson.dumps(converter.unstructure(request), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(document).hexdigest()[:32]


def encode_error(error: KlingError) -> str:
    """An error as JSON: its class and the context needed to rebuild it."""
    document: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, APIStatusError):
        document.update(
            message=error.message,
            status=error.status,
            code=error.code,
            request_id=error.request_id,
        )
    elif isinstance(error, ValidationError):
        document.update(field=error.field, rule=error.rule)
    elif isinstance(error, (TaskFailedError, WaitTimeoutError)):
        document["task"] = converter.unstructure(error.task)
        if isinstance(error, WaitTimeoutError):
            document["timeout"] = error.timeout
    elif isinstance(error, ResponseFormatError):
        document.update(path=error.path, status=error.status)
    return orjson.dumps(document).decode()


def decode_error(text: str) -> KlingError:
    """Rebuild an error stored by `encode_error`."""
    document = orjson.loads(text)
    cls = getattr(errors_module, document.get("type", ""), None)
    message = str(document.get("message", ""))
    if not (isinstance(cls, type) and issubclass(cls, KlingError)):
        return KlingError(message)
    if issubclass(cls, APIStatusError):
        return cls(
            message,
            status=document["status"],
            code=document.get("code"),
            request_id=document.get("request_id"),
        )
    if issubclass(cls, ValidationError):
        return cls(document["field"], document["rule"])
    if issubclass(cls, TaskFailedError):
        return cls(converter.structure(document["task"], Task))
    if issubclass(cls, WaitTimeoutError):
        return cls(converter.structure(document["task"], Task), document["timeout"])
    if issubclass(cls, ResponseFormatError):
        return cls(message, path=document.get("path"), status=document.get("status"))
    if issubclass(cls, APIConnectionError):
        return cls(message)
    return cls(message)


def is_final_error(error: KlingError) -> bool:
    """Whether a rerun keeps this error (a rejected request, a failed task)."""
    return isinstance(error, _FINAL_ERRORS)


@attrs.frozen
class JournalRow:
    index: int
    fingerprint: str
    external_task_id: str
    state: str
    task: Task | None
    error: KlingError | None


class Journal:
    """An open batch journal. Use `Journal.open` and `close`."""

    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        batch_id: str,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.path = path
        self.batch_id = batch_id
        self._db = connection
        self._executor = executor
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flushing: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, path: str | Path) -> Journal:
        """Open (or create) the journal file at `path`."""
        path = Path(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kling-journal")
        loop = asyncio.get_running_loop()
        try:
            connection, batch_id = await loop.run_in_executor(executor, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, connection, batch_id, executor)

    def external_id(self, index: int) -> str:
        """The external task id of item `index`: fixed by the batch id, so a rerun agrees."""
        return f"kling-batch-{self.batch_id}-{index}"

    async def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
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
                "SELECT idx, fingerprint, external_task_id, state, task, error "
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
    ) -> None:
        """Write item `index`'s state; returns once it is committed."""
        values = (
            index,
            fingerprint,
            external_task_id,
            state,
            orjson.dumps(converter.unstructure(task)).decode() if task is not None else None,
            encode_error(error) if error is not None else None,
            time.time(),
        )
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO items "
                "(idx, fingerprint, external_task_id, state, task, error, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                values,
            )
        )

    async def close(self) -> None:
        """Finish pending writes and close the file."""
        while self._flushing is not None:
            await asyncio.shield(self._flushing)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._db.close)
        finally:
            self._executor.shutdown(wait=True)


def _connect(path: Path) -> tuple[sqlite3.Connection, str]:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.executescript(_SCHEMA)
        connection.execute("BEGIN IMMEDIATE")
        row = connection.execute("SELECT value FROM meta WHERE key = 'batch_id'").fetchone()
        compatible = True
        if row is None:
            batch_id = uuid.uuid4().hex[:16]
            connection.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("batch_id", batch_id), ("schema_version", SCHEMA_VERSION)],
            )
        else:
            batch_id = row[0]
            version = connection.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
            compatible = version is not None and version[0] == SCHEMA_VERSION
        connection.execute("COMMIT")
    except sqlite3.DatabaseError as error:
        connection.close()
        raise ValidationError(
            "journal", f"{path} is not a usable SQLite journal ({error})"
        ) from None
    except BaseException:
        connection.close()
        raise
    if not compatible:
        connection.close()
        raise ValidationError(
            "journal", f"{path} was written by an incompatible kling_async version"
        )
    return connection, batch_id


def _apply(
    db: sqlite3.Connection, operations: list[Callable[[sqlite3.Connection], Any]]
) -> list[Any]:
    db.execute("BEGIN")
    try:
        outcomes = [operation(db) for operation in operations]
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return outcomes
