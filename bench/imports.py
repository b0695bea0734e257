"""Import time: ``import kling_async`` beside ``import aiohttp``, each in a fresh interpreter.

Each repetition starts a new ``python -c`` for each module (alternating which goes first)
and the child times its own import with `time.perf_counter`, so interpreter start-up is
left out; the medians are compared. Byte code is compiled by a first, uncounted run.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

#: What is timed: the package alone (its root loads the client on first use), the
#: client ready to use (aiohttp, attrs, backoff, orjson and our modules), and aiohttp.
STATEMENTS = {
    "aiohttp": "import aiohttp",
    "kling_async": "import kling_async",
    "KlingClient": "from kling_async import KlingClient",
}
MODULES = tuple(STATEMENTS)


def _once(module: str) -> float:
    code = (
        "import time; started = time.perf_counter(); "
        f"{STATEMENTS[module]}; print(time.perf_counter() - started)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return float(out.strip())


def measure(repetitions: int) -> dict[str, list[float]]:
    """Seconds per import of each module, one entry per repetition."""
    for module in MODULES:
        _once(module)  # compile and cache byte code
    times: dict[str, list[float]] = {module: [] for module in MODULES}
    for repetition in range(repetitions):
        for module in MODULES if repetition % 2 == 0 else MODULES[::-1]:
            times[module].append(_once(module))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


#: The command line's start-up, timed whole (interpreter start-up included, as a user
#: waits for it): ``--help`` and a usage error load click alone.
CLI_COMMANDS = {
    "kling-async --help": [sys.executable, "-m", "kling_async", "--help"],
    "kling-async extend (usage error)": [sys.executable, "-m", "kling_async", "extend"],
    "python -c 'import aiohttp'": [sys.executable, "-c", "import aiohttp"],
}
#: The target for ``kling-async --help`` on a quiet machine.
CLI_HELP_TARGET = 0.15


def _wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=False, capture_output=True)
    return time.perf_counter() - started


def measure_cli(repetitions: int) -> dict[str, list[float]]:
    """Wall seconds per run of each of `CLI_COMMANDS`, one entry per repetition."""
    names = tuple(CLI_COMMANDS)
    for name in names:
        _wall(CLI_COMMANDS[name])  # compile and cache byte code
    times: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(repetitions):
        for name in names if repetition % 2 == 0 else names[::-1]:
            times[name].append(_wall(CLI_COMMANDS[name]))
    return times
