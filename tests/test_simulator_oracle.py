"""The simulator as an oracle: running-task peaks, refused duplicate external ids, held
creates (a queueing gateway) and answers without data, over real sockets."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import kling_async.testing
from kling_async import ExtendRequest, KlingClient
from kling_async.testing import ALL_FAULT_KINDS, FaultKind, ManualClock, Simulator

PATH = "/v1/videos/video-extend"
VIDEO = "743211632612511839"
START = 1_700_000_000.0
WAIT = 10.0  # seconds: the bound of every wait for something the simulator does


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


def headers(sim: Simulator) -> dict[str, str]:
    return {"Authorization": f"Bearer {sim.api_key}"}


async def create(
    http: aiohttp.ClientSession, sim: Simulator, *, timeout: float = WAIT, **fields: Any
) -> tuple[int, dict[str, Any]]:
    body = {"video_id": VIDEO, "prompt": "p", **fields}
    async with http.post(
        sim.base_url + PATH,
        json=body,
        headers=headers(sim),
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as response:
        return response.status, await response.json()


async def get(
    http: aiohttp.ClientSession, sim: Simulator, key: str, *, timeout: float = WAIT
) -> tuple[int, dict[str, Any]]:
    async with http.get(
        f"{sim.base_url}{PATH}/{key}",
        headers=headers(sim),
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as response:
        return response.status, await response.json()


async def list_tasks(http: aiohttp.ClientSession, sim: Simulator) -> tuple[int, dict[str, Any]]:
    async with http.get(sim.base_url + PATH, headers=headers(sim)) as response:
        return response.status, await response.json()


async def until(condition: Callable[[], bool]) -> None:
    """Wait (at most `WAIT` seconds) for something the simulator does in the background."""

    async def wait() -> None:
        while not condition():  # noqa: ASYNC110 - counters are plain ints, with no event
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), WAIT)


def create_bodies(sim: Simulator) -> list[bytes]:
    return [r.body for r in sim.recent_requests if r.method == "POST" and r.path == PATH]


# -- peak_running_tasks ---------------------------------------------------------------------


async def test_peak_running_tasks_by_a_manual_clock_and_finish_task(
    http: aiohttp.ClientSession,
) -> None:
    clock = ManualClock(start=START)
    async with Simulator(clock=clock, submit_time=1.0, processing_time=1.0, seed=1) as sim:
        counters = sim.counters
        assert counters.peak_running_tasks == 0
        for name in "abc":
            status, answer = await create(http, sim, external_task_id=name)
            assert status == 200, answer
        assert counters.peak_running_tasks == sim.running_tasks == 3

        sim.finish_task("a")
        await create(http, sim, external_task_id="d")  # b, c, d
        sim.finish_task("b", status="failed")
        await create(http, sim, external_task_id="e")  # c, d, e
        assert counters.peak_running_tasks == sim.running_tasks == 3

        clock.advance(1.5)  # c, d and e run until START + 2
        await create(http, sim, external_task_id="f")  # c, d, e, f
        assert counters.peak_running_tasks == sim.running_tasks == 4

        clock.set(START + 2.0)  # c, d, e finish on their own; f stays
        assert sim.running_tasks == 1
        await create(http, sim, external_task_id="g")  # f, g
        assert sim.running_tasks == 2
        assert counters.peak_running_tasks == 4  # a peak is not forgotten
        assert counters.as_dict()["peak_running_tasks"] == 4

        counters.reset()  # starts from the tasks running now
        assert counters.peak_running_tasks == 2
        assert counters.tasks_created == 0
        await create(http, sim, external_task_id="h")
        assert counters.peak_running_tasks == 3

        clock.advance(10)  # everything finished: the peak stays, nothing runs
        assert sim.running_tasks == 0
        counters.reset()
        assert counters.peak_running_tasks == 0
        assert counters.peak_concurrent_requests == 0


async def test_peak_running_tasks_counts_tasks_finishing_at_a_creation_as_finished(
    http: aiohttp.ClientSession,
) -> None:
    clock = ManualClock(start=START)
    async with Simulator(clock=clock, submit_time=0.5, processing_time=0.5, seed=2) as sim:
        await create(http, sim)
        clock.advance(1.0)  # the first finishes exactly now
        await create(http, sim)
        assert sim.counters.peak_running_tasks == 1
        # Tasks that take no time at all never run.
        sim.submit_time = sim.processing_time = 0
        await create(http, sim)
        assert sim.counters.peak_running_tasks == 1
        assert sim.counters.tasks_created == 3


async def test_peak_running_tasks_with_a_client_on_the_wall_clock() -> None:
    async with (
        Simulator(submit_time=60, processing_time=60, seed=3) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url, timeout=WAIT) as kling,
    ):
        requests = [ExtendRequest(video_id=f"video-{i}", prompt="p") for i in range(5)]
        tasks = await asyncio.gather(*(kling.extend(r) for r in requests))
        assert sim.counters.peak_running_tasks == sim.running_tasks == 5
        for task in tasks:
            sim.finish_task(task.task_id)
        assert sim.running_tasks == 0
        await kling.extend(ExtendRequest(video_id="video-last", prompt="p"))
        assert sim.counters.peak_running_tasks == 5
        assert sim.running_tasks == 1


# -- refuse_duplicate_external_ids ----------------------------------------------------------


async def test_duplicate_external_ids_are_refused_when_asked(
    http: aiohttp.ClientSession,
) -> None:
    async with Simulator(refuse_duplicate_external_ids=True, seed=4) as sim:
        assert sim.refuse_duplicate_external_ids is True
        status, first = await create(http, sim, external_task_id="job-1")
        assert status == 200 and first["code"] == 0
        status, second = await create(http, sim, external_task_id="job-1", prompt="again")
        assert status == 400
        assert second["code"] == 1201
        assert second["message"] == "external_task_id already exists"
        assert second["data"] is None
        assert isinstance(second["request_id"], str) and second["request_id"]
        counters = sim.counters
        assert (counters.creates, counters.tasks_created, counters.rejected_duplicates) == (2, 1, 1)
        assert len(sim.tasks) == 1
        assert counters.duplicate_external_ids == {}
        # The refused body is recorded like any other.
        assert [b'"again"' in body for body in create_bodies(sim)] == [False, True]
        # Other ids and creates without one still make tasks.
        assert (await create(http, sim, external_task_id="job-2"))[0] == 200
        assert (await create(http, sim))[0] == 200
        assert (await create(http, sim))[0] == 200
        assert len(sim.tasks) == 4
        # The original task is untouched and still found by its id.
        status, found = await get(http, sim, "job-1")
        assert status == 200 and found["data"]["task_id"] == first["data"]["task_id"]

        sim.refuse_duplicate_external_ids = False  # a mutable knob
        assert (await create(http, sim, external_task_id="job-1"))[0] == 200
        assert counters.duplicate_external_ids == {"job-1": 2}
        assert counters.rejected_duplicates == 1
        counters.reset()
        assert counters.rejected_duplicates == 0


async def test_duplicate_external_ids_are_accepted_by_default(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    assert sim.refuse_duplicate_external_ids is False
    for _ in range(2):
        assert (await create(http, sim, external_task_id="twice"))[0] == 200
    assert sim.counters.duplicate_external_ids == {"twice": 2}
    assert sim.counters.rejected_duplicates == 0


# -- "hold": a queueing gateway -------------------------------------------------------------


async def test_a_held_create_makes_its_task_after_the_client_gave_up(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.inject(FaultKind.HOLD, delay=2.0)  # well past the client's 0.2 s, and the look-up
    with pytest.raises(asyncio.TimeoutError):
        await create(http, sim, timeout=0.2, external_task_id="held")
    # The client gave up before any answer; the gateway has not forwarded it yet.
    assert sim.counters.creates == 1
    assert sim.task_by_external_id("held") is None
    status, answer = await get(http, sim, "held")
    assert (status, answer["code"]) == (404, 1203)
    assert len(create_bodies(sim)) == 1 and b'"held"' in create_bodies(sim)[0]

    await until(lambda: sim.task_by_external_id("held") is not None)
    status, answer = await get(http, sim, "held")
    assert status == 200 and answer["code"] == 0
    assert answer["data"]["task_info"]["external_task_id"] == "held"
    counters = sim.counters
    assert (counters.creates, counters.tasks_created, counters.faults_injected) == (1, 1, 1)
    assert counters.creates_by_external_id == {"held": 1}


async def test_a_held_create_answers_a_client_still_there(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.inject("hold", delay=0.3)
    status, answer = await create(http, sim, external_task_id="patient")
    assert status == 200 and answer["code"] == 0
    task = sim.task_by_external_id("patient")
    assert task is not None and answer["data"]["task_id"] == task.task_id
    assert sim.counters.tasks_created == 1 and sim.pending_faults == 0


@pytest.mark.parametrize("refuse", [False, True])
async def test_a_create_retried_during_a_hold_makes_two_tasks_unless_refused(
    http: aiohttp.ClientSession, refuse: bool
) -> None:
    async with Simulator(refuse_duplicate_external_ids=refuse, seed=6) as sim:
        sim.inject("hold", delay=2.0)
        with pytest.raises(asyncio.TimeoutError):
            await create(http, sim, timeout=0.2, external_task_id="retried")
        assert (await get(http, sim, "retried"))[0] == 404
        status, answer = await create(http, sim, external_task_id="retried")
        assert status == 200
        counters = sim.counters
        # The held create ends one way or the other.
        await until(lambda: counters.tasks_created + counters.rejected_duplicates == 2)
        if refuse:
            assert counters.rejected_duplicates == 1
            assert list(sim.tasks) == [answer["data"]["task_id"]]
            assert counters.duplicate_external_ids == {}
        else:
            assert counters.rejected_duplicates == 0
            assert counters.duplicate_external_ids == {"retried": 2}
        assert len(create_bodies(sim)) == 2


async def test_a_client_that_times_out_on_a_held_create_ends_with_one_task() -> None:
    async with (
        Simulator(refuse_duplicate_external_ids=True, seed=7) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url, timeout=0.3) as kling,
    ):
        sim.inject("hold", delay=2.0)
        request = ExtendRequest(video_id=VIDEO, prompt="p")
        task = await asyncio.wait_for(kling.extend(request), 60)
        # However the client got its task (found the held one once created, or created
        # again meanwhile), the held create ends without making a second task.
        counters = sim.counters
        await until(
            lambda: counters.tasks_created + counters.rejected_duplicates == counters.creates
        )
        assert sim.pending_faults == 0
        assert list(sim.tasks) == [task.task_id]
        assert counters.duplicate_external_ids == {}


async def test_hold_on_get_answers_after_the_delay_with_the_status_then(
    http: aiohttp.ClientSession,
) -> None:
    clock = ManualClock(start=START)
    async with Simulator(clock=clock, submit_time=1, processing_time=1, seed=8) as sim:
        status, answer = await create(http, sim)
        task_id = answer["data"]["task_id"]
        sim.inject("hold", on="get", delay=1.0)
        held = asyncio.ensure_future(get(http, sim, task_id))
        await until(lambda: sim.counters.gets == 1)
        clock.advance(5)  # the task finishes while the look-up is held
        status, answer = await asyncio.wait_for(held, WAIT)
        assert status == 200 and answer["data"]["task_status"] == "succeed"
        # A client that gives up first gets nothing, and nothing breaks.
        sim.inject("hold", on="list", delay=1.0)
        with pytest.raises(asyncio.TimeoutError):
            async with http.get(
                sim.base_url + PATH,
                headers=headers(sim),
                timeout=aiohttp.ClientTimeout(total=0.2),
            ) as response:
                await response.read()
        assert (await list_tasks(http, sim))[0] == 200


async def test_close_cuts_a_held_create_short_without_creating(
    http: aiohttp.ClientSession,
) -> None:
    sim = Simulator(seed=9)
    await sim.start()
    sim.inject("hold", delay=60)
    request = asyncio.ensure_future(create(http, sim, external_task_id="never"))
    await until(lambda: sim.counters.creates == 1)
    await asyncio.wait_for(sim.close(), WAIT)
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        await asyncio.wait_for(request, WAIT)
    assert request.done()
    assert sim.counters.tasks_created == 0 and not sim.tasks


def test_a_held_create_in_a_thread_is_created_while_the_simulator_runs() -> None:
    body = b'{"video_id": "v", "prompt": "p", "external_task_id": "threaded"}'
    with Simulator(seed=10).run_in_thread() as sim:
        sim.inject("hold", delay=0.5)
        connection = HTTPConnection("127.0.0.1", sim.port, timeout=0.1)
        connection.request(
            "POST", PATH, body=body, headers={**headers(sim), "Content-Type": "application/json"}
        )
        with pytest.raises((socket.timeout, TimeoutError)):
            connection.getresponse()
        connection.close()  # the client gives up; the task comes all the same
        deadline = time.monotonic() + WAIT
        while sim.task_by_external_id("threaded") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sim.task_by_external_id("threaded") is not None
        assert sim.counters.tasks_created == 1


# -- "empty_data" ---------------------------------------------------------------------------


async def test_empty_data_on_create_still_creates_the_task(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.inject("empty_data")
    status, answer = await create(http, sim, external_task_id="blank")
    assert status == 200
    assert answer["code"] == 0 and answer["message"] == "SUCCEED"
    assert "data" in answer and answer["data"] is None
    assert isinstance(answer["request_id"], str) and answer["request_id"]
    assert sim.task_by_external_id("blank") is not None
    assert sim.counters.tasks_created == sim.counters.faults_injected == 1
    assert len(create_bodies(sim)) == 1 and b'"blank"' in create_bodies(sim)[0]


async def test_empty_data_on_get_list_and_files(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    status, answer = await create(http, sim)
    task_id = answer["data"]["task_id"]
    sim.inject(FaultKind.EMPTY_DATA, on="get")
    status, answer = await get(http, sim, task_id)
    assert (status, answer["code"], answer["message"], answer["data"]) == (200, 0, "SUCCEED", None)
    status, answer = await get(http, sim, task_id)  # one request only
    assert status == 200 and answer["data"]["task_id"] == task_id

    sim.inject("empty_data", on="list")
    status, answer = await list_tasks(http, sim)
    assert (status, answer["code"], answer["data"]) == (200, 0, None)

    await until(lambda: sim.tasks[task_id].status == "succeed")
    url = sim.tasks[task_id].result_video.url
    sim.inject("empty_data", on="files")
    async with http.get(url) as response:
        assert response.status == 200 and await response.read() == b""
    async with http.get(url) as response:
        assert response.status == 200 and (await response.read())[4:8] == b"ftyp"


# -- the kinds are accepted everywhere -------------------------------------------------------


async def test_new_kinds_are_accepted_by_inject_and_set_fault_rate(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    assert FaultKind("hold") is FaultKind.HOLD and FaultKind.HOLD.value == "hold"
    assert FaultKind("empty_data") is FaultKind.EMPTY_DATA
    assert FaultKind.HOLD not in ALL_FAULT_KINDS and FaultKind.EMPTY_DATA not in ALL_FAULT_KINDS
    for kind in ("hold", "empty_data", FaultKind.HOLD, FaultKind.EMPTY_DATA):
        for on in ("create", "get", "list", "files", "any"):
            sim.inject(kind, on=on, times=2, delay=0.1)
            sim.set_fault_rate(0.5, on=on, kinds=[kind], delay=0.1)
    sim.clear_faults()
    with pytest.raises(ValueError, match=r"'hold'.*'empty_data'"):
        sim.inject("held")

    sim.set_fault_rate(1.0, on="get", kinds=["empty_data"])
    status, answer = await create(http, sim)
    task_id = answer["data"]["task_id"]
    for _ in range(3):
        assert (await get(http, sim, task_id))[1]["data"] is None
    sim.set_fault_rate(1.0, on="create", kinds=["hold"], delay=0.2)
    status, answer = await create(http, sim, external_task_id="rate-held")
    assert status == 200 and sim.task_by_external_id("rate-held") is not None
    sim.clear_faults()
    assert sim.counters.faults_injected == 4


# -- an independent oracle: nothing of the client's wire mapping --------------------------

TESTING_DIR = Path(kling_async.testing.__file__).parent
TESTING_PACKAGE = "kling_async.testing"
#: What a simulator module may import of the client: only the test-mode switch reaches in.
ALLOWED_CLIENT_IMPORTS: dict[str, frozenset[str]] = {
    "_mode.py": frozenset(
        {"kling_async._protocol", "kling_async._models", "kling_async._transport"}
    ),
}


def imported_modules(source: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in `source`, at any depth (functions, classes,
    `if TYPE_CHECKING:`), relative ones resolved against `package`; `from m import n`
    gives `m.n` (`n` may be a module), and `importlib.import_module("...")` with a
    literal counts too."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Name, ast.Attribute))
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def client_imports(source: str, package: str, allowed: frozenset[str] = frozenset()) -> list[str]:
    """The imports in `source` that reach `kling_async` outside `kling_async.testing`."""
    found = []
    for line, module in sorted(imported_modules(source, package)):
        inside = module == TESTING_PACKAGE or module.startswith(TESTING_PACKAGE + ".")
        ours = module == "kling_async" or module.startswith("kling_async.")
        if ours and not inside and module not in allowed:
            found.append(f"line {line}: {module}")
    return found


def test_the_import_check_sees_every_way_in() -> None:
    source = """
from __future__ import annotations
import json
from typing import TYPE_CHECKING
from . import _wire
from ._models import SimTask
if TYPE_CHECKING:
    from kling_async._models import Task
import kling_async.errors
from kling_async import _converter
from .. import _protocol
def late():
    from kling_async.testing._store import TaskStore
    import importlib
    return importlib.import_module("kling_async._converter")
"""
    assert client_imports(source, TESTING_PACKAGE) == [
        "line 8: kling_async._models.Task",
        "line 9: kling_async.errors",
        "line 10: kling_async._converter",
        "line 11: kling_async._protocol",
        "line 15: kling_async._converter",
    ]
    allowed = frozenset({"kling_async._protocol"})
    assert client_imports("from kling_async import _protocol", TESTING_PACKAGE, allowed) == []


def test_no_simulator_module_imports_the_client() -> None:
    """The simulator checks the client, so it must not read the wire with the client's
    own converter, models, protocol or errors: a bug there would pass every test."""
    modules = sorted(TESTING_DIR.rglob("*.py"))
    assert {"_create_body.py", "_handlers.py", "_wire.py", "_store.py"} <= {m.name for m in modules}
    offending = {}
    for path in modules:
        relative = path.relative_to(TESTING_DIR)
        package = ".".join([TESTING_PACKAGE, *relative.parent.parts])
        allowed = ALLOWED_CLIENT_IMPORTS.get(relative.as_posix(), frozenset())
        found = client_imports(path.read_text(encoding="utf-8"), package, allowed)
        if found:
            offending[relative.as_posix()] = found
    assert offending == {}


#: A create body written by hand, every field by its wire name (not built by the client).
HAND_WRITTEN_BODY = b"""{
    "video_id": "743211632612511839",
    "prompt": "the camera pulls back over the harbour",
    "negative_prompt": "blur",
    "cfg_scale": 0.5,
    "callback_url": "http://127.0.0.1:9/kling/callback",
    "external_task_id": "hand-written-1",
    "watermark_info": {"enabled": true},
    "task_id": "815336423632572487"
}"""


async def post_raw(
    http: aiohttp.ClientSession, sim: Simulator, body: bytes
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        sim.base_url + PATH,
        data=body,
        headers={**headers(sim), "Content-Type": "application/json"},
    ) as response:
        return response.status, await response.json()


async def test_a_hand_written_body_is_read_by_its_wire_names(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.drop_callbacks = True
    status, answer = await post_raw(http, sim, HAND_WRITTEN_BODY)
    assert (status, answer["code"]) == (200, 0), answer
    task = sim.tasks[answer["data"]["task_id"]]
    assert task.parent_video.id == "743211632612511839"
    assert task.external_task_id == "hand-written-1"
    assert task.callback_url == "http://127.0.0.1:9/kling/callback"
    assert task.parent_task_id == "815336423632572487"
    assert task.request["cfg_scale"] == 0.5
    sim.finish_task(task.task_id)
    status, seen = await get(http, sim, "hand-written-1")
    assert status == 200
    (video,) = seen["data"]["task_result"]["videos"]
    assert video["watermark_url"]  # watermark_info.enabled was read

    # Empty optional texts mean "not given", as in the endpoint page's own example.
    body = b'{"video_id": "v1", "prompt": "p", "negative_prompt": "", "callback_url": ""}'
    status, answer = await post_raw(http, sim, body)
    assert status == 200, answer
    assert sim.tasks[answer["data"]["task_id"]].callback_url is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("video_id", b"743211632612511839"),
        ("prompt", b'["p"]'),
        ("negative_prompt", b"0"),
        ("cfg_scale", b'"0.5"'),
        ("cfg_scale", b"true"),
        ("callback_url", b"9"),
        ("external_task_id", b"12"),
        ("watermark_info", b"true"),
        ("watermark_info", b'{"enabled": "true"}'),
        ("task_id", b"815336423632572487"),
    ],
)
async def test_a_hand_written_body_with_a_wrong_type_is_refused_naming_the_field(
    sim: Simulator, http: aiohttp.ClientSession, field: str, value: bytes
) -> None:
    fields = {"video_id": b'"v1"', "prompt": b'"p"', field: value}
    body = b"{" + b", ".join(b'"%s": %s' % (k.encode(), v) for k, v in fields.items()) + b"}"
    status, answer = await post_raw(http, sim, body)
    assert (status, answer["code"], answer["data"]) == (400, 1201, None), answer
    assert answer["message"].startswith(f"{field}: ")
    assert sim.counters.tasks_created == 0


@pytest.mark.parametrize("name", ["watermark", "parent_task_id", "negativePrompt"])
async def test_a_body_with_a_name_that_is_not_on_the_wire_is_refused_naming_it(
    sim: Simulator, http: aiohttp.ClientSession, name: str
) -> None:
    # The client's attribute names are not wire names: a mapping that leaked them would
    # lose the setting at the real service, so the simulator refuses them.
    body = b'{"video_id": "v1", "prompt": "p", "%s": "x"}' % name.encode()
    status, answer = await post_raw(http, sim, body)
    assert (status, answer["code"]) == (400, 1201)
    assert answer["message"].startswith(f"{name}: unknown field")
    assert sim.counters.tasks_created == 0
