"""Every Python example in the README and the docs runs, against the simulator, as rendered.

A page is read as the docs build renders it: its ``--8<--`` includes expanded by
pymdownx.snippets itself, configured as in mkdocs.yml, so the code run is the code a
reader sees, not the page's source. A block preceded by ``<!-- no-run -->`` is shown,
not run. Examples read their credentials from the environment, which `kling_env` points
at a simulator.

An included program (a whole file of examples/) runs as a module, not as ``__main__``:
its imports, settings and definitions all run, but not its entry point, which would
serve forever or poll Telegram. tests/test_guides.py runs those programs' logic, and
tests/test_redis_scenarios.py the arq worker and producer.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import markdown
import pytest
import yaml

import kling_async
from kling_async.testing import Simulator

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(<!-- no-run -->\s*\n)?```python\n(.*?)```", re.DOTALL)
INCLUDE = "--8<--"


def snippets_config() -> dict[str, object]:
    """pymdownx.snippets' options as mkdocs.yml gives them (paths from the repository)."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    for extension in config["markdown_extensions"]:
        if isinstance(extension, dict) and "pymdownx.snippets" in extension:
            options = dict(extension["pymdownx.snippets"] or {})
            break
    else:  # pragma: no cover - only if mkdocs.yml drops the extension
        raise AssertionError("mkdocs.yml configures no pymdownx.snippets")
    # mkdocs runs from the repository's root: relative base paths start there.
    base = options.get("base_path", ["."])
    options["base_path"] = [str(ROOT / b) for b in ([base] if isinstance(base, str) else base)]
    return options


def rendered(page: Path) -> str:
    """The page with its snippets expanded, as the docs build renders it."""
    md = markdown.Markdown(
        extensions=["pymdownx.snippets"],
        extension_configs={"pymdownx.snippets": snippets_config()},
    )
    lines = md.preprocessors["snippet"].run(page.read_text(encoding="utf-8").split("\n"))
    return "\n".join(lines)


def examples() -> list[object]:
    found = []
    for page in PAGES:
        source = list(BLOCK.finditer(page.read_text(encoding="utf-8")))
        shown = list(BLOCK.finditer(rendered(page)))
        assert len(shown) == len(source), f"{page}: an include brought a ```python fence"
        for number, (raw, match) in enumerate(zip(source, shown, strict=True), 1):
            if match.group(1) is None:
                name = f"{page.relative_to(ROOT)}#{number}"
                program = INCLUDE in raw.group(2)
                found.append(pytest.param(name, match.group(2), program, id=name))
    return found


def test_the_docs_have_examples() -> None:
    assert len(examples()) >= 10


def test_includes_are_expanded_as_the_site_shows_them() -> None:
    # What a reader of the built site sees: the file itself, not the include line.
    page = rendered(ROOT / "docs" / "guide" / "many-workers.md")
    assert INCLUDE not in page
    assert (ROOT / "examples" / "arq_worker.py").read_text(encoding="utf-8") in page
    assert (ROOT / "examples" / "arq_producer.py").read_text(encoding="utf-8") in page


def test_no_included_program_is_left_unrun() -> None:
    # A page that includes a program shows it whole: it runs here as the reader sees it.
    for page in PAGES:
        for match in BLOCK.finditer(page.read_text(encoding="utf-8")):
            assert not (match.group(1) and INCLUDE in match.group(2)), (page, match.group(2))


@pytest.mark.parametrize(
    ("page", "needs"),
    [
        ("docs/guide/many-workers.md", ("pip install 'kling-async[redis]' arq", "redis-server")),
        ("docs/guide/web-services.md", ("pip install 'kling-async[cli]' aiohttp", "fastapi")),
        ("docs/guide/bots.md", ("pip install 'kling-async[cli]' 'aiogram>=3'",)),
    ],
)
def test_guides_say_what_to_install_and_how_to_try_them(page: str, needs: tuple[str, ...]) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    for need in needs:
        assert need in text
    # ... and how to run them against the simulator, whose export line is pasted.
    assert "kling-async simulate" in text
    assert "export KLING_BASE_URL=" in text


@pytest.mark.parametrize(("name", "code", "program"), examples())
def test_example_runs(
    name: str,
    code: str,
    program: bool,
    kling_env: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    if not program:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})  # noqa: S102
        return
    # A whole program: imported (dataclass-like machinery looks its module up by name).
    module = types.ModuleType(f"_docs_example_{abs(hash(name))}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, name, "exec"), module.__dict__)  # noqa: S102


def test_public_names_match_all() -> None:
    public = {name for name in dir(kling_async) if not name.startswith("_")}
    modules = {"callbacks", "errors", "redis", "testing"}
    assert public - modules == set(kling_async.__all__) - {"__version__"}
    assert kling_async.__all__ == sorted(kling_async.__all__)
