"""The pieces of the worker protocol that need no server: the series stream (written by the node,
read by the worker), result paths and digests."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from node.jobs.remote import IncompleteSeries, content_digest, read_tar
from node.jobs.workers import GPU, WorkerRegistry, device_kind, queue_kind, queue_kinds_for
from node.web.workers import parse_digest, safe_result_path, tar_size, tar_stream


@pytest.fixture
def files(tmp_path: Path) -> list[tuple[str, Path, int]]:
    made = []
    for index, size in enumerate((0, 1, 511, 512, 513, 70_000)):
        path = tmp_path / "in" / f"{index}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(size))
        made.append((path.name, path, size))
    return made


def test_the_series_stream_is_tar_and_arrives_whole(files, tmp_path: Path) -> None:
    stream = b"".join(tar_stream(files))
    assert len(stream) == tar_size(size for *_, size in files)
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r:") as tar:  # any tar reader reads it
        assert [(m.name, m.size) for m in tar.getmembers()] == [(n, s) for n, _, s in files]
    out = tmp_path / "out"
    out.mkdir()
    assert read_tar(io.BytesIO(stream), out) == (6, sum(s for *_, s in files))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {n: p.read_bytes() for n, p, _ in files}


@pytest.mark.parametrize("cut", [0, 100, 512, 1024 + 700, -1024, -1])
def test_a_cut_stream_is_never_taken_for_a_series(files, tmp_path: Path, cut: int) -> None:
    stream = b"".join(tar_stream(files))
    with pytest.raises(IncompleteSeries):
        read_tar(io.BytesIO(stream[:cut]), tmp_path)


def test_a_member_outside_the_folder_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("../escape.dcm")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(IncompleteSeries, match="unexpected member '../escape.dcm'"):
        read_tar(io.BytesIO(buffer.getvalue()), tmp_path / "x")
    assert not (tmp_path / "escape.dcm").exists()


def test_result_paths_and_digests(tmp_path: Path) -> None:
    assert [safe_result_path(p) for p in ("seg.dcm", "meshes/liver.stl", "a/b/c.json")] == [
        "seg.dcm", "meshes/liver.stl", "a/b/c.json"]
    assert [safe_result_path(p) for p in ("../x", "a/../b", "/etc/passwd", ".hidden", "a//b", "", "a/.b")] == [None] * 7
    path = tmp_path / "f"
    path.write_bytes(b"segnode")
    header, size = content_digest(path)
    assert size == 7 and parse_digest(header) == hashlib.sha256(b"segnode").digest()
    assert header == "sha-256=:" + base64.b64encode(hashlib.sha256(b"segnode").digest()).decode() + ":"
    assert parse_digest("md5=:AAAA:, sha-256=:" + base64.b64encode(b"x" * 32).decode() + ":") == b"x" * 32
    assert [parse_digest(h) for h in ("", "sha-256=abc", "sha-256=:!!:", "sha-256=:" + base64.b64encode(b"x").decode() + ":")] == [None] * 4


def test_device_kinds_and_the_queues_a_worker_reads() -> None:
    assert [device_kind(d) for d in ("cpu", "mps", "gpu", "gpu:1", "cuda:0")] == ["cpu", "cpu", "gpu", "gpu", "gpu"]
    assert [queue_kind(d) for d in (None, "cpu", "gpu")] == ["any", "any", "gpu"]
    assert (queue_kinds_for("cpu"), queue_kinds_for("gpu:0")) == (("any",), ("gpu", "any"))
    now = [1000.0]
    workers = WorkerRegistry(clock=lambda: now[0])
    workers.seen("h:1:a", name="w", device="cpu")
    assert workers.waiting_for(GPU, 10) == "waiting for a GPU worker" and workers.waiting_for("any", 10) is None
    workers.seen("h:2:b", name="w", device="gpu:0", job="j1")
    assert workers.waiting_for(GPU, 10) is None
    workers.ended("h:2:b", "j1", "done", fetch_s=0.5, upload_s=0.25)
    now[0] += 11  # the GPU worker silent for longer than a lease
    assert workers.waiting_for(GPU, 10) == "waiting for a GPU worker"
    row = next(r for r in workers.list() if r["id"] == "h:2:b")
    assert (row["job"], row["jobs"], row["fetch_seconds"], row["upload_seconds"], row["host"]) == (
        None, {"done": 1}, 0.5, 0.25, "h")


def test_a_remote_workers_pid_is_never_probed() -> None:
    """Only the lease tells whether a remote worker is alive: its ``host:pid`` may name a process of
    another machine (or container) with the node's host name."""
    import socket

    from node.jobs.store import dead_on_this_host

    gone = 2**22 + 17  # above Linux's default pid_max: no such process
    assert dead_on_this_host(f"{socket.gethostname()}:{gone}:abc123") is True
    assert dead_on_this_host(f"{socket.gethostname()}:{gone}:abc123:gpu-box-1") is False
