"""CPU per `get_task` with OpenTelemetry: absent, API installed without an SDK, SDK on.

Each measurement runs in a fresh process, so that "absent" really has nothing of
OpenTelemetry loaded (the package is hidden with ``sys.modules["opentelemetry"] = None``)
and the SDK's global providers of one mode never leak into another. Rounds alternate the
order of the modes; the ratios are medians of per-round ratios against "absent".

    python bench/telemetry.py [--rounds 5] [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from per_call import in_turn
from server import PROMPT, simulator_process

#: absent: the package hidden; api: installed, untouched by the application; imported:
#: the application imported the API but set no SDK; sdk: an SDK with a no-op exporter.
MODES = ("absent", "api", "imported", "sdk")
WARMUP = 200


def child(mode: str, base_url: str, api_key: str, task_id: str, calls: int) -> float:
    """CPU seconds per `get_task` in this process, set up as `mode` says."""
    if mode == "absent":
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    elif mode == "imported":
        import opentelemetry.metrics
        import opentelemetry.trace  # noqa: F401
    elif mode == "sdk":
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            SimpleSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class NoOpExporter(SpanExporter):
            def export(self, spans: object) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(NoOpExporter()))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider())
    from kling_async import KlingClient, _telemetry

    assert (mode != "absent") == _telemetry.AVAILABLE

    async def run() -> float:
        async with KlingClient(api_key=api_key, base_url=base_url) as kling:
            for _ in range(WARMUP):
                await kling.get_task(task_id)
            started = time.process_time()
            for _ in range(calls):
                await kling.get_task(task_id)
            return (time.process_time() - started) / calls

    return asyncio.run(run())


def _measure(mode: str, base_url: str, api_key: str, task_id: str, calls: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, base_url, api_key, task_id, str(calls)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent,
    )
    return float(out.stdout.strip())


def run(*, rounds: int, calls: int) -> dict[str, float]:
    """Median CPU per call (µs) of each mode, and the ratios against "absent"."""
    with simulator_process(submit_time=0, processing_time=0) as (base_url, api_key):
        from kling_async import KlingClient

        async def finished() -> str:
            async with KlingClient(api_key=api_key, base_url=base_url) as kling:
                task = await kling.extend_video("828006748715380777", PROMPT)
                return (await kling.wait_for_task(task, timeout=30)).task_id

        task_id = asyncio.run(finished())
        per_mode: dict[str, list[float]] = {mode: [] for mode in MODES}
        for round_ in range(rounds):
            for mode in in_turn(MODES, round_):
                per_mode[mode].append(_measure(mode, base_url, api_key, task_id, calls))
            print(
                "otel, round {}: {}".format(
                    round_ + 1,
                    ", ".join(f"{m} {per_mode[m][-1] * 1e6:.0f} µs" for m in MODES),
                ),
                flush=True,
            )
    report = {f"{mode}_us": round(statistics.median(v) * 1e6, 1) for mode, v in per_mode.items()}
    for mode in ("api", "imported", "sdk"):
        report[f"{mode}_ratio"] = round(
            statistics.median(
                x / a for x, a in zip(per_mode[mode], per_mode["absent"], strict=True)
            ),
            3,
        )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--child", nargs=5, metavar=("MODE", "BASE_URL", "KEY", "TASK", "N"))
    args = parser.parse_args()
    if args.child:
        mode, base_url, api_key, task_id, calls = args.child
        print(child(mode, base_url, api_key, task_id, int(calls)))
        return 0
    report = run(rounds=args.rounds, calls=args.calls)
    print(json.dumps(report, indent=2))
    ok = report["api_ratio"] <= 1.03
    print(
        f"API installed, no SDK: {report['api_ratio']:.3f}x (target <= 1.03x): "
        f"{'ok' if ok else 'MISSED'}; API imported by the application, no SDK: "
        f"{report['imported_ratio']:.3f}x; SDK with a no-op exporter: {report['sdk_ratio']:.3f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
