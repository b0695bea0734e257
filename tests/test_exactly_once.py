"""Exactly-once creation over real sockets: ids that could change the route, 404s that
are not the service's "no such task", and a client used from a second event loop."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from kling_async import ExtendRequest, KlingClient, NotFoundError
from kling_async.testing import Simulator
from tests.conftest import FAST_POLL

ROUTE_CHANGING_IDS = [".", "..", "...", "a/b", "../x", "q?x=1", "h#frag", "50%", "a+b", "é-ü"]


@pytest.mark.parametrize("external_id", ROUTE_CHANGING_IDS)
async def test_a_dropped_create_with_any_id_is_looked_up_not_created_again(
    sim: Simulator, external_id: str
) -> None:
    sim.inject("drop_after", on="create")
    async with KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=FAST_POLL) as kling:
        task = await kling.extend(
            ExtendRequest(video_id="v1", prompt="p", external_task_id=external_id)
        )
        assert task.external_task_id == external_id
        found = await kling.get_task(external_task_id=external_id)
    assert found.task_id == task.task_id
    assert sim.counters.tasks_created == 1
    assert not sim.counters.duplicate_external_ids


@pytest.fixture
async def proxy_404_after_create(sim: Simulator) -> AsyncIterator[str]:
    """A proxy in front of the simulator: creates pass (then the answer is lost); every
    look-up gets the proxy's own 404 page, which says nothing about the task."""
    posts = 0

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal posts
        if request.method == "POST":
            posts += 1
            async with (
                KlingClient(api_key=sim.api_key, base_url=sim.base_url) as inner,
            ):
                await inner.extend(
                    ExtendRequest(
                        video_id="v1",
                        prompt="p",
                        external_task_id=(await request.json())["external_task_id"],
                    )
                )
            return web.Response(status=502, text="<html>bad gateway</html>")
        return web.Response(status=404, text="<html>Not Found</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_404_that_is_not_the_services_never_leads_to_a_second_create(
    sim: Simulator, proxy_404_after_create: str
) -> None:
    async with KlingClient(api_key="k", base_url=proxy_404_after_create, max_retries=3) as kling:
        with pytest.raises(NotFoundError) as caught:
            await kling.extend(ExtendRequest(video_id="v1", prompt="p"))
    assert caught.value.code is None  # the proxy's page, not code 1203
    assert sim.counters.tasks_created == 1


async def test_an_unknown_route_404_is_not_absence(sim: Simulator) -> None:
    # A base URL with the wrong prefix: the server answers 1202 (no such route).
    sim.inject("drop_after", on="create")
    async with KlingClient(api_key=sim.api_key, base_url=sim.base_url) as kling:
        await kling.extend(ExtendRequest(video_id="v1", prompt="p"))
    async with KlingClient(api_key=sim.api_key, base_url=sim.base_url + "/nope") as wrong:
        with pytest.raises(NotFoundError) as caught:
            await wrong.get_task("anything")
    assert caught.value.code == 1202


def test_a_client_belongs_to_the_loop_it_first_ran_in(sim_in_thread: Simulator) -> None:
    kling = KlingClient(api_key=sim_in_thread.api_key, base_url=sim_in_thread.base_url)

    async def create() -> str:
        task = await kling.extend(ExtendRequest(video_id="v1", prompt="p"))
        return task.task_id

    asyncio.run(create())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="belongs to the event loop it first ran in"):
            asyncio.run(create())
        asyncio.run(kling.aclose())  # closing afterwards is fine, from any loop
        gc.collect()  # no unclosed session, connector or socket to warn about
    assert sim_in_thread.counters.tasks_created == 1


@pytest.fixture
def sim_in_thread() -> object:
    with Simulator(submit_time=0.02, processing_time=0.05).run_in_thread() as simulator:
        yield simulator
