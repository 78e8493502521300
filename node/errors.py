"""The node's one error shape for bad input and refusals: a stable ``code`` for programs (the job
API, reports, logs) and one sentence for people."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


class NodeError(Exception):
    """Base of the coded errors (VolumeError, SegmentationError, SegError, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


def options_from_mapping(cls: type[T], values: Mapping[str, Any] | None, error: type[NodeError], what: str) -> T:
    """A stage's options dataclass from a plain mapping (TOML, JSON); unknown keys are refused as
    ``error("bad_option", ...)`` naming the known ones."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise error("bad_option", f"unknown {what} option(s) {unknown}; known: {sorted(known)}")
    return cls(**values)
