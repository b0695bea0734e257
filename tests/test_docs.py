"""Every Python example in the README and the docs runs, against the simulator.

A block preceded by ``<!-- no-run -->`` is shown, not run. Examples read their
credentials from the environment, which `kling_env` points at a simulator.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import kling_async
from kling_async.testing import Simulator

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(<!-- no-run -->\s*\n)?```python\n(.*?)```", re.DOTALL)


def examples() -> list[object]:
    found = []
    for page in PAGES:
        for number, match in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8")), 1):
            if match.group(1) is None:
                name = f"{page.relative_to(ROOT)}#{number}"
                found.append(pytest.param(name, match.group(2), id=name))
    return found


def test_the_docs_have_examples() -> None:
    assert len(examples()) >= 10


@pytest.mark.parametrize(("name", "code"), examples())
def test_example_runs(
    name: str, code: str, kling_env: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, name, "exec"), {"__name__": "__main__"})  # noqa: S102


def test_public_names_match_all() -> None:
    public = {name for name in dir(kling_async) if not name.startswith("_")}
    modules = {"callbacks", "errors", "redis", "testing"}
    assert public - modules == set(kling_async.__all__) - {"__version__"}
    assert kling_async.__all__ == sorted(kling_async.__all__)
