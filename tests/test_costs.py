"""Credits and costs: resource packs over the wire, units billed, result expiry, watermarks.

Against the simulator's ``/account/costs`` (configured packs, drawn down by tasks that
succeed, 1102 once none is usable, one query a second) and through the journal.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from kling_async import (
    ExtendRequest,
    InsufficientBalanceError,
    KlingClient,
    NotFoundError,
    ResourcePack,
    Task,
    ValidationError,
)
from kling_async._converter import converter, parse_resource_packs, parse_task
from kling_async.errors import ResponseFormatError
from kling_async.testing import SimPack, Simulator
from tests.conftest import FAST_POLL

VIDEO = "828006748715380777"
DAY = 86_400.0


def _client(sim: Simulator) -> KlingClient:
    return KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL, timeout=5.0)


# -- the converter (pure) ---------------------------------------------------------------


def test_units_expiry_and_watermark_are_read_and_written_back() -> None:
    data = {
        "task_id": "1",
        "task_status": "succeed",
        "created_at": 1_700_000_000_000,
        "final_unit_deduction": "5",
        "task_result": {
            "videos": [
                {
                    "id": "v",
                    "url": "https://c/v.mp4",
                    "watermark_url": "https://c/w.mp4",
                    "duration": "9.9",
                }
            ]
        },
    }
    task = parse_task(data)
    assert task.units_deducted == 5.0
    assert task.videos[0].watermark_url == "https://c/w.mp4"
    assert task.created_at is not None
    assert task.expires_at == task.created_at + timedelta(days=30)
    # The journal keeps tasks through the converter: nothing is lost on the way.
    assert converter.structure(converter.unstructure(task), Task) == task
    assert parse_task({**data, "final_unit_deduction": 2.5}).units_deducted == 2.5
    bare = parse_task({"task_id": "2", "task_status": "submitted"})
    assert (bare.units_deducted, bare.expires_at) == (None, None)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("final_unit_deduction", "lots"),
        ("final_unit_deduction", True),
        ("final_unit_deduction", -1),
    ],
)
def test_a_bad_unit_count_names_its_path(field: str, value: object) -> None:
    with pytest.raises(ResponseFormatError) as caught:
        parse_task({"task_id": "1", "task_status": "succeed", field: value})
    assert caught.value.path == f"data.{field}"


def test_resource_packs_are_parsed_with_utc_times() -> None:
    packs = parse_resource_packs(
        {
            "resource_pack_subscribe_infos": [
                {
                    "resource_pack_name": "Pack",
                    "resource_pack_id": "p1",
                    "resource_pack_type": "decreasing_total",
                    "total_quantity": 200.0,
                    "remaining_quantity": "118",
                    "purchase_time": 1_726_124_664_368,
                    "effective_time": 1_726_124_664_368,
                    "invalid_time": 1_728_716_664_368,
                    "status": "online",
                    "unknown": "ignored",
                }
            ]
        }
    )
    (pack,) = packs
    assert (pack.total, pack.remaining, pack.usable) == (200.0, 118.0, True)
    assert pack.expires_at is not None and pack.expires_at.tzinfo is timezone.utc
    runout = ResourcePack("n", "i", "t", 1.0, 0.0, "online")
    assert not runout.usable
    assert not ResourcePack("n", "i", "t", 1.0, 1.0, "expired").usable
    with pytest.raises(ResponseFormatError) as caught:
        parse_resource_packs({"resource_pack_subscribe_infos": [{"total_quantity": []}]})
    assert caught.value.path == "data.resource_pack_subscribe_infos[0].total_quantity"


# -- over the wire ----------------------------------------------------------------------


async def test_packs_are_listed_and_drawn_down_by_finished_tasks() -> None:
    now = time.time()
    packs = [
        SimPack(name="Big", total=10, expires_at=now + 300 * DAY),
        SimPack(name="Soon", total=2, expires_at=now + 10 * DAY),
        SimPack(name="Old", total=5, purchased_at=now - 500 * DAY, expires_at=now + 400 * DAY),
    ]
    async with Simulator(submit_time=0.01, processing_time=0.02, resource_packs=packs) as sim:
        async with _client(sim) as kling:
            before = {p.name: p for p in await kling.resource_packs()}
            assert set(before) == {"Big", "Soon"}  # "Old" was bought before the window
            assert before["Big"].status == "online" and before["Big"].usable
            assert before["Big"].purchased_at is not None
            assert before["Big"].purchased_at.tzinfo is timezone.utc
            for n in range(3):
                done = await kling.extend_and_wait(ExtendRequest(VIDEO, f"step {n}"))
                assert done.units_deducted == 1.0
            after = {p.name: p for p in await kling.resource_packs()}
            # The pack that expires first pays first.
            assert after["Soon"].remaining == 0 and after["Soon"].status == "runout"
            assert after["Big"].remaining == 9
            old = await kling.resource_packs(since=datetime.now(timezone.utc) - timedelta(days=600))
            assert {p.name for p in old} == {"Big", "Soon", "Old"}
            assert [p.name for p in await kling.resource_packs(name="Big")] == ["Big"]
            with pytest.raises(ValidationError):
                await kling.resource_packs(name=" ")
        # Four queries, two of them back to back, and no refusal for asking too fast:
        # the client spaced them.
        assert sim.counters.costs_queries == 4
        assert sim.counters.costs_too_fast == 0


async def test_no_usable_pack_is_1102_and_never_retried() -> None:
    async with Simulator(
        submit_time=0.01, processing_time=0.02, resource_packs=[SimPack(total=1)]
    ) as sim:
        async with _client(sim) as kling:
            await kling.extend_and_wait(ExtendRequest(VIDEO, "the last unit"))
            with pytest.raises(InsufficientBalanceError) as caught:
                await kling.extend(ExtendRequest(VIDEO, "one too many"))
            assert caught.value.code == 1102
            (pack,) = await kling.resource_packs()
            assert (pack.remaining, pack.usable) == (0.0, False)
        assert sim.counters.rejected_1102 == 1
        assert sim.counters.tasks_created == 1


async def test_a_pack_not_yet_online_pays_nothing() -> None:
    later = time.time() + DAY
    async with (
        Simulator(resource_packs=[SimPack(effective_at=later)]) as sim,
        _client(sim) as kling,
    ):
        (pack,) = await kling.resource_packs()
        assert pack.status == "toBeOnline" and not pack.usable
        with pytest.raises(InsufficientBalanceError):
            await kling.extend(ExtendRequest(VIDEO, "not yet"))


async def test_a_gateway_without_the_endpoint_says_so() -> None:
    async with Simulator(prefix="/kling") as sim, _client(sim) as kling:
        with pytest.raises(NotFoundError) as caught:
            await kling.resource_packs()
    message = str(caught.value)
    assert sim.base_url in message and "does not offer /account/costs" in message
    assert sim.api_key is not None and sim.api_key not in message


async def test_the_simulator_refuses_queries_closer_than_a_second() -> None:
    # The oracle's own rule, seen from two clients that know nothing of each other.
    async with Simulator() as sim, _client(sim) as first, _client(sim) as second:
        await first.resource_packs()
        await second.resource_packs()  # answered 1302 first, then retried
    assert sim.counters.costs_too_fast >= 1
    assert sim.counters.costs_queries == 2 + sim.counters.costs_too_fast


async def test_units_and_watermarks_survive_the_journal(tmp_path: Path) -> None:
    journal = tmp_path / "batch.journal"
    requests = [ExtendRequest(VIDEO, f"row {n}", watermark=True) for n in range(3)]
    async with Simulator(submit_time=0.01, processing_time=0.02) as sim:
        async with _client(sim) as kling:
            first = [r async for r in kling.extend_many(requests, journal=journal)]
        async with _client(sim) as kling:
            again = [r async for r in kling.extend_many(requests, journal=journal)]
        assert sim.counters.tasks_created == 3
    for result in [*first, *again]:
        assert result.ok and result.task is not None
        assert result.task.units_deducted == 1.0
        assert result.task.expires_at is not None
        (video,) = result.task.videos
        assert video.watermark_url is not None and "watermark" in video.watermark_url
    assert {r.task.task_id for r in first if r.task} == {r.task.task_id for r in again if r.task}
