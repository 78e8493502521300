"""Engines by name: ``threshold`` and ``labelmap`` (embedded), ``totalsegmentator`` (optional).

TotalSegmentator's adapter is imported only when asked for, so the node starts, and the other
engines work, on a machine without torch or TotalSegmentator. A missing or broken adapter is a
:class:`~node.segment.SegmentationError` (code ``engine_unavailable``), never an ImportError.
"""

from __future__ import annotations

import importlib

from node.segment import Engine, SegmentationError

ENGINES = ("threshold", "labelmap", "totalsegmentator")

#: Names the TotalSegmentator adapter module may give its engine class or instance, in order.
_TOTALSEG_NAMES = ("TotalSegmentatorEngine", "TotalSegEngine", "ENGINE", "engine", "Engine")


def get_engine(name: str) -> Engine:
    """A fresh engine called ``name`` (see :data:`ENGINES`)."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key == "threshold":
        from node.segment.threshold import ThresholdEngine

        return ThresholdEngine()
    if key == "labelmap":
        from node.segment.labelmap import LabelmapEngine

        return LabelmapEngine()
    if key in ("totalsegmentator", "totalseg"):
        return _totalsegmentator()
    raise SegmentationError(
        "unknown_engine", f"no engine called {name!r}; choose one of {', '.join(ENGINES)}"
    )


def _totalsegmentator() -> Engine:
    try:
        module = importlib.import_module("node.segment.totalseg")
    except Exception as exc:  # ImportError, or torch/torchvision failing while the adapter imports
        raise SegmentationError(
            "engine_unavailable",
            f"the totalsegmentator engine is not available on this node ({type(exc).__name__}: {exc}); "
            "use --engine threshold or labelmap, or install it (see the README)",
        ) from None
    for attr in _TOTALSEG_NAMES:
        found = getattr(module, attr, None)
        if found is None:
            continue
        engine = found() if isinstance(found, type) else found
        if callable(getattr(engine, "segment", None)):
            return engine  # type: ignore[no-any-return]
    raise SegmentationError(
        "engine_unavailable",
        "node.segment.totalseg defines no engine (expected a TotalSegmentatorEngine class)",
    )
