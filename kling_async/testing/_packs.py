"""The simulated account's resource packs: what they hold, and finished tasks drawing them down.

A pack's remainder is what it was configured with, less the units of every task that
succeeded since, charged in the order the tasks finished, from the usable pack that
expires first. Charges are settled lazily (when a create or a costs query arrives), from
a heap of the tasks' finishing times, so a simulator without packs pays nothing.
Written against the wire names alone: nothing of the client's parsing is used here.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

from ._models import SUCCEED, SimTask

__all__ = ["UNITS_PER_TASK", "PackLedger", "SimPack"]

#: Units each succeeded task is billed (its ``final_unit_deduction``).
UNITS_PER_TASK = 1.0

_DAY = 86_400.0


@dataclasses.dataclass(slots=True)
class SimPack:
    """A resource pack of the simulated account (``Simulator(resource_packs=[...])``).

    Times are Unix seconds by the simulator's clock; left out, the pack was bought and
    took effect a day before the simulator was made, and expires a year after that.

    Attributes:
        name: ``resource_pack_name``.
        total: ``total_quantity``.
        remaining: units left when the simulator starts (default: `total`).
        type: ``resource_pack_type``.
        status: a fixed ``status`` (e.g. ``"toBeOnline"``); `None` derives it from the
            times and the remainder (``toBeOnline``, ``online``, ``runout``, ``expired``).
        purchased_at: ``purchase_time`` (costs queries select packs by it).
        effective_at: ``effective_time``.
        expires_at: ``invalid_time``.
        id: ``resource_pack_id`` (default: made up from the pack's position).
    """

    name: str = "Video Extend Pack"
    total: float = 100.0
    remaining: float | None = None
    type: str = "decreasing_total"
    status: str | None = None
    purchased_at: float | None = None
    effective_at: float | None = None
    expires_at: float | None = None
    id: str | None = None


@dataclasses.dataclass(slots=True)
class _Held:
    pack: SimPack
    id: str
    remaining: float
    purchased_at: float
    effective_at: float
    expires_at: float

    def status(self, now: float) -> str:
        if self.pack.status is not None:
            return self.pack.status
        if now < self.effective_at:
            return "toBeOnline"
        if now >= self.expires_at:
            return "expired"
        if self.remaining <= 0:
            return "runout"
        return "online"

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "resource_pack_name": self.pack.name,
            "resource_pack_id": self.id,
            "resource_pack_type": self.pack.type,
            "total_quantity": self.pack.total,
            "remaining_quantity": max(self.remaining, 0.0),
            "purchase_time": int(self.purchased_at * 1000),
            "effective_time": int(self.effective_at * 1000),
            "invalid_time": int(self.expires_at * 1000),
            "status": self.status(now),
        }


class PackLedger:
    """The packs and the tasks still to be charged to them."""

    def __init__(self, packs: list[SimPack], made_at: float) -> None:
        self._held: list[_Held] = []
        for n, pack in enumerate(packs):
            purchased = made_at - _DAY if pack.purchased_at is None else pack.purchased_at
            effective = purchased if pack.effective_at is None else pack.effective_at
            self._held.append(
                _Held(
                    pack=pack,
                    id=pack.id if pack.id is not None else f"sim-pack-{n + 1}",
                    remaining=pack.total if pack.remaining is None else pack.remaining,
                    purchased_at=purchased,
                    effective_at=effective,
                    expires_at=purchased + 365 * _DAY
                    if pack.expires_at is None
                    else pack.expires_at,
                )
            )
        self._due: list[tuple[float, int, SimTask]] = []
        self._seq = 0
        self._charged: set[str] = set()

    def track(self, task: SimTask) -> None:
        """Charge `task` once it has succeeded (call again when it is finished early)."""
        when = task.forced_at if task.forced_at is not None else task.finishes_at
        self._seq += 1
        heapq.heappush(self._due, (when, self._seq, task))

    def settle(self, now: float) -> None:
        """Charge every task that succeeded by `now`, in the order they finished."""
        due = self._due
        while due and due[0][0] <= now:
            finished_at, _, task = heapq.heappop(due)
            if task.task_id in self._charged or task.status_at(now) != SUCCEED:
                continue
            self._charged.add(task.task_id)
            self._charge(UNITS_PER_TASK, finished_at)

    def _charge(self, units: float, at: float) -> None:
        usable = sorted(
            (held for held in self._held if held.status(at) == "online"),
            key=lambda held: held.expires_at,
        )
        for held in usable:
            taken = min(units, held.remaining)
            held.remaining -= taken
            units -= taken
            if units <= 0:
                return

    def usable(self, now: float) -> bool:
        """Whether some pack can pay for a task at `now` (settled first)."""
        self.settle(now)
        return any(held.status(now) == "online" for held in self._held)

    def infos(self, now: float, start: float, end: float, name: str | None) -> list[dict[str, Any]]:
        """``resource_pack_subscribe_infos``: packs bought in [start, end] (seconds)."""
        self.settle(now)
        return [
            held.to_json(now)
            for held in self._held
            if start <= held.purchased_at <= end and (name is None or held.pack.name == name)
        ]
