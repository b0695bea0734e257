"""Type-checked only (mypy), never run: the public API as users write it."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

import kling_async
from kling_async import (
    BatchResult,
    ExtendRequest,
    KlingClient,
    KlingError,
    PollPolicy,
    Task,
    TaskFailedError,
    TaskStatus,
    Video,
    WaitTimeoutError,
)
from kling_async.callbacks import CallbackReceiver
from kling_async.testing import Simulator


async def single() -> None:
    async with KlingClient(api_key="key", poll=PollPolicy(initial=1.0)) as kling:
        task: Task = await kling.extend_video("828006748715380777", "prompt", cfg_scale=0.5)
        done: Task = await kling.wait_for_task(task, timeout=60.0, on_update=print)
        url: str = done.videos[0].url
        seconds: float = done.videos[0].duration
        status: TaskStatus = done.status
        finished: bool = done.is_terminal and done.succeeded and not done.failed
        page: list[Task] = await kling.list_tasks(page=1, page_size=50)
        async for one in kling.iter_tasks(page_size=100):
            assert isinstance(one.task_id, str)
        again: Task = await kling.get_task(external_task_id="mine")
        path: Path = await kling.download(done, Path("out"), overwrite=True)
        steps: list[Task] = await kling.extend_chain(
            Video(id="v", url=url, duration=seconds), ["a", "b"], cfg_scale=0.3
        )
        print(status, finished, page, again, path, steps)


async def update(task: Task) -> None:
    print(task.raw_status)


async def errors() -> None:
    kling = KlingClient(access_key="ak", secret_key="sk", base_url="https://x.example")
    try:
        await kling.extend_and_wait(ExtendRequest(video_id="v", prompt="p"), on_update=update)
    except TaskFailedError as error:
        failed: Task = error.task
        print(failed)
    except WaitTimeoutError as error:
        last: Task = error.task
        print(last)
    except kling_async.APIStatusError as error:
        code: int | None = error.code
        status: int = error.status
        request_id: str | None = error.request_id
        print(code, status, request_id)
    except KlingError:
        pass
    finally:
        await kling.aclose()


async def batch() -> None:
    receiver = CallbackReceiver(url="https://bot.example/kling/callback")
    app = web.Application()
    receiver.add_to(app)
    requests = (ExtendRequest(video_id=f"v{i}", prompt="p") for i in range(10))
    async with KlingClient() as kling:
        async for result in kling.extend_many(
            requests,
            concurrency=4,
            journal="batch.sqlite",
            callbacks=receiver,
            on_progress=lambda p: print(p.succeeded, p.failed, p.concurrency),
        ):
            item: BatchResult = result
            ok: bool = item.ok
            error: KlingError | None = item.error
            print(ok, error, item.index, item.request.video_id)


async def simulator() -> None:
    async with Simulator(processing_time=0.1) as sim:
        base: str = sim.base_url
        sim.inject("drop_after", on="create")
        created: int = sim.counters.tasks_created
        print(base, created)


def show(task: Task) -> None:
    print(task.status)


async def progress(snapshot: kling_async.BatchProgress) -> None:
    print(snapshot.running)


async def accounts() -> None:
    from kling_async import CallbackSource, InMemoryAccount, OnProgress, OnUpdate
    from kling_async.redis import RedisAccount

    on_update: OnUpdate = show
    on_progress: OnProgress = progress
    source: CallbackSource = CallbackReceiver(url="https://bot.example/kling/callback")
    shared = InMemoryAccount(max_running=4)
    limit: int = shared.limit
    redis_account = RedisAccount("redis://127.0.0.1:6379/0", name="team", lease=30.0)
    async with KlingClient(account=shared) as one, KlingClient(account=redis_account) as two:
        task = await one.extend_and_wait(
            ExtendRequest(video_id="v", prompt="p"), on_update=on_update, callbacks=source
        )
        results = two.extend_many(
            [ExtendRequest(video_id="v", prompt="p")], on_progress=on_progress
        )
        await results.aclose()  # an AsyncGenerator: aclose is typed
        print(task.task_id, limit)
    await redis_account.aclose()


def mounted() -> None:
    receiver = CallbackReceiver()
    app = web.Application()
    app.router.add_post("/kling/callback", receiver)
