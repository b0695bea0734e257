"""Which file each batch row saved its video in: the names a batch hands out, and why.

A batch with ``--download`` gives every row a file name of its own: unique within the
run (two rows whose ids read alike, such as ``clip/1`` and ``clip_1``, or long ids cut
at the same place, get ``NAME.mp4`` and ``NAME-2.mp4``), and never a file already on
the disk, unless the journal's record says that this very row saved this very video
there. That record, `SavedFiles`, lives beside the journal (``JOURNAL.files.json``),
rewritten whole (and atomically) after each save, so a rerun of the same command
reports the files it saved before as its own, and a rerun with new prompts into the same
folder never takes another batch's video for its own: it gets a new name.

Losing the record is safe: the rerun downloads the videos again, under new names.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Final

import orjson

#: Characters kept in a file name made from an id (others become "_").
_UNSAFE_NAME: Final = re.compile(r"[^\w.-]")
#: The longest stem made from an id (file systems allow 255 bytes; room for "-N.mp4").
MAX_STEM: Final = 120
#: How many numbered names are tried before a row is given up on.
_MAX_TRIES: Final = 1000


def safe_stem(key: str) -> str:
    """A file name stem from an id: unsafe characters as "_", at most `MAX_STEM` long."""
    stem = _UNSAFE_NAME.sub("_", key)[:MAX_STEM]
    return "_" + stem[1:] if stem.startswith(".") else stem


def record_path(journal: Path) -> Path:
    """Where the record of the files saved by the batch of `journal` is kept."""
    return journal.with_name(journal.name + ".files.json")


def _key(path: Path) -> str:
    # Case folded: two names differing only in case are one file on macOS and Windows.
    return os.path.normcase(os.path.abspath(path)).casefold()


class SavedFiles:
    """The files a batch's rows saved (kept in `path`; None: this run's only)."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        #: Row -> (file, video id), as recorded.
        self._rows: dict[int, tuple[str, str]] = {}
        if path is not None:
            with contextlib.suppress(FileNotFoundError, ValueError, TypeError, AttributeError):
                document = orjson.loads(path.read_bytes())
                for row, entry in document["rows"].items():
                    self._rows[int(row)] = (str(entry["file"]), str(entry["video_id"]))
        #: File key -> row, for every name taken in this run.
        self._taken: dict[str, int] = {}

    def saved_before(self, row: int, video_id: str) -> Path | None:
        """The file `row` saved `video_id` in, if the record says so and it is still there.

        The name is taken for `row` in this run (None if another row took it first).
        """
        entry = self._rows.get(row)
        if entry is None or entry[1] != video_id:
            return None
        path = Path(entry[0])
        if not path.is_file() or not self._take(row, path):
            return None
        return path

    def new_name(self, row: int, directory: Path, stem: str) -> Path:
        """A free file for `row` in `directory`: ``STEM.mp4``, else ``STEM-2.mp4``, ...

        Free means: taken by no other row in this run, recorded for no other row, and
        not on the disk (a file there is another video, as far as anyone can tell).

        Raises:
            FileExistsError: no free name after many tries.
        """
        recorded = {_key(Path(file)): other for other, (file, _) in self._rows.items()}
        for number in range(1, _MAX_TRIES + 1):
            path = directory / (stem + (f"-{number}" if number > 1 else "") + ".mp4")
            key = _key(path)
            if self._taken.get(key, row) != row or recorded.get(key, row) != row:
                continue
            if os.path.lexists(path):
                continue
            self._taken[key] = row
            return path
        raise FileExistsError(17, f"no free name for row {row}", str(directory / stem))

    def _take(self, row: int, path: Path) -> bool:
        key = _key(path)
        return self._taken.setdefault(key, row) == row

    def record(self, row: int, path: Path, video_id: str) -> None:
        """Note that `row` saved `video_id` in `path`, on the disk at once (if kept)."""
        self._rows[row] = (str(path.absolute()), video_id)
        if self._path is None:
            return
        document = {
            "rows": {
                str(number): {"file": file, "video_id": video}
                for number, (file, video) in sorted(self._rows.items())
            }
        }
        partial = self._path.with_name(self._path.name + ".partial")
        partial.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
        os.replace(partial, self._path)
