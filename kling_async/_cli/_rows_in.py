"""Batch input: JSONL or CSV rows, read one at a time, as requests or bad rows.

Both formats name their keys (JSONL) or columns (CSV) like `ExtendRequest`'s fields.
A JSONL ``null`` and an empty CSV cell mean "not given". In CSV, ``cfg_scale`` is read
as a number and ``watermark`` as true/false, 1/0 or yes/no. A row that cannot become a
request (bad JSON, an unknown field, a value breaking a rule) is a `BadRow` whose
message names the row, the field and the rule; the rest of the input is still read.
Rows are numbered from 1: JSONL by line, CSV by record after the header.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Final, TypeAlias

import attrs
import orjson

from kling_async._converter import (
    REQUEST_FIELDS,
    request_from_fields,
    unknown_and_missing_fields,
)
from kling_async._models import ExtendRequest
from kling_async.errors import ValidationError

FORMATS: Final = ("jsonl", "csv")
FIELDS: Final = tuple(field.name for field in attrs.fields(ExtendRequest))
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})
_BOM: Final = b"\xef\xbb\xbf"
_JSON_TYPES: Final = {list: "an array", str: "a string", int: "a number", float: "a number"}


#: Longest text of a given value in a message (the rest is cut, with "…").
_SHOWN_LENGTH: Final = 40
_NOT_GIVEN: Final = object()
#: ``user:password@`` in a URL: never shown.
_USERINFO: Final = re.compile(r"(?<=//)[^/@\s]*@")


def shown_value(value: Any) -> str:
    """A row's value as a message shows it: as JSON, shortened, with no URL password.

    Credentials from the environment are scrubbed later, with every message printed.
    """
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    text = _USERINFO.sub("***@", text)
    if len(text) > _SHOWN_LENGTH:
        text = text[: _SHOWN_LENGTH - 1] + "…"
    return text


class InputError(Exception):
    """The input as a whole cannot be read (not just one bad row)."""


@attrs.frozen
class GoodRow:
    """A row that became a request."""

    number: int
    request: ExtendRequest


@attrs.frozen
class BadRow:
    """A row that cannot be sent: `problem` says why (``field: rule (given: value)``)."""

    number: int
    problem: str
    field: str | None = None
    rule: str | None = None

    @classmethod
    def invalid(cls, number: int, error: ValidationError, given: Any = _NOT_GIVEN) -> BadRow:
        """A row whose field `error` names broke its rule; `given` is the row's own value."""
        problem = f"{error.field}: {error.rule}"
        if given is not _NOT_GIVEN:
            problem += f" (given: {shown_value(given)})"
        return cls(number, problem, error.field, error.rule)

    @property
    def message(self) -> str:
        """The problem, starting with ``row N: ``."""
        return f"row {self.number}: {self.problem}"

    def error_document(self) -> dict[str, Any]:
        """The row's error as a result line's ``error`` object."""
        document: dict[str, Any] = {"type": "ValidationError", "message": self.message}
        document.update(field=self.field, rule=self.rule)
        return document


Row: TypeAlias = "GoodRow | BadRow"


def input_format(path: str, given: str | None) -> str:
    """The format of `path`: `given`, else from its extension (stdin: JSONL).

    Raises:
        InputError: the extension says nothing.
    """
    if given is not None:
        return given
    if path == "-":
        return "jsonl"
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise InputError(
        f"cannot tell the format of {path} from its extension: pass --format jsonl or csv"
    )


def to_row(number: int, values: Mapping[str, Any]) -> Row:
    """A request from a row's given values (keys named like `ExtendRequest` fields)."""
    try:
        request = request_from_fields(values)  # unknown and missing fields too
    except ValidationError as error:
        # The value is shown for a field of the request, not for an unknown one.
        given = values.get(error.field, _NOT_GIVEN) if error.field in FIELDS else _NOT_GIVEN
        return BadRow.invalid(number, error, given)
    return GoodRow(number, request)


def read_jsonl(stream: IO[bytes]) -> Iterator[Row]:
    """Rows of a JSON Lines stream (blank lines skipped; each line one object)."""
    for number, raw in enumerate(stream, 1):
        line = raw[len(_BOM) :] if number == 1 and raw.startswith(_BOM) else raw
        # Without its line ending, so that orjson's position is a column of this line
        # (with it, a line cut short reads as an error at "line 2 column 1").
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            where = f"line {number}, column {error.colno}"
            yield BadRow(number, f"not valid JSON: {error.msg} ({where})")
            continue
        if not isinstance(value, dict):
            kind = "null" if value is None else _JSON_TYPES.get(type(value), "true or false")
            yield BadRow(number, f"must be a JSON object, got {kind}")
            continue
        yield to_row(number, {key: item for key, item in value.items() if item is not None})


def _csv_value(name: str, cell: str) -> Any:
    if name == "cfg_scale":
        try:
            return float(cell)
        except ValueError:
            raise ValidationError(name, "must be a number from 0 to 1") from None
    if name == "watermark":
        word = cell.lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValidationError(name, "must be true/false, 1/0 or yes/no")
    return cell


def read_csv(stream: IO[str]) -> Iterator[Row]:
    """Rows of a CSV stream with a header row; the header is read at once.

    Raises:
        InputError: the header names a column twice or has an empty name.
    """
    reader = csv.reader(stream)
    header = [name.strip() for name in _next_record(reader, 0) or []]
    if any(not name for name in header):
        raise InputError("the CSV header has an empty column name")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise InputError(f"the CSV header names {', '.join(duplicates)} more than once")
    # Checked once, before anything is sent: not one identical error per row.
    unknown, missing = unknown_and_missing_fields(header) if header else ([], [])
    problems = []
    if unknown:
        problems.append(f"unknown columns {', '.join(unknown)}")
    if missing:
        problems.append(f"missing required columns {', '.join(missing)}")
    if problems:
        raise InputError(
            f"the CSV header has {' and '.join(problems)} "
            f"(the columns are {', '.join(REQUEST_FIELDS)})"
        )
    return _csv_rows(reader, header)


def _next_record(reader: Any, number: int) -> list[str] | None:
    try:
        record: list[str] = next(reader)
    except StopIteration:
        return None
    except (csv.Error, UnicodeDecodeError) as error:
        raise InputError(f"cannot read the CSV after row {number} ({error})") from None
    return record


def _csv_rows(reader: Any, header: list[str]) -> Iterator[Row]:
    number = 0
    while (cells := _next_record(reader, number)) is not None:
        number += 1
        stripped = [cell.strip() for cell in cells]
        if not any(stripped):
            continue
        if len(stripped) > len(header):
            yield BadRow(
                number, f"has {len(stripped)} cells but the header names {len(header)} columns"
            )
            continue
        try:
            values = {
                name: _csv_value(name, cell)
                for name, cell in zip(header, stripped, strict=False)
                if cell
            }
        except ValidationError as error:
            yield BadRow.invalid(number, error, stripped[header.index(error.field)])
            continue
        yield to_row(number, values)


def count_rows(path: Path, fmt: str) -> int | None:
    """How many non-blank rows a file has (one quick pass), or None if it cannot tell."""
    try:
        if fmt == "jsonl":
            with path.open("rb") as stream:
                return sum(1 for line in stream if line.strip(_BOM + b" \t\r\n"))
        with path.open(encoding="utf-8-sig", newline="") as stream:
            records = sum(1 for cells in csv.reader(stream) if any(c.strip() for c in cells))
            return max(records - 1, 0)
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
