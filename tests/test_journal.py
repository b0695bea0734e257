"""The batch journal: stored errors come back whole, failed commits leave nothing half-done,
files that are not our journal (or belong to another service) are refused by name.

Unit-level behaviour goes through the journal's own API (`Journal.open`, `record`,
`load`); what a user observes goes through `KlingClient.extend_many(journal=...)`
against the simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kling_async import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BatchResult,
    ConfigurationError,
    ContentPolicyError,
    ExtendRequest,
    InsufficientBalanceError,
    InvalidRequestError,
    KlingClient,
    KlingError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    Task,
    TaskFailedError,
    TaskStatus,
    ValidationError,
    Video,
    WaitTimeoutError,
)
from kling_async._journal import (
    FINISHED,
    PENDING,
    SUBMITTED,
    Journal,
    decode_error,
    encode_error,
    service_of,
)
from kling_async.testing import Simulator
from tests.conftest import FAST_POLL

SERVICE = "http://127.0.0.1:1234"
OTHER_SERVICE = "https://api-singapore.klingai.com"

VIDEO = Video(id="v-result", url="https://files.example.com/v-result.mp4", duration=10.2)
TASK = Task(
    task_id="t-1",
    status=TaskStatus.FAILED,
    status_message="content moderation failed",
    created_at=datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc),
    updated_at=datetime(2025, 1, 2, 3, 5, 0, tzinfo=timezone.utc),
    external_task_id="kling-batch-abc-3",
    parent_video=Video(id="v-parent", url="https://files.example.com/p.mp4", duration=5.1),
    raw_status="failed",
    request_id="req-1",
)
RUNNING = Task(task_id="t-2", status=TaskStatus.PROCESSING, raw_status="processing")
STEP = Task(task_id="t-0", status=TaskStatus.SUCCEED, raw_status="succeed", videos=(VIDEO,))

STATUS_ERRORS: list[KlingError] = [
    AuthenticationError("token expired", status=401, code=1004, request_id="r-401"),
    PermissionDeniedError("no access", status=403, code=1103, request_id="r-403"),
    PermissionDeniedError("ip not allowed", status=429, code=1304),
    InsufficientBalanceError("no credit", status=429, code=1102, request_id="r-1102"),
    InvalidRequestError("bad cfg_scale", status=400, code=1201, request_id="r-400"),
    NotFoundError("no such task", status=404, code=1203, request_id="r-404"),
    ContentPolicyError("risky prompt", status=400, code=1301, request_id="r-1301"),
    RateLimitError("too many", status=429, code=1302, request_id="r-429", retry_after=2.5),
    RateLimitError("running tasks", status=429, code=1303, retry_after=None),
    ServerError("busy", status=503, code=5001, request_id="r-503", retry_after=30.0),
    ServerError("<html> gateway", status=502),  # no envelope: no code, no request id
    APIStatusError("teapot", status=418, code=None, request_id=None),
]

OTHER_ERRORS: list[KlingError] = [
    APIConnectionError(
        "connection reset", method="POST", path="/v1/videos/video-extend", sent=True
    ),
    APIConnectionError("refused", method="GET", path="/v1/videos/video-extend/t", sent=False),
    APIConnectionError("no method or path"),
    APITimeoutError("timed out after 60 s", method="GET", path="/v1/videos/video-extend/t-1"),
    TaskFailedError(TASK),
    TaskFailedError(TASK, steps=(STEP,)),
    WaitTimeoutError(RUNNING, 900.0),
    WaitTimeoutError(RUNNING, 0.25),
    ValidationError("cfg_scale", "must be a real number in [0, 1]", 1.5),
    ValidationError("prompt", "must have non-space text"),
    ResponseFormatError("not a JSON envelope", status=200),
    ResponseFormatError(
        "expected a number", path="data.task_result.videos[0].duration", status=200
    ),
    ConfigurationError("no credentials"),
    KlingError("something else"),
]


def assert_same_error(got: KlingError | None, want: KlingError) -> None:
    """Same class, same text, same context attributes (task, status, code, ...)."""
    assert got is not None
    assert type(got) is type(want)
    assert str(got) == str(want)
    assert got.args == want.args
    assert vars(got) == vars(want)


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    opened = await Journal.open(tmp_path / "unit.journal", service=SERVICE)
    yield opened
    await opened.close()


async def record(journal: Journal, index: int, state: str = FINISHED, **kwargs: object) -> None:
    await journal.record(
        index,
        fingerprint=f"fp-{index}",
        external_task_id=journal.external_id(index),
        state=state,
        **kwargs,  # type: ignore[arg-type]
    )


def requests(n: int, prefix: str = "video") -> list[ExtendRequest]:
    return [ExtendRequest(video_id=f"{prefix}-{i}", prompt=f"extend {i}") for i in range(n)]


async def collect(results: AsyncIterator[BatchResult]) -> list[BatchResult]:
    return [result async for result in results]


# -- every stored error kind comes back whole --------------------------------------------------


@pytest.mark.parametrize("error", STATUS_ERRORS + OTHER_ERRORS, ids=repr)
async def test_every_error_kind_survives_the_file(tmp_path: Path, error: KlingError) -> None:
    path = tmp_path / "errors.journal"
    journal = await Journal.open(path, service=SERVICE)
    await record(journal, 7, task=RUNNING, error=error)
    await journal.close()
    reopened = await Journal.open(path, service=SERVICE)
    try:
        row = await reopened.load(7)
    finally:
        await reopened.close()
    assert row is not None
    assert (row.index, row.state, row.task, row.fingerprint) == (7, FINISHED, RUNNING, "fp-7")
    assert_same_error(row.error, error)
    # Pickling (a process pool, a job queue) describes errors the same way: `parts`.
    assert_same_error(pickle.loads(pickle.dumps(error)), error)


@settings(max_examples=200)
@given(
    cls=st.sampled_from(
        [type(e) for e in STATUS_ERRORS if type(e) is not APIStatusError] + [APIStatusError]
    ),
    message=st.text(),
    status=st.integers(100, 599),
    code=st.none() | st.integers(0, 99_999),
    request_id=st.none() | st.text(min_size=1),
    retry_after=st.none() | st.floats(0, 86_400, allow_nan=False),
)
def test_status_errors_round_trip(
    cls: type[APIStatusError],
    message: str,
    status: int,
    code: int | None,
    request_id: str | None,
    retry_after: float | None,
) -> None:
    error = cls(message, status=status, code=code, request_id=request_id, retry_after=retry_after)
    assert_same_error(decode_error(encode_error(error)), error)


def test_an_unknown_stored_kind_comes_back_as_a_kling_error() -> None:
    # A journal written by a newer version may name an error class this one lacks.
    error = decode_error('{"type": "QuotaFromTheFutureError", "message": "later"}')
    assert type(error) is KlingError and str(error) == "later"
    not_ours = decode_error('{"type": "ValueError", "message": "x"}')
    assert type(not_ours) is KlingError


async def test_rows_keep_their_state_and_last_write_wins(journal: Journal) -> None:
    assert await journal.load(0) is None
    await record(journal, 0, PENDING)
    await record(journal, 0, SUBMITTED, task=RUNNING)
    row = await journal.load(0)
    assert row is not None and (row.state, row.task, row.error) == (SUBMITTED, RUNNING, None)
    assert row.external_task_id == journal.external_id(0)
    assert journal.external_id(0) != journal.external_id(1)


# -- replay as the user sees it ----------------------------------------------------------------


async def test_failed_tasks_are_replayed_without_a_request(tmp_path: Path) -> None:
    path = tmp_path / "failed.journal"
    async with (
        Simulator(submit_time=0, processing_time=0.01, failure_rate=1.0, seed=3) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling,
    ):
        first = await collect(kling.extend_many(requests(4), journal=path))
        assert all(isinstance(r.error, TaskFailedError) for r in first)
        seen = sim.counters.requests
        again = await collect(kling.extend_many(requests(4), journal=path))
        assert sim.counters.requests == seen  # every row came from the journal
    by_index = {r.index: r for r in first}
    for result in again:
        before = by_index[result.index]
        assert before.error is not None
        assert_same_error(result.error, before.error)
        assert result.task == before.task
        assert isinstance(result.error, TaskFailedError) and result.error.task == before.task


async def test_a_stored_no_credit_error_is_replayed_as_stored_then_retried(
    tmp_path: Path,
) -> None:
    path = tmp_path / "credit.journal"
    async with (
        Simulator(submit_time=0, processing_time=0.01, credit=0) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling,
    ):
        first = await collect(kling.extend_many(requests(3), journal=path, concurrency=1))
        assert all(isinstance(r.error, InsufficientBalanceError) for r in first)
        stored = await Journal.open(path, service=sim.base_url)
        try:
            rows = [await stored.load(i) for i in range(3)]
        finally:
            await stored.close()
        for row, result in zip(rows, sorted(first, key=lambda r: r.index), strict=True):
            assert row is not None and result.error is not None
            assert_same_error(row.error, result.error)
            assert isinstance(row.error, InsufficientBalanceError) and row.error.code == 1102
        # Not a final error: once the account has credit, the rerun submits them.
        sim.credit = None
        again = await collect(kling.extend_many(requests(3), journal=path))
    assert all(r.ok for r in again)
    assert sim.counters.tasks_created == 3


# -- a failed commit: the error surfaces, nothing is half-written, a rerun recovers -------------


def failing_trigger(when: str, message: str = "database or disk is full") -> str:
    return (
        f"CREATE TRIGGER fail_writes BEFORE INSERT ON items WHEN {when} "
        f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
    )


def fail_writes(path: Path, when: str) -> None:
    """From another connection (closed after: a journal has one owner), make the journal's
    writes fail as a full disk would."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(failing_trigger(when))


def allow_writes(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("DROP TRIGGER fail_writes")


async def test_a_failed_commit_fails_every_writer_in_it_and_keeps_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "commit.journal"
    journal = await Journal.open(path, service=SERVICE)
    try:
        await record(journal, 0, SUBMITTED, task=RUNNING)
        # Through the journal's own connection: it holds the file while open.
        await journal._run(lambda db: db.execute(failing_trigger("NEW.idx = 3")))
        # Five writers in one group commit; one of them cannot be written.
        outcomes = await asyncio.gather(
            *(record(journal, i, FINISHED, task=STEP) for i in range(1, 6)),
            return_exceptions=True,
        )
        assert all(isinstance(o, sqlite3.IntegrityError) for o in outcomes), outcomes
        assert "disk is full" in str(outcomes[0])
        assert [await journal.load(i) for i in range(1, 6)] == [None] * 5
        row = await journal.load(0)
        assert row is not None and (row.state, row.task) == (SUBMITTED, RUNNING)
        # The journal goes on working for writes that can be made.
        await record(journal, 9, PENDING)
        assert await journal.load(9) is not None
    finally:
        await journal.close()
    allow_writes(path)
    rerun = await Journal.open(path, service=SERVICE)
    try:
        await asyncio.gather(*(record(rerun, i, FINISHED, task=STEP) for i in range(1, 6)))
        rows = [await rerun.load(i) for i in range(6)]
    finally:
        await rerun.close()
    assert [r.state for r in rows if r is not None] == [SUBMITTED] + [FINISHED] * 5


async def test_a_really_full_database_surfaces_and_rolls_back(journal: Journal) -> None:
    await record(journal, 0, PENDING)
    # SQLite's own limit on the file's size: the next write that needs a page fails
    # with SQLITE_FULL (and SQLite rolls the transaction back itself).
    pages = await journal._run(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
    await journal._run(lambda db: db.execute(f"PRAGMA max_page_count = {pages}"))
    big = ServerError("x" * 100_000, status=500)
    with pytest.raises(sqlite3.OperationalError, match="full") as caught:
        await asyncio.gather(record(journal, 1, error=big), record(journal, 2, PENDING))
    notes = getattr(caught.value, "__notes__", [str(journal.path)])
    assert str(journal.path) in notes[0]
    assert await journal.load(1) is None and await journal.load(2) is None
    await journal._run(lambda db: db.execute(f"PRAGMA max_page_count = {pages * 1000}"))
    await record(journal, 1, error=big)
    row = await journal.load(1)
    assert row is not None
    assert_same_error(row.error, big)


async def test_a_closed_journal_says_so(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path / "closed.journal", service=SERVICE)
    await journal.close()
    with pytest.raises(RuntimeError, match=r"closed\.journal is closed"):
        await record(journal, 0, PENDING)
    await journal.close()  # closing twice is harmless


async def test_a_batch_whose_journal_write_fails_stops_and_a_rerun_creates_nothing_twice(
    sim: Simulator, tmp_path: Path
) -> None:
    path = tmp_path / "batch.journal"
    async with KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling:
        assert await collect(kling.extend_many([], journal=path)) == []  # creates the file
        # Item 2's task gets created at the service, but its "submitted" row cannot be
        # written: the batch must stop with that error rather than go on unrecorded.
        fail_writes(path, "NEW.idx = 2 AND NEW.state = 'submitted'")
        with pytest.raises(sqlite3.IntegrityError, match="disk is full"):
            await collect(kling.extend_many(requests(6), journal=path, concurrency=2))
        with contextlib.closing(sqlite3.connect(path)) as db:
            states = dict(db.execute("SELECT idx, state FROM items").fetchall())
        assert states[2] == PENDING  # the last state that was committed, not half of one
        assert sim.task_by_external_id(f"kling-batch-{batch_id(path)}-2") is not None
        allow_writes(path)
        results = await collect(kling.extend_many(requests(6), journal=path, concurrency=2))
    assert sorted(r.index for r in results) == list(range(6))
    assert all(r.ok for r in results)
    assert sim.counters.tasks_created == 6  # item 2 was looked up, not created again
    assert not sim.counters.duplicate_external_ids


def batch_id(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return str(db.execute("SELECT value FROM meta WHERE key = 'batch_id'").fetchone()[0])


# -- files that are not a journal we can use ----------------------------------------------------


async def test_a_file_that_is_not_sqlite_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a database\n" * 100)
    with pytest.raises(ValidationError, match=r"notes\.txt is not a usable SQLite journal"):
        await Journal.open(path, service=SERVICE)
    assert path.read_text().startswith("hello")


async def test_a_damaged_journal_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "damaged.journal"
    journal = await Journal.open(path, service=SERVICE)
    await journal.close()
    data = bytearray(path.read_bytes())
    data[100:] = b"\xff" * (len(data) - 100)  # keep the header, ruin the pages
    path.write_bytes(bytes(data))
    with pytest.raises(ValidationError, match=r"damaged\.journal"):
        await Journal.open(path, service=SERVICE)


async def test_a_journal_of_another_format_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "v2.journal"
    journal = await Journal.open(path, service=SERVICE)
    await record(journal, 0, PENDING)
    await journal.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with pytest.raises(ValidationError) as caught:
        await Journal.open(path, service=SERVICE)
    text = str(caught.value)
    assert str(path) in text and "incompatible" in text and "format 2" in text


async def test_someone_elses_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "photos.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO photos (name) VALUES ('cat.jpg')")
    db.close()
    with pytest.raises(ValidationError, match=r"photos\.db is an SQLite database but not"):
        await Journal.open(path, service=SERVICE)
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    assert tables == {"photos"}  # no tables of ours were added


async def test_an_empty_file_becomes_a_new_journal(tmp_path: Path) -> None:
    # What `touch` or `mktemp` leaves: SQLite reads it as an empty database.
    path = tmp_path / "empty.journal"
    path.touch()
    journal = await Journal.open(path, service=SERVICE)
    try:
        await record(journal, 0, PENDING)
        assert await journal.load(0) is not None
    finally:
        await journal.close()


async def test_a_journal_path_that_cannot_be_a_file_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no-such-dir"):
        await Journal.open(tmp_path / "no-such-dir" / "j.journal", service=SERVICE)
    with pytest.raises(ValidationError, match=str(tmp_path.name)):
        await Journal.open(tmp_path, service=SERVICE)


async def test_an_incompatible_journal_stops_a_batch_before_any_request(
    sim: Simulator, client: KlingClient, tmp_path: Path
) -> None:
    path = tmp_path / "old.journal"
    journal = await Journal.open(path, service=sim.base_url)
    await journal.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(ValidationError, match=r"old\.journal was written by an incompatible"):
        await collect(client.extend_many(requests(3), journal=path))
    assert sim.counters.requests == 0


# -- a journal remembers its service ------------------------------------------------------------


async def test_a_journal_refuses_another_service(tmp_path: Path) -> None:
    path = tmp_path / "service.journal"
    journal = await Journal.open(path, service=SERVICE + "/")
    await journal.close()
    again = await Journal.open(path, service=SERVICE)  # the same service, spelled with a slash
    await again.close()
    with pytest.raises(ValidationError) as caught:
        await Journal.open(path, service=OTHER_SERVICE)
    assert str(caught.value) == (
        f"journal: {path} was written against {SERVICE}, this client talks to "
        f"{OTHER_SERVICE}; use a new journal or the same service"
    )


def test_the_service_is_recorded_without_credentials_or_query() -> None:
    assert (
        service_of("HTTPS://user:pw@Gateway.Example.com:8443/kling/?token=abc#frag")
        == "https://gateway.example.com:8443/kling"
    )
    assert service_of("http://[::1]:8000/") == "http://[::1]:8000"
    assert service_of("https://api-singapore.klingai.com") == OTHER_SERVICE


async def test_the_recorded_service_never_holds_a_credential(tmp_path: Path) -> None:
    path = tmp_path / "creds.journal"
    journal = await Journal.open(path, service="https://me:s3cret@gw.example.com/k?key=s3cret")
    await journal.close()
    assert b"s3cret" not in path.read_bytes()
    with pytest.raises(ValidationError) as caught:
        await Journal.open(path, service=OTHER_SERVICE)
    assert "s3cret" not in str(caught.value) and "https://gw.example.com/k" in str(caught.value)


async def test_an_older_journal_without_a_service_gets_one(tmp_path: Path) -> None:
    path = tmp_path / "older.journal"
    journal = await Journal.open(path, service=SERVICE)
    await record(journal, 0, SUBMITTED, task=RUNNING)
    await journal.close()
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM meta WHERE key = 'service'")  # as journals were written before
    db.close()
    older = await Journal.open(path, service=SERVICE)
    try:
        row = await older.load(0)
        assert row is not None and row.task == RUNNING
    finally:
        await older.close()
    with pytest.raises(ValidationError, match="was written against"):
        await Journal.open(path, service=OTHER_SERVICE)


async def test_a_batch_rerun_against_another_service_says_so(tmp_path: Path) -> None:
    path = tmp_path / "moved.journal"
    async with (
        Simulator(submit_time=0, processing_time=0.01) as first,
        Simulator(submit_time=0, processing_time=0.01) as second,
    ):
        async with KlingClient(api_key=first.api_key, base_url=first.base_url) as kling:
            await collect(kling.extend_many(requests(3), journal=path, wait=False))
        async with KlingClient(api_key=second.api_key, base_url=second.base_url) as kling:
            with pytest.raises(ValidationError) as caught:
                await collect(kling.extend_many(requests(3), journal=path))
        assert second.counters.requests == 0  # no 404 for every unfinished row
    text = str(caught.value)
    assert f"written against {first.base_url}" in text
    assert f"this client talks to {second.base_url}" in text
