"""Batch input: JSONL and CSV rows become requests or bad rows that say where and why."""

from __future__ import annotations

import io

import pytest

from kling_async._cli._rows_in import BadRow, GoodRow, read_jsonl

GOOD = b'{"video_id": "v1", "prompt": "one"}'


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize(
    ("bad", "column"),
    [(b'{"video_id": "v3",', 19), (b'{"video_id" "v3"}', 13), (b'{"prompt": x}', 12)],
)
def test_a_jsonl_error_names_its_own_line_and_column(
    newline: bytes, bad: bytes, column: int
) -> None:
    # Line 1 good, line 2 blank, line 3 bad, line 4 blank (spaces), line 5 good.
    text = newline.join([GOOD, b"", bad, b"   ", GOOD, b""])
    rows = list(read_jsonl(io.BytesIO(text)))
    assert [row.number for row in rows] == [1, 3, 5]
    assert isinstance(rows[0], GoodRow)
    assert isinstance(rows[2], GoodRow)
    error = rows[1]
    assert isinstance(error, BadRow)
    assert error.message.startswith("row 3: not valid JSON: ")
    assert error.message.endswith(f"(line 3, column {column})")


def test_a_jsonl_line_cut_short_at_the_end_of_the_file() -> None:
    rows = list(read_jsonl(io.BytesIO(GOOD + b"\r\n\r\n" + b'{"video_id": "v3"')))
    assert [row.number for row in rows] == [1, 3]
    assert isinstance(rows[1], BadRow)
    assert "line 3" in rows[1].problem
    assert "line 4" not in rows[1].problem
