"""The layering the architecture page draws holds in the imports: lower layers never import the HTTP
layer (``node.web``) nor the commands above it (``node.cli``, ``node.serve`` and the command modules) —
metrics live in :mod:`node.metrics`, below all of them; stages take their contract from
:mod:`node.stages`; artifacts build on :mod:`node.dicom.derived`, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

NODE = Path(__file__).resolve().parents[2] / "node"
LOWER = ("metrics.py", "ingest", "jobs", "segment", "dicom", "export", "pipeline.py", "volume.py")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("part", LOWER)
def test_lower_layers_do_not_import_web(part: str) -> None:
    assert _importing(part, ("node.web",)) == {}


def _importing(part: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """The files of ``part`` (a module or a package under node/) that import any of ``forbidden``."""
    root = NODE / part
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    assert files
    bad = {str(f.relative_to(NODE)): sorted(n for n in _imports(f) if any(n == m or n.startswith(m + ".")
                                                                         for m in forbidden))
           for f in files}
    return {f: names for f, names in bad.items() if names}


#: The commands: they put the layers together and nothing below imports them.
COMMANDS = ("node.cli", "node.serve", "node.service", "node.doctor", "node.backup")


@pytest.mark.parametrize("part", (*LOWER, "stages.py", "stats.py", "artifacts", "web"))
def test_lower_layers_do_not_import_the_commands(part: str) -> None:
    assert _importing(part, COMMANDS) == {}


def test_metrics_sit_below_ingest_jobs_and_web() -> None:
    assert _importing("metrics.py", ("node.ingest", "node.jobs", "node.web", "node.export")) == {}


def test_dicom_objects_do_not_import_artifacts() -> None:
    """Artifacts (review sheet, DICOM meshes) build on ``node.dicom.derived``; ``node.dicom`` imports none."""
    assert _importing("dicom", ("node.artifacts",)) == {}


#: Where stages live: they take the contract from ``node.stages``, never from the pipeline that runs them.
STAGE_PARTS = ("stages.py", "segment", "dicom", "artifacts")


@pytest.mark.parametrize("part", STAGE_PARTS)
def test_stages_do_not_import_the_pipeline(part: str) -> None:
    assert _importing(part, ("node.pipeline",)) == {}
