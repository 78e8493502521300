"""Which zips TotalSegmentator distributes and where, read from its own code (no network), and the
checksum check of ``weights import``: TotalSegmentator 2.18 records no checksum, so the node computes the
zip's SHA-256, checks its CRCs and compares with a value the administrator gives."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.cli import app
from node.segment.weights import (
    NO_CHECKSUM,
    WeightsError,
    import_weights,
    release_download_base,
    weights_zip,
)

D297 = "Dataset297_TotalSegmentator_total_3mm_1559subj"
RELEASES = "https://github.com/wasserth/TotalSegmentator/releases"


def test_the_zips_and_release_pages_come_from_totalsegmentators_code() -> None:
    assert release_download_base() == f"{RELEASES}/download"
    z = weights_zip(297)
    assert (z.folder, z.zip, z.url, z.release_page, z.where, z.checksum) == (
        D297,
        f"{D297}.zip",
        f"{RELEASES}/download/v2.0.0-weights/{D297}.zip",
        f"{RELEASES}/tag/v2.0.0-weights",
        "GitHub release v2.0.0-weights",
        None,
    )
    assert weights_zip(852).release_page == f"{RELEASES}/tag/v2.5.0-weights"
    licensed = weights_zip(301)  # heartchambers_highres: a licensed model
    assert (licensed.zip, licensed.url, licensed.where) == (
        None,
        None,
        "TotalSegmentator's licence server (a licensed model: ask its authors)",
    )
    with pytest.raises(WeightsError, match="knows no dataset 1"):
        weights_zip(1)


def test_totalsegmentator_records_no_checksum_for_any_zip() -> None:
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    keys = {k for info in TASK_ID_WEIGHTS_CONFIGS.values() for k in info}
    assert keys == {
        "foldername",
        "version",
        "rel_path",
        "commercial",
    }  # folder, release, licence: no checksum
    assert all(weights_zip(i).checksum is None for i in TASK_ID_WEIGHTS_CONFIGS if isinstance(i, int))


def _weights_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{D297}/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth", b"w" * 1000)
        zf.writestr(f"{D297}/nnUNetTrainer__nnUNetPlans__3d_fullres/plans.json", b"{}")
    return path


def test_import_checks_the_sha256_given_and_the_crcs(tmp_path: Path) -> None:
    archive = _weights_zip(tmp_path / f"{D297}.zip")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(WeightsError) as wrong:
        import_weights(archive, tmp_path / "home", expected_sha256="0" * 64)
    assert (wrong.value.code, str(wrong.value)) == (
        "checksum_mismatch",
        f"{archive}: SHA-256 {digest}, expected {'0' * 64}; not imported",
    )
    assert not (tmp_path / "home" / "nnunet" / "results" / D297).exists()
    (done,) = import_weights(archive, tmp_path / "home", expected_sha256=digest.upper())
    assert (done.name, done.action, done.sha256) == (D297, "installed", digest)

    damaged = tmp_path / "damaged.zip"
    data = bytearray(archive.read_bytes())
    at = data.index(b"w" * 1000)
    data[at : at + 4] = b"xxxx"  # the stored member's bytes no longer match its CRC
    damaged.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"fails its CRC check \(a damaged copy\); not imported") as bad:
        import_weights(damaged, tmp_path / "other")
    assert bad.value.code == "bad_zip"


def test_the_commands_say_where_the_zips_are_and_what_was_checked(tmp_path: Path) -> None:
    runner = CliRunner()
    status = runner.invoke(app, ["weights", "status", "--weights-dir", str(tmp_path / "home"), "--json"])
    assert status.exit_code == 0, status.output
    data = json.loads(status.output)
    (total,) = [t for t in data["tasks"] if t["task"] == "total"]
    assert total["zips"]["fast"] == [f"{D297}.zip"]
    assert data["zips"]["297"]["release_page"] == f"{RELEASES}/tag/v2.0.0-weights"
    assert data["checksums"] == NO_CHECKSUM.format(version="2.18.0")
    archive = _weights_zip(tmp_path / f"{D297}.zip")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    imported = runner.invoke(
        app, ["weights", "import", str(archive), "--weights-dir", str(tmp_path / "home")]
    )
    assert imported.exit_code == 0, imported.output
    assert f"sha256: {digest} (TotalSegmentator 2.18.0 records no checksum" in " ".join(
        imported.output.split()
    )
    refused = runner.invoke(
        app, ["weights", "import", str(archive), "--weights-dir", str(tmp_path / "h2"), "--sha256", "ab" * 32]
    )
    assert refused.exit_code == 1 and "[checksum_mismatch]" in refused.output
