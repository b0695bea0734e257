"""OpenTelemetry, with the SDK's in-memory exporter and metric reader (the `otel` tests).

The SDK is installed by the test extra only; the providers are set once per process
(OpenTelemetry allows no second set), so every test here shares them and reads what it
made. Every span recorded by this module is checked at its end for prompts, keys,
secrets and tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from kling_async import (
    ExtendRequest,
    InMemoryAccount,
    KlingClient,
    PollPolicy,
    TaskFailedError,
)
from kling_async.callbacks import CallbackReceiver
from kling_async.testing import Simulator

VIDEO = "828006748715380777"
PROMPT = "a very private prompt 7f3a9c"
POLL = PollPolicy(initial=0.02, factor=1.5, max_interval=0.1)
SECRET_KEY = "sim-secret-key-0123456789abcdef"

_EXPORTER = InMemorySpanExporter()
_READER = InMemoryMetricReader()
_ALL_SPANS: list[ReadableSpan] = []
_SECRETS: set[str] = {PROMPT, SECRET_KEY}


def _install() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[_READER]))


@pytest.fixture(scope="module", autouse=True)
def _providers() -> Iterator[None]:
    _install()
    yield
    _ALL_SPANS.extend(_EXPORTER.get_finished_spans())
    assert _ALL_SPANS
    for span in _ALL_SPANS:
        texts = [span.name, *map(str, span.attributes.values())]
        texts += [str(v) for event in span.events for v in event.attributes.values()]
        if span.status.description:
            texts.append(span.status.description)
        for text in texts:
            for secret in _SECRETS:
                assert secret not in text, (span.name, text)
            assert not text.startswith("eyJ"), (span.name, text)  # a JWT


@pytest.fixture
def spans() -> InMemorySpanExporter:
    _ALL_SPANS.extend(_EXPORTER.get_finished_spans())
    _EXPORTER.clear()
    return _EXPORTER


@pytest.fixture
async def jwt_client() -> AsyncIterator[tuple[Simulator, KlingClient]]:
    async with Simulator(
        submit_time=0.02, processing_time=0.05, secret_key=SECRET_KEY, api_key=None
    ) as sim:
        assert sim.access_key is not None
        async with KlingClient(
            access_key=sim.access_key,
            secret_key=SECRET_KEY,
            base_url=sim.base_url,
            poll=POLL,
            timeout=5.0,
        ) as kling:
            yield sim, kling


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def _points(name: str) -> list[Any]:
    data = _READER.get_metrics_data()
    found: list[Any] = []
    if data is None:  # nothing measured yet in this process (the test runs first here)
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found += list(metric.data.data_points)
    return found


async def test_a_create_with_one_retry(
    spans: InMemorySpanExporter, jwt_client: tuple[Simulator, KlingClient]
) -> None:
    sim, kling = jwt_client
    sim.inject("503", on="create")
    task = await kling.extend(ExtendRequest(VIDEO, PROMPT))
    (extend,) = _named(spans, "kling extend")
    assert extend.attributes["kling.task_id"] == task.task_id
    assert extend.attributes["kling.external_task_id"] == task.external_task_id
    assert extend.attributes["kling.request_id"] == task.request_id
    children = [s for s in spans.get_finished_spans() if s.parent == extend.context]
    posts = [s for s in children if s.name == "POST"]
    assert [s.attributes.get("http.response.status_code") for s in posts] == [503, 200]
    first, second = posts
    assert first.kind is SpanKind.CLIENT and first.status.status_code is StatusCode.ERROR
    assert first.attributes["error.type"] == "503"
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.request.resend_count"] == 1
    assert "error.type" not in second.attributes
    for span in posts:
        assert span.attributes["http.request.method"] == "POST"
        assert span.attributes["url.full"] == f"{sim.base_url}/v1/videos/video-extend"
        assert span.attributes["server.address"] == "127.0.0.1"
        assert span.attributes["server.port"] == sim.port
    # Between the two POSTs, the look-ups that proved the task absent (404, code 1203).
    looks = [s.attributes["http.response.status_code"] for s in children if s.name == "GET"]
    assert looks and set(looks) == {404}


async def test_a_wait_reports_its_final_status(
    spans: InMemorySpanExporter, jwt_client: tuple[Simulator, KlingClient]
) -> None:
    _, kling = jwt_client
    running = sum(p.value for p in _points("kling.tasks.running"))
    task = await kling.extend(ExtendRequest(VIDEO, PROMPT))
    assert sum(p.value for p in _points("kling.tasks.running")) == running + 1
    done = await kling.wait_for_task(task)
    (wait,) = _named(spans, "kling wait")
    assert wait.attributes["kling.task_id"] == done.task_id
    assert wait.attributes["kling.task.status"] == "succeed"
    assert wait.attributes["kling.units_deducted"] == 1.0
    assert wait.status.status_code is not StatusCode.ERROR
    polls = [s for s in spans.get_finished_spans() if s.parent == wait.context]
    assert polls and all(s.name == "GET" for s in polls)
    assert sum(p.value for p in _points("kling.tasks.running")) == running
    durations = [p for p in _points("kling.task.duration") if p.attributes]
    assert any(p.attributes["kling.task.status"] == "succeed" and p.count for p in durations)
    requests = _points("http.client.request.duration")
    assert any(p.attributes.get("http.response.status_code") == 200 for p in requests)


async def test_a_failed_task_marks_its_wait(spans: InMemorySpanExporter) -> None:
    async with (
        Simulator(submit_time=0.01, processing_time=0.02, failure_rate=1.0) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=POLL) as kling,
    ):
        _SECRETS.add(str(sim.api_key))
        with pytest.raises(TaskFailedError):
            await kling.extend_and_wait(ExtendRequest(VIDEO, PROMPT))
    (wait,) = _named(spans, "kling wait")
    assert wait.status.status_code is StatusCode.ERROR
    assert wait.attributes["error.type"] == "TaskFailedError"
    assert wait.attributes["kling.task.status"] == "failed"
    assert not wait.events  # no exception event: its text is not recorded


async def test_refusals_and_the_account_limit_are_measured(spans: InMemorySpanExporter) -> None:
    refused = sum(p.value for p in _points("kling.creates.refused"))
    async with (
        Simulator(submit_time=0.01, processing_time=0.1, running_limit=1) as sim,
        KlingClient(
            api_key=sim.api_key, base_url=sim.base_url, poll=POLL, account=InMemoryAccount()
        ) as kling,
    ):
        _SECRETS.add(str(sim.api_key))
        await asyncio.gather(
            *(kling.extend_and_wait(ExtendRequest(VIDEO, f"{PROMPT} {n}")) for n in range(4))
        )
        answered_1303 = sim.counters.rejected_1303
    assert sum(p.value for p in _points("kling.creates.refused")) == refused + answered_1303
    limits = [p for p in _points("kling.account.limit") if p.attributes]
    assert limits and all(p.attributes["kling.account"] == "InMemoryAccount" for p in limits)


async def test_the_callback_that_finished_a_task_links_to_its_wait(
    spans: InMemorySpanExporter,
) -> None:
    receiver = CallbackReceiver()
    async with (
        receiver.serve() as url,
        Simulator(submit_time=0.01, processing_time=0.05) as sim,
        KlingClient(
            api_key=sim.api_key,
            base_url=sim.base_url,
            poll=PollPolicy(initial=5.0, max_interval=10.0),
        ) as kling,
    ):
        _SECRETS.add(str(sim.api_key))
        done = await kling.extend_and_wait(
            ExtendRequest(VIDEO, PROMPT, callback_url=url), callbacks=receiver
        )
    (wait,) = _named(spans, "kling wait")
    callbacks = _named(spans, "kling callback")
    finishing = [s for s in callbacks if s.attributes["kling.task.status"] == "succeed"]
    assert finishing and finishing[0].attributes["kling.task_id"] == done.task_id
    assert [link.context for link in finishing[0].links] == [wait.context]


async def test_a_resumed_batch_links_back_to_the_run_that_created_its_tasks(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    journal = tmp_path / "traced.journal"
    requests = [ExtendRequest(VIDEO, PROMPT) for _ in range(3)]
    async with (
        Simulator(submit_time=0.01, processing_time=0.2) as sim,
        KlingClient(api_key=sim.api_key, base_url=sim.base_url, poll=POLL) as kling,
    ):
        _SECRETS.add(str(sim.api_key))
        first = [r async for r in kling.extend_many(requests, wait=False, journal=journal)]
        created = {
            (span.context.trace_id, span.context.span_id) for span in _named(spans, "kling extend")
        }
        # The run is over (a crash, say); a new run finishes the batch from the journal.
        again = [r async for r in kling.extend_many(requests, journal=journal)]
    assert all(result.ok for result in first + again)
    assert sim.counters.tasks_created == 3
    resumes = _named(spans, "kling resume")
    assert len(resumes) == 3
    links = {(link.context.trace_id, link.context.span_id) for s in resumes for link in s.links}
    assert links == created and len(created) == 3
