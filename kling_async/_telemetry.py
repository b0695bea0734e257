"""OpenTelemetry: the spans and metrics the client reports, when the ``otel`` extra is there.

With ``opentelemetry-api`` installed, the client reports through the application's
providers; until the application configures an SDK the API's providers are proxies that
record nothing, and then this module does nothing either (it asks once per operation
whether a real provider is set, so the no-SDK path costs a lookup, not a span). Without
the package nothing of OpenTelemetry is ever imported.

What is reported (API.md, Telemetry):

- a CLIENT span per HTTP request, named after its method, with the stable HTTP client
  attributes (``http.request.method``, ``url.full``, ``server.address``,
  ``server.port``, ``http.response.status_code``, ``error.type``,
  ``http.request.resend_count``), and the ``http.client.request.duration`` histogram;
- ``kling extend`` and ``kling wait`` spans with ``kling.*`` attributes;
- ``kling.task.duration``, ``kling.tasks.running``, ``kling.creates.refused`` and
  ``kling.account.limit``.

Only ids, statuses, codes and numbers are recorded: never a prompt, a header or a key.
The base URL never carries credentials (the configuration refuses ``user:pass@``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import sys
import urllib.parse
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from kling_async._models import Task

__all__ = [
    "AVAILABLE",
    "account_limit",
    "http_span",
    "operation",
    "task_created",
    "task_finished",
]


def _findable() -> bool:
    # Looks for the package without importing any of it.
    try:
        return importlib.util.find_spec("opentelemetry") is not None
    except (ImportError, ValueError):  # blocked (sys.modules entry None) or broken
        return False


#: Whether ``opentelemetry-api`` can be imported (it is imported only when first used).
AVAILABLE: Final = _findable()
#: A provider named in the environment is made by the API on first use: load it then.
_PROVIDER_FROM_ENVIRONMENT: Final = any(
    name in os.environ for name in ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER")
)

_NAME: Final = "kling_async"

#: Task ids created by this process and not yet seen finished (for kling.tasks.running).
_RUNNING: set[str] = set()


class _State:
    """The API's modules, loaded on first use, and what was made from the providers."""

    trace: Any = None
    metrics: Any = None
    #: The API modules whose globals hold a provider once the application sets one.
    trace_globals: Any = None
    metrics_globals: Any = None
    #: Whether a provider is named in the environment (then always ask the API).
    from_environment = False
    proxy_tracer_provider: Any = None
    proxy_meter_provider: type[Any] | None = None
    tracer_for: Any = None
    tracer: Any = None
    meter_for: Any = None
    instruments: dict[str, Any] = {}  # noqa: RUF012 - one process-wide registry


_state = _State()


def _load() -> bool:
    if _state.trace is not None:
        return True
    if not AVAILABLE:
        return False
    if _state.trace is None:
        from opentelemetry import metrics, trace

        _state.trace, _state.metrics = trace, metrics
        _state.proxy_tracer_provider = trace.ProxyTracerProvider
        metrics_internal: Any = None
        with contextlib.suppress(ImportError):
            from opentelemetry.metrics import _internal as metrics_internal
        if hasattr(trace, "_TRACER_PROVIDER") and hasattr(metrics_internal, "_METER_PROVIDER"):
            _state.trace_globals, _state.metrics_globals = trace, metrics_internal
        _state.from_environment = _PROVIDER_FROM_ENVIRONMENT
        try:
            from opentelemetry.metrics._internal import _ProxyMeterProvider
        except ImportError:  # pragma: no cover - a future API without it
            _state.proxy_meter_provider = None
        else:
            _state.proxy_meter_provider = _ProxyMeterProvider
    return True


def enabled() -> bool:
    """False when no provider is set (no SDK configured): then nothing is worth making.

    The common case of the ``otel`` extra without an SDK costs two attribute reads here,
    not the API's provider look-ups (docs/performance.md has the figure).
    """
    if _state.trace is None:
        # Nobody has imported the API: nobody can have set a provider. Importing it
        # ourselves would only cost (its import grows every garbage collection's work).
        modules = sys.modules
        if not AVAILABLE or (
            "opentelemetry.trace" not in modules
            and "opentelemetry.metrics" not in modules
            and not _PROVIDER_FROM_ENVIRONMENT
        ):
            return False
        _load()
    if _state.trace_globals is None or _state.from_environment:
        return True
    return (
        _state.trace_globals._TRACER_PROVIDER is not None
        or _state.metrics_globals._METER_PROVIDER is not None
    )


def tracer() -> Any:
    """The tracer, or None when spans would go nowhere (no package, or no SDK set)."""
    if not enabled():
        return None
    provider = _state.trace.get_tracer_provider()
    if isinstance(provider, _state.proxy_tracer_provider):
        return None
    if provider is not _state.tracer_for:
        from kling_async import __version__

        _state.tracer_for = provider
        _state.tracer = provider.get_tracer(_NAME, __version__)
    return _state.tracer


def _instrument(name: str) -> Any:
    """A metric instrument, or None when measurements would go nowhere."""
    if not enabled():
        return None
    provider = _state.metrics.get_meter_provider()
    proxy = _state.proxy_meter_provider
    if proxy is not None and isinstance(provider, proxy):
        return None
    if provider is not _state.meter_for:
        from kling_async import __version__

        meter = provider.get_meter(_NAME, __version__)
        _state.meter_for = provider
        _state.instruments = {
            "http.client.request.duration": meter.create_histogram(
                "http.client.request.duration",
                unit="s",
                description="Duration of HTTP client requests.",
            ),
            "kling.task.duration": meter.create_histogram(
                "kling.task.duration",
                unit="s",
                description="Time from a task's creation to its end, by final status.",
            ),
            "kling.tasks.running": meter.create_up_down_counter(
                "kling.tasks.running",
                unit="{task}",
                description="Tasks this process created and has not yet seen finished.",
            ),
            "kling.creates.refused": meter.create_counter(
                "kling.creates.refused",
                unit="{create}",
                description="Creates refused because the account ran its limit (1303).",
            ),
            "kling.account.limit": meter.create_gauge(
                "kling.account.limit",
                unit="{task}",
                description="The running-task limit an account last saw.",
            ),
        }
    return _state.instruments.get(name)


# -- HTTP requests ----------------------------------------------------------------------


class HttpSpan:
    """One HTTP request's span and duration measurement (made only when either records)."""

    __slots__ = ("attributes", "histogram", "span", "started")

    def __init__(self, span: Any, histogram: Any, attributes: dict[str, Any], started: float):
        self.span = span
        self.histogram = histogram
        self.attributes = attributes
        self.started = started

    def end(self, status: int | None, error_type: str | None, ended: float) -> None:
        attributes = self.attributes
        if status is not None:
            attributes["http.response.status_code"] = status
        if error_type is not None:
            attributes["error.type"] = error_type
        if self.histogram is not None:
            self.histogram.record(ended - self.started, attributes)
        span = self.span
        if span is not None:
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if error_type is not None:
                span.set_attribute("error.type", error_type)
                span.set_status(_state.trace.Status(_state.trace.StatusCode.ERROR))
            span.end()


def http_span(method: str, url: str, resend_count: int, started: float) -> HttpSpan | None:
    """Start reporting one HTTP request (None: nothing records it)."""
    if not enabled():
        return None
    tracer_ = tracer()
    histogram = _instrument("http.client.request.duration")
    if tracer_ is None and histogram is None:
        return None
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    metric_attributes: dict[str, Any] = {
        "http.request.method": method,
        "server.address": parts.hostname or "",
        "server.port": port,
    }
    span = None
    if tracer_ is not None:
        attributes = {**metric_attributes, "url.full": url}
        if resend_count:
            attributes["http.request.resend_count"] = resend_count
        span = tracer_.start_span(method, kind=_state.trace.SpanKind.CLIENT, attributes=attributes)
    return HttpSpan(span, histogram, metric_attributes, started)


# -- operations (create, wait) ------------------------------------------------------------


class Operation:
    """A ``kling extend`` or ``kling wait`` span, current while the operation runs."""

    __slots__ = ("_scope", "span")

    def __init__(self, tracer_: Any, name: str, attributes: dict[str, Any]) -> None:
        self.span = tracer_.start_span(name, attributes=attributes)
        self._scope = _state.trace.use_span(self.span, end_on_exit=True)

    def __enter__(self) -> Operation:
        self._scope.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.failed(exc)
        # use_span would record the exception with its message: ours are set by hand.
        self._scope.__exit__(None, None, None)

    def task(self, task: Task) -> None:
        """Record what is known of the task."""
        span = self.span
        span.set_attribute("kling.task_id", task.task_id)
        if task.external_task_id is not None:
            span.set_attribute("kling.external_task_id", task.external_task_id)
        if task.request_id is not None:
            span.set_attribute("kling.request_id", task.request_id)
        span.set_attribute("kling.task.status", task.status.value)
        if task.units_deducted is not None:
            span.set_attribute("kling.units_deducted", task.units_deducted)

    def failed(self, error: BaseException) -> None:
        """Mark the span failed: the error's class and service code, never its text."""
        span = self.span
        span.set_attribute("error.type", type(error).__name__)
        code = getattr(error, "code", None)
        if isinstance(code, int):
            span.set_attribute("kling.error.code", code)
        request_id = getattr(error, "request_id", None)
        if isinstance(request_id, str):
            span.set_attribute("kling.request_id", request_id)
        task = getattr(error, "task", None)
        if task is not None and hasattr(task, "task_id"):
            self.task(task)
        span.set_status(_state.trace.Status(_state.trace.StatusCode.ERROR))


def operation(name: str, attributes: dict[str, Any]) -> Operation | None:
    """A span for `name` made current while it runs, or None when nothing records it."""
    if not enabled():
        return None
    tracer_ = tracer()
    if tracer_ is None:
        return None
    return Operation(tracer_, name, attributes)


def set_current(key: str, value: str | float) -> None:
    """Set an attribute on the current span (a create's external id, say), if recording."""
    if _state.trace is not None:
        span = _state.trace.get_current_span()
        if span.is_recording():
            span.set_attribute(key, value)


def current_context() -> Any:
    """The current span's context (for links), or None."""
    if tracer() is None:
        return None
    context = _state.trace.get_current_span().get_span_context()
    return context if context.is_valid else None


#: The ``traceparent`` of the last ``kling extend`` span that made a task in this
#: context (a batch item's), for the journal.
_CREATED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kling_created_trace", default=None
)


def note_created(operation: Operation) -> None:
    """Remember the create span that made a task, as a W3C ``traceparent``."""
    context = operation.span.get_span_context()
    if context.is_valid:
        _CREATED.set(f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}")


def created_traceparent() -> str | None:
    """The ``traceparent`` of the create that made this context's last task, if any."""
    return _CREATED.get()


def link_back(traceparent: str, name: str, attributes: dict[str, Any]) -> None:
    """Record span `name` linked to a span of an earlier run, given its ``traceparent``."""
    if tracer() is None:
        return
    try:
        _, trace_id, span_id, flags = traceparent.split("-")
        context = _state.trace.SpanContext(
            int(trace_id, 16),
            int(span_id, 16),
            is_remote=True,
            trace_flags=_state.trace.TraceFlags(int(flags, 16)),
        )
    except ValueError:  # not a traceparent: nothing to link to
        return
    if context.is_valid:
        linked_span(name, context, attributes)


def linked_span(name: str, link_to: Any, attributes: dict[str, Any]) -> None:
    """Record a (zero-length) span `name` in the current context, linked to `link_to`."""
    tracer_ = tracer()
    if tracer_ is None or link_to is None:
        return
    link = _state.trace.Link(link_to)
    tracer_.start_span(name, links=[link], attributes=attributes).end()


# -- metrics ----------------------------------------------------------------------------


def task_created(task: Task) -> None:
    """A create of this process made `task`."""
    running = _instrument("kling.tasks.running")
    if running is not None and not task.is_terminal and task.task_id not in _RUNNING:
        _RUNNING.add(task.task_id)
        running.add(1)


def task_finished(task: Task) -> None:
    """`task` was seen finished (counted once per task this process created)."""
    if task.task_id not in _RUNNING:
        return
    _RUNNING.discard(task.task_id)
    running = _instrument("kling.tasks.running")
    if running is not None:
        running.add(-1)
    duration = _instrument("kling.task.duration")
    if duration is not None and task.created_at is not None and task.updated_at is not None:
        seconds = max(0.0, (task.updated_at - task.created_at).total_seconds())
        duration.record(seconds, {"kling.task.status": task.status.value})


def create_refused() -> None:
    """A create was answered 1303 (the account runs as many tasks as it may)."""
    refused = _instrument("kling.creates.refused")
    if refused is not None:
        refused.add(1)


def account_limit(limit: int, kind: str) -> None:
    """The running-task limit an account (`kind`: its class) now sees."""
    gauge = _instrument("kling.account.limit")
    if gauge is not None:
        gauge.set(limit, {"kling.account": kind})
