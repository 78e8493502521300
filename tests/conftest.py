"""Shared fixtures: real servers on loopback (see tests/servers.py), each stopped after its test.

``orthanc``, ``storescp`` and ``redis_server`` give a default server. ``orthanc_factory`` starts
Orthancs with other settings (a plugin script, modalities, extra configuration)::

    def test_x(orthanc_factory, storescp):
        orthanc = orthanc_factory(modalities={"scp": [storescp.aet, "127.0.0.1", storescp.port]})

Every fixture is per test: Orthanc is ready in about 0.1 s, storescp and Redis in less. Orthanc
takes about 3.5 s to exit after SIGTERM (its HTTP and DICOM threads poll at 1-2 s intervals), so
an Orthanc gets SIGTERM when its test ends and the next tests run meanwhile; it is reaped once it
has exited, at the latest at the end of the session (SIGKILL if it is still running by then).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.servers import OrthancServer, RedisServer, ServerProcess, StoreSCP



def pytest_configure(config: pytest.Config) -> None:
    # Every node a test starts (in this process or as a child) gets a 16 MiB ingest journal instead
    # of 512 MiB: the same code, a fraction of the zeros written at each fresh start. The benchmarks
    # (-m bench) measure the default.
    if config.option.markexpr.strip() != "bench":
        os.environ.setdefault("SEGNODE_INGEST__JOURNAL_MB", "16")


class _ExitingServers:
    """Servers sent SIGTERM when their test ended; each is reaped (``stop()``) once it has
    exited, at the latest at the end of the session (SIGKILL after its stop timeout)."""

    def __init__(self) -> None:
        self.servers: list[ServerProcess] = []

    def add(self, server: ServerProcess) -> None:
        server.terminate()
        self.servers.append(server)
        self.reap(only_exited=True)

    def reap(self, only_exited: bool = False) -> None:
        waiting = []
        for server in self.servers:
            if only_exited and server.process is not None and server.process.poll() is None:
                waiting.append(server)
            else:
                server.stop()
        self.servers = waiting


@pytest.fixture(scope="session")
def _exiting_servers() -> Iterator[_ExitingServers]:
    exiting = _ExitingServers()
    yield exiting
    exiting.reap()


@pytest.fixture
def orthanc_factory(
    tmp_path_factory: pytest.TempPathFactory, _exiting_servers: _ExitingServers
) -> Iterator[Callable[..., OrthancServer]]:
    """Start Orthancs with :class:`OrthancServer`'s keyword arguments; all stop after the test."""
    started: list[OrthancServer] = []

    def start(**kwargs: object) -> OrthancServer:
        kwargs.setdefault("workdir", tmp_path_factory.mktemp("orthanc"))
        server = OrthancServer(**kwargs)  # type: ignore[arg-type]
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        _exiting_servers.add(server)


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    """A running Orthanc (AE title ORTHANC): DICOMweb and the Python plugin (no script), StableAge 2 s."""
    return orthanc_factory()


@pytest.fixture
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    """A running dcmtk storescp (AE title STORESCP); received files in ``storescp.output_dir``."""
    with StoreSCP(workdir=tmp_path_factory.mktemp("storescp")) as server:
        yield server


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A running redis-server on loopback that persists nothing."""
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as server:
        yield server
