"""The node's one error shape for bad input and refusals: a stable ``code`` for programs (the job
API, reports, logs) and one sentence for people."""

from __future__ import annotations


class NodeError(Exception):
    """Base of the coded errors (VolumeError, SegmentationError, SegError, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message
