"""Warm inference against TotalSegmentator's CLI on full-size networks with random weights.

    .venv/bin/python -m pytest tests/bench/bench_inference.py -m bench -s
    .venv/bin/python tests/bench/bench_inference.py [--cases small,512] [--total] > bench.txt

Weights: TotalSegmentator's ``total --fast`` dataset (297) written with the architecture nnU-Net's own
planner gives a CT dataset at 3 mm: ``PlainConvUNet``, 6 stages [32, 64, 128, 256, 320, 320], 3x3x3
convolutions, strides 1-2-2-2-2-2, two convolutions per stage, InstanceNorm, LeakyReLU, patch 128^3,
118 output classes; random weights (torch seed 0), written once, the same for every row. With
``--total`` the five 1.5 mm parts (291-295) get the same architecture (their own class counts) and
``total`` runs on ``--total-case`` (``tiny``, 128 x 128 x 80, is one tile per part). The
parameter count and folder size are printed (the issue: 31 M parameters; the released 3 mm folder is
~158 MB).

Input: node's phantom at 512 x 512 x 300, 0.8 x 0.8 x 1.5 mm, and a smaller one (256 x 256 x 160, same
spacing), written as NIfTI. Rows per case:

* ``cli``: ``TotalSegmentator -i ct.nii.gz -o out.nii.gz --ml -ta total --fast -d cpu`` (through
  tests/totalseg_cli.py, which installs the torchvision stub CPU torch needs), a fresh process; wall
  time of the whole command; peak RSS = the largest sum of its process tree's RSS (sampled /proc).
* ``node cold``: the first job of a fresh worker process (engine.segment on the same volume; model
  load and imports included, the interpreter start not); ``node warm``: its second and third jobs,
  envelope off and on (20 mm). Peak RSS: the worker process's during the job (models included).

Printed per row: wall seconds, ratio CLI / row, peak RSS, tiles run/skipped, and the share of voxels
inside the body (> -500 HU) whose label equals the CLI's (random logits are near-ties everywhere: a
floor, not the real-weights figure). Goals (issue 13, CPU): warm --fast >= 2x the CLI with the envelope,
>= 1.2x without; total >= 1.5x; peak RSS not above the CLI's. Nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[2]
CASES = {"tiny": (128, 128, 80), "small": (256, 256, 160), "512": (512, 512, 300)}
SPACING = (0.8, 0.8, 1.5)
STAGES = [32, 64, 128, 256, 320, 320]
PATCH = [128, 128, 128]


# --------------------------------------------------------------------------- weights


def fullsize_arch() -> dict:
    n = len(STAGES)
    return {
        "n_stages": n,
        "features_per_stage": STAGES,
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def write_fullsize(home: Path, dataset_id: int, seed: int = 0) -> tuple[Path, int]:
    """Dataset ``dataset_id`` with the full-size network and random weights; (model folder, parameters)."""
    import pydoc

    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from tests.totalseg_weights import write_dataset

    model_dir = write_dataset(home, dataset_id)  # TotalSegmentator's names, trainer, spacing, labels
    plans = json.loads((model_dir / "plans.json").read_text())
    dataset = json.loads((model_dir / "dataset.json").read_text())
    (config_name, config), = plans["configurations"].items()
    arch = fullsize_arch()
    config["architecture"]["arch_kwargs"] = arch
    config["patch_size"] = PATCH
    config["median_image_size_in_voxels"] = [160, 160, 160]
    # a CT dataset's intensity statistics (foreground: soft tissue and bone)
    plans["foreground_intensity_properties_per_channel"]["0"].update(
        {"mean": 60.0, "std": 200.0, "percentile_00_5": -1000.0, "percentile_99_5": 1500.0})
    kwargs = dict(arch)
    for key in ("conv_op", "norm_op", "nonlin"):
        kwargs[key] = pydoc.locate(kwargs[key])
    torch.manual_seed(seed)
    network = PlainConvUNet(**kwargs, input_channels=1, num_classes=len(dataset["labels"]))
    params = sum(p.numel() for p in network.parameters())
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=1))
    checkpoint = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", weights_only=False)
    checkpoint["network_weights"] = network.state_dict()
    checkpoint["init_args"]["plans"] = plans
    torch.save(checkpoint, model_dir / "fold_0" / "checkpoint_final.pth")
    return model_dir, params


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


# --------------------------------------------------------------------------- measuring


class TreeRss:
    """Peak of the summed RSS of a process and its descendants, sampled from /proc every 0.25 s."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _table() -> dict[int, tuple[int, int]]:
        page = os.sysconf("SC_PAGE_SIZE")
        table = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                table[int(entry)] = (int(fields[1]), int(fields[21]) * page)  # ppid, rss
            except (OSError, IndexError, ValueError):
                pass
        return table

    def _run(self) -> None:
        while not self._stop.is_set():
            table = self._table()
            tree, frontier = {self.pid}, [self.pid]
            while frontier:
                parent = frontier.pop()
                for pid, (ppid, _) in table.items():
                    if ppid == parent and pid not in tree:
                        tree.add(pid)
                        frontier.append(pid)
            self.peak = max(self.peak, sum(table[p][1] for p in tree if p in table))
            self._stop.wait(0.25)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_cli(home: Path, ct: Path, out: Path, total: bool) -> dict:
    env = {**os.environ, "TOTALSEG_HOME_DIR": str(home), "PYTHONPATH": str(REPO)}
    env.pop("TOTALSEG_WEIGHTS_PATH", None)
    args = [sys.executable, "-m", "tests.totalseg_cli", "-i", str(ct), "-o", str(out), "--ml", "-ta", "total",
            "-d", "cpu", "-nr", "2", "-ns", "1", "-q"] + ([] if total else ["--fast"])
    started = time.perf_counter()
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = TreeRss(process.pid)
    output, _ = process.communicate()
    wall = time.perf_counter() - started
    peak = rss.stop()
    if process.returncode != 0:
        raise RuntimeError(f"TotalSegmentator failed ({process.returncode}): {output[-3000:]}")
    return {"row": "cli", "wall_s": wall, "peak_rss_mb": peak / 1e6}


NODE_JOBS = textwrap.dedent("""
    import json, sys, time
    import nibabel as nib
    import numpy as np
    from pathlib import Path
    from node.nifti import from_nifti_image
    from node.segment import SegmentRequest
    from node.segment.totalseg import TotalSegmentatorEngine
    home, ct_path, out_dir, fast, threads = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "fast", int(sys.argv[5])
    volume = from_nifti_image(nib.load(ct_path))
    rows = []
    for name, envelope in (("node cold", 0.0), ("node warm", 0.0), ("node warm envelope", 20.0)):
        request = SegmentRequest(engine="totalsegmentator", task="total", fast=fast, weights_dir=home,
                                 device="cpu", threads=threads, envelope_mm=envelope)
        started = time.perf_counter()
        labels = TotalSegmentatorEngine().segment(volume, request)
        wall = time.perf_counter() - started
        np.save(out_dir / (name.replace(" ", "_") + ".npy"), labels.array)
        info = labels.inference
        rows.append({"row": name + (" on" if envelope else " off" if name != "node cold" else ""), "wall_s": wall,
                     "peak_rss_mb": info["peak_rss_mb"], "tiles_run": info["tiles_run"],
                     "tiles_skipped": info["tiles_skipped"], "load_s": info["load_s"],
                     "network_s": info["network_s"], "file": name.replace(" ", "_") + ".npy"})
        print(json.dumps(rows[-1]), flush=True)
    print("ROWS " + json.dumps(rows), flush=True)
""")


def run_node(home: Path, ct: Path, out_dir: Path, total: bool, threads: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", NODE_JOBS, str(home), str(ct), str(out_dir),
                                "total" if total else "fast", str(threads)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows = None
    for line in process.stdout:  # each job's row as soon as it is done
        if line.startswith("ROWS "):
            rows = json.loads(line[5:])
        elif line.startswith("{"):
            print("  node:", line.strip(), flush=True)
    error = process.stderr.read()
    if process.wait() != 0 or rows is None:
        raise RuntimeError(f"node jobs failed: {error[-3000:]}")
    return rows


def bench_case(name: str, home: Path, work: Path, total: bool, threads: int) -> list[dict]:
    import nibabel as nib

    from node.nifti import write_nifti
    from node.phantom import PhantomSpec, make_phantom

    case_dir = work / name
    case_dir.mkdir(parents=True, exist_ok=True)
    ct = make_phantom(PhantomSpec(size=CASES[name], spacing=SPACING)).ct
    ct_path = write_nifti(ct, case_dir / "ct.nii.gz")
    body = ct.array > -500
    mode = "total" if total else "total --fast"
    cli = run_cli(home, ct_path, case_dir / "cli.nii.gz", total)
    print(f"  {name} {mode}: cli {cli['wall_s']:.1f} s, peak RSS {cli['peak_rss_mb']:.0f} MB", flush=True)
    cli_labels = np.asanyarray(nib.load(case_dir / "cli.nii.gz").dataobj).astype(np.uint8).transpose(2, 1, 0)
    rows = [cli] + run_node(home, ct_path, case_dir, total, threads)
    for row in rows:
        row["case"], row["mode"] = f"{name} {ct.shape_ijk[0]}x{ct.shape_ijk[1]}x{ct.shape_ijk[2]}", mode
        row["ratio"] = cli["wall_s"] / row["wall_s"]
        labels = cli_labels if row["row"] == "cli" else np.load(case_dir / row["file"])
        row["equal_in_body"] = float((labels[body] == cli_labels[body]).mean())
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'case':<18} {'mode':<13} {'row':<20} {'wall s':>8} {'CLI/row':>8} {'peak RSS MB':>12} " \
           f"{'tiles run/skip':>15} {'equal in body':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tiles = f"{r['tiles_run']}/{r['tiles_skipped']}" if "tiles_run" in r else "-"
        lines.append(f"{r['case']:<18} {r['mode']:<13} {r['row']:<20} {r['wall_s']:>8.1f} {r['ratio']:>7.2f}x "
                     f"{r['peak_rss_mb']:>12.0f} {tiles:>15} {r['equal_in_body'] * 100:>13.3f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="small,512")
    parser.add_argument("--total", action="store_true", help="also `total` (five 1.5 mm parts) on --total-case")
    parser.add_argument("--total-case", default="small", choices=list(CASES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    import tempfile

    from node.segment.totalseg import neutralise_torchvision, write_totalseg_config
    from node.segment.weights import required_datasets

    neutralise_torchvision()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-inference-"))
    home = work / "home"
    write_totalseg_config(home)
    ids = required_datasets("total", fast=True) + (required_datasets("total") if args.total else [])
    for i in ids:
        folder, params = write_fullsize(home, i)
        print(f"dataset {i}: {params / 1e6:.1f} M parameters, folder {folder_mb(folder.parent):.0f} MB "
              f"({folder.parent.name})", flush=True)
    rows: list[dict] = []
    for name in args.cases.split(","):
        rows += bench_case(name, home, work, total=False, threads=args.threads)
        print(table(rows), flush=True)
    if args.total:
        rows += bench_case(args.total_case, home, work, total=True, threads=args.threads)
    print(f"\nTotalSegmentator CLI vs node, CPU, {os.cpu_count()} cores, torch threads {args.threads}")
    print(table(rows), flush=True)
    return rows


def test_bench_inference() -> None:
    rows = main(["--cases", os.environ.get("BENCH_CASES", "small,512")]
                + (["--total"] if os.environ.get("BENCH_TOTAL") else []))
    assert all(r["equal_in_body"] > 0 for r in rows)


if __name__ == "__main__":
    main()
