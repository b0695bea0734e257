"""A simulator of Kling's video-extend API, for tests.

`Simulator` serves the API (both auth modes, the task lifecycle, paging, service error
codes) and the result files on local sockets, injects faults (5xx, 429 with
`Retry-After`, dropped connections before and after a task is created, slow answers,
non-JSON and cut-off bodies), delivers (optionally signed) callbacks, and counts what it
saw so tests can assert on it:

```python
from kling_async.testing import Simulator

async with Simulator(processing_time=0.1) as sim:
    ...  # point a client at sim.base_url with api_key=sim.api_key
    assert not sim.counters.duplicate_external_ids
```

Pass `clock=ManualClock()` to move time in a test instead of waiting for it,
`time_spread=` to vary task times, and `state_path=` to remember the account across runs.
From synchronous code use `with Simulator().run_in_thread() as sim: ...`; pytest users can
enable the `kling_simulator` and `kling_env` fixtures with
`pytest_plugins = ["kling_async.testing.pytest_plugin"]`. Run it stand-alone with
`python -m kling_async.testing --port 8765`.

`set_testing(True)` shortens the client's waits that exist only for real networks (see
its docstring), as stamina's test mode does.
"""

from ._clock import ManualClock
from ._mode import set_testing
from ._models import (
    ALL_FAULT_KINDS,
    CallbackDelivery,
    Counters,
    FaultKind,
    FaultTarget,
    RecordedRequest,
    SimTask,
    SimVideo,
)
from ._packs import SimPack
from ._simulator import Simulator
from ._store import FAILURE_MESSAGES

__all__ = [
    "ALL_FAULT_KINDS",
    "FAILURE_MESSAGES",
    "CallbackDelivery",
    "Counters",
    "FaultKind",
    "FaultTarget",
    "ManualClock",
    "RecordedRequest",
    "SimPack",
    "SimTask",
    "SimVideo",
    "Simulator",
    "set_testing",
]
