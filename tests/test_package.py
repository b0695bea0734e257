"""The package's shape: public names, a lazy root, and no import cycles among its modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import kling_async

PACKAGE = Path(kling_async.__file__).parent

#: API.md, "Entry point": everything public is importable from `kling_async` itself.
CONTRACT = {
    "KlingClient",
    "ExtendRequest",
    "Task",
    "TaskStatus",
    "Video",
    "BatchResult",
    "BatchProgress",
    "PollPolicy",
    "InMemoryAccount",
    "SyncKlingClient",
    "ResourcePack",
    "OnUpdate",
    "OnProgress",
    "KlingError",
    "ConfigurationError",
    "ValidationError",
    "APIConnectionError",
    "APITimeoutError",
    "ResponseFormatError",
    "APIStatusError",
    "AuthenticationError",
    "PermissionDeniedError",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "NotFoundError",
    "ContentPolicyError",
    "RateLimitError",
    "ServerError",
    "TaskFailedError",
    "WaitTimeoutError",
}


def test_every_contract_name_is_exported_and_resolves() -> None:
    assert set(kling_async.__all__) >= CONTRACT
    for name in kling_async.__all__:
        assert getattr(kling_async, name) is not None
    assert kling_async.KlingClient.__module__ == "kling_async._client"


def _loaded(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of `modules` a fresh interpreter has loaded after running `code`."""
    probe = f"import sys; {code}; print(sorted(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return ast.literal_eval(out.strip())  # type: ignore[no-any-return]


def test_importing_the_package_loads_no_http_stack() -> None:
    # The command line starts (and answers Ctrl-C) before aiohttp is loaded, and
    # `import kling_async` costs less than `import aiohttp` (docs/performance.md).
    # (typing is not checked: coverage, measuring the subprocess, loads it itself.)
    heavy = ("aiohttp", "attrs", "backoff", "jwt", "cattrs", "kling_async._journal")
    assert _loaded("import kling_async, kling_async._cli", heavy) == []


#: What `kling-async --help` and a usage error must not load: only click is needed to
#: print the commands and their options (the bench times it: `bench/run.py --only cli`).
_NOT_FOR_HELP = (
    "aiohttp",
    "asyncio",
    "attrs",
    "cattrs",
    "importlib.metadata",
    "orjson",
    "rich",
    "kling_async._batch",
    "kling_async._cli._batch_run",
    "kling_async._cli._progress",
    "kling_async._cli._rows_out",
    "kling_async._cli._runtime",
    "kling_async._client",
    "kling_async._models",
)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["batch", "--help"],
        ["extend", "--help"],
        ["extend"],  # a missing argument
        ["batch", "--concurrency", "0", "rows.jsonl"],  # an out-of-range option
        ["no-such-command"],
    ],
)
def test_help_and_usage_errors_load_only_click(argv: list[str]) -> None:
    code = (
        "from kling_async._cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "sys.stdout.flush()"
    )
    probe = f"import sys, io; sys.stdout = io.StringIO(); sys.stderr = io.StringIO()\n{code}"
    assert _loaded_after(probe, _NOT_FOR_HELP) == []


def _loaded_after(code: str, modules: tuple[str, ...]) -> list[str]:
    """`_loaded` for a multi-line program (its own output thrown away)."""
    probe = (
        f"{code}\nimport sys\nsys.stdout = sys.__stdout__\n"
        f"print(sorted(m for m in {modules!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return ast.literal_eval(out.strip())  # type: ignore[no-any-return]


def test_the_request_path_loads_no_batch_journal_jwt_or_cattrs() -> None:
    # (sqlite3 is not checked: coverage, measuring the subprocess, loads it itself.)
    unused = (
        "jwt",
        "cattrs",
        "importlib.metadata",
        "kling_async._account",
        "kling_async._batch",
        "kling_async._journal",
        "kling_async._download",
    )
    code = "from kling_async import KlingClient, ExtendRequest; KlingClient(api_key='k')"
    assert _loaded(code, unused) == []


def _runtime_imports(path: Path) -> set[str]:
    """The package modules `path` imports when it is imported (not under TYPE_CHECKING,
    not inside functions: those run later, when the cycle cannot bite)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("kling_async"))
            elif isinstance(node, ast.ImportFrom) and node.module:
                module = node.module
                if node.level:  # a relative import inside a subpackage
                    base = _module_name(path).rsplit(".", node.level)[0]
                    module = f"{base}.{module}"
                if module.startswith("kling_async"):
                    found.add(module)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_among_the_packages_modules() -> None:
    graph = {
        _module_name(path): _runtime_imports(path) - {_module_name(path)}
        for path in PACKAGE.rglob("*.py")
    }
    # A module imports its package first: `kling_async._cli._app` needs `kling_async._cli`.
    cycles: list[list[str]] = []

    def walk(module: str, trail: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in trail:
                cycles.append([*trail[trail.index(target) :], target])
            elif target in graph and len(trail) < 30:
                walk(target, [*trail, target])

    for module in sorted(graph):
        walk(module, [module])
    assert not cycles, cycles[:5]


def test_the_cli_declarations_agree_with_the_library() -> None:
    # The command line declares its choices without importing what implements them.
    from kling_async import _client
    from kling_async._cli import _options, _rows_in

    assert (_options.MAX_PAGE, _options.MAX_PAGE_SIZE) == (_client.MAX_PAGE, _client.MAX_PAGE_SIZE)
    assert _rows_in.FORMATS == _options.FORMATS


_ROUND_TRIP = """
from kling_async import ExtendRequest, SyncKlingClient
from kling_async.testing import Simulator
with Simulator(processing_time=0.01).run_in_thread() as sim:
    with SyncKlingClient(api_key=sim.api_key, base_url=sim.base_url) as kling:
        task = kling.extend(ExtendRequest("828006748715380777", "x"))
        kling.get_task(task.task_id)
"""


def test_without_the_otel_extra_nothing_of_opentelemetry_is_imported() -> None:
    # The package hidden, as when the extra is not installed: a whole round trip works,
    # and telemetry stays off.
    hidden = f"import sys; sys.modules['opentelemetry'] = None\n{_ROUND_TRIP}"
    probe = "from kling_async import _telemetry; assert not _telemetry.AVAILABLE"
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"{hidden}\n{probe}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    # Installed or not, importing the package and making a client imports none of it.
    unused = ("opentelemetry", "opentelemetry.trace", "opentelemetry.metrics")
    assert _loaded("from kling_async import KlingClient; KlingClient(api_key='k')", unused) == []


#: The layers of STYLE.md, lowest first: a module imports (at module level or inside a
#: function, TYPE_CHECKING aside) only from its own layer or below.
LAYERS: dict[str, int] = {
    # 1. protocol: pure rules, no I/O
    "kling_async.errors": 1,
    "kling_async._protocol": 1,
    "kling_async._hooks": 1,
    "kling_async._deadlines": 1,
    "kling_async._redis_scripts": 1,
    # 2. models and the one converter
    "kling_async._models": 2,
    "kling_async._converter": 2,
    "kling_async._types": 2,
    # 3. transport: configuration, auth, HTTP, telemetry
    "kling_async._config": 3,
    "kling_async._auth": 3,
    "kling_async._transport": 3,
    "kling_async._telemetry": 3,
    # 4. create exactly once and wait; slots; callbacks' pure core
    "kling_async._tasks": 4,
    "kling_async._account": 4,
    "kling_async._webhooks": 4,
    # 5. the client
    "kling_async._client": 5,
    # 6. on top: batch and journal, chain, downloads, costs, callbacks, Redis, blocking
    "kling_async._batch": 6,
    "kling_async._journal": 6,
    "kling_async._chain": 6,
    "kling_async._download": 6,
    "kling_async._costs": 6,
    "kling_async.callbacks": 6,
    "kling_async.redis": 6,
    "kling_async._sync": 6,
    "kling_async.testing": 6,
    # 7. the command line and the package root
    "kling_async._cli": 7,
    "kling_async": 7,
    "kling_async.__main__": 7,
}

#: Imports that point up on purpose: the client is a facade over what is built on it.
UPWARD_ALLOWED: set[tuple[str, str]] = {
    # The version, for the instrumentation scope (read once, on first use).
    ("kling_async._telemetry", "kling_async"),
    ("kling_async._client", "kling_async._batch"),
    ("kling_async._client", "kling_async._chain"),
    ("kling_async._client", "kling_async._download"),
    ("kling_async._client", "kling_async._costs"),
}


def _layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rpartition(".")[0]  # a subpackage's modules share its layer
    return LAYERS[module]


def _all_imports(path: Path) -> set[str]:
    """Every package module `path` imports, inside functions too (not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for child in ast.walk(stmt)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kling_async"))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # from a package's __init__, `.` is the package itself
                level = node.level - (path.name == "__init__.py")
                base = _module_name(path).rsplit(".", level)[0] if level else _module_name(path)
                module = f"{base}.{module}" if module else base
            if not module.startswith("kling_async"):
                continue
            for alias in node.names:  # `from kling_async import _protocol`: a module
                submodule = f"{module}.{alias.name}"
                where = PACKAGE.parent / submodule.replace(".", "/")
                is_module = where.with_suffix(".py").exists() or where.is_dir()
                found.add(submodule if is_module else module)
    return found


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        importer = _module_name(path)
        for imported in _all_imports(path) - {importer}:
            if imported.startswith(importer + "."):  # a package's own modules
                continue
            if _layer(imported) > _layer(importer) and (importer, imported) not in UPWARD_ALLOWED:
                wrong.append(f"{importer} (layer {_layer(importer)}) imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_command_line_uses_only_the_clients_public_methods() -> None:
    """The CLI drives a `KlingClient` as any program would: no `client._tasks` or other
    private attribute of it (what the CLI needs, such as a batch's per-item
    `on_update`, is public)."""
    reached = {}
    for path in sorted((PACKAGE / "_cli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and "client" in ast.unparse(node.value).lower()
            ):
                reached[f"{path.name}:{node.lineno}"] = ast.unparse(node)
    assert reached == {}
