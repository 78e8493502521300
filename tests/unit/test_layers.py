"""The layering the architecture page draws holds in the imports: lower layers never import the HTTP
layer (``node.web``) — metrics live in :mod:`node.metrics`, below all of them."""

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
    root = NODE / part
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    assert files
    bad = {str(f.relative_to(NODE)): sorted(n for n in _imports(f) if n == "node.web" or n.startswith("node.web."))
           for f in files}
    assert {f: names for f, names in bad.items() if names} == {}


#: Where stages live: they take the contract from ``node.stages``, never from the pipeline that runs them.
STAGE_PARTS = ("stages.py", "segment", "dicom", "artifacts")


@pytest.mark.parametrize("part", STAGE_PARTS)
def test_stages_do_not_import_the_pipeline(part: str) -> None:
    root = NODE / part
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    bad = {str(f.relative_to(NODE)): sorted(n for n in _imports(f) if n == "node.pipeline"
                                            or n.startswith("node.pipeline."))
           for f in files}
    assert {f: names for f, names in bad.items() if names} == {}
