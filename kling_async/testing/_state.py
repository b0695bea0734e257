"""The simulator's state file: what it remembers across runs, written atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson

__all__ = ["STATE_FORMAT", "STATE_VERSION", "SavedState", "read_state", "write_state"]

STATE_FORMAT = "kling-async-simulator-state"
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True, slots=True)
class SavedState:
    """A state file's content: the task store's data and the ports last listened on."""

    store: dict[str, Any]
    api_port: int | None
    files_port: int | None


def read_state(path: Path) -> SavedState | None:
    """The state saved at `path`, or `None` when there is no such file.

    Raises:
        ValueError: the file cannot be read, is not a state file, or has another version
            (the message names the file).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot read the simulator state file {str(path)!r}: {exc}") from exc
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the simulator state file {str(path)!r} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a simulator state file")
    if data.get("version") != STATE_VERSION:
        raise ValueError(
            f"the simulator state file {str(path)!r} has version {data.get('version')!r};"
            f" this simulator reads version {STATE_VERSION}"
        )
    store, api_port, files_port = data.get("store"), data.get("api_port"), data.get("files_port")
    ports_ok = all(p is None or (type(p) is int and 0 < p < 65536) for p in (api_port, files_port))
    if not isinstance(store, dict) or not ports_ok:
        raise ValueError(f"the simulator state file {str(path)!r} is damaged")
    return SavedState(store, api_port, files_port)


def write_state(path: Path, state: SavedState) -> None:
    """Write `state` to `path` atomically: a temporary file beside it, then `os.replace`.

    A crash leaves the previous file or the new one, never half of one (no fsync: it
    survives the process, not a power cut).
    """
    data = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "api_port": state.api_port,
        "files_port": state.files_port,
        "store": state.store,
    }
    body = orjson.dumps(data)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(body)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
