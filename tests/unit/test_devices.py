"""``[segmentation] devices``: each worker thread keeps one device, assigned in turn (one resident
worker per GPU in ``segnode serve``)."""

from __future__ import annotations

import threading
from pathlib import Path

from node.config import Settings
from node.jobs.worker import JobRunner
from node.pipeline import PipelineRequest
from node.segment import SegmentRequest
from node.serve import _local_device, _workers


def test_worker_threads_take_the_devices_in_turn_and_keep_theirs(tmp_path: Path) -> None:
    settings = Settings(node={"data_dir": tmp_path}, queue={"workers": 1},
                        segmentation={"devices": ["gpu:0", "gpu:1"]})
    runner = JobRunner(object(), settings)  # type: ignore[arg-type]  (no job store needed here)
    request = PipelineRequest(segment=SegmentRequest(engine="totalsegmentator", device="cpu"))
    seen: dict[str, list[str]] = {}
    alive = threading.Barrier(3)  # worker threads live as long as the node: all alive at once

    def worker(name: str) -> None:
        seen[name] = [runner._on_device(request).segment.device for _ in range(3)]
        alive.wait(10)

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert all(len(set(devices)) == 1 for devices in seen.values())  # a thread keeps its device
    assert sorted(devices[0] for devices in seen.values()) == ["gpu:0", "gpu:0", "gpu:1"]  # in turn
    assert request.segment.device == "cpu"  # the rule's request itself is not changed
    assert _workers(settings) == 2 and _local_device(settings) == "gpu:0"  # one thread per device at least

    plain = Settings(node={"data_dir": tmp_path}, queue={"workers": 3})
    assert JobRunner(object(), plain)._on_device(request) is request  # type: ignore[arg-type]
    assert _workers(plain) == 3 and _local_device(plain) == "cpu"
    assert _workers(Settings(node={"data_dir": tmp_path}, queue={"workers": 0},
                             segmentation={"devices": ["gpu:0"]})) == 0  # no local workers stays none
