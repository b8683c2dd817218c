"""Exception hierarchy for the dsv4 package."""

from __future__ import annotations

__all__ = [
    "DSV4Error",
    "CheckpointFormatError",
    "InvalidRequestError",
    "ConfigError",
    "EngineDeadError",
    "RequestAbortedError",
    "OutOfBlocksError",
    "UnknownSequenceError",
]


class DSV4Error(Exception):
    """Base class of every error raised by dsv4."""


class CheckpointFormatError(DSV4Error):
    """A checkpoint tensor has the wrong dtype, shape or layout for its format."""


class InvalidRequestError(DSV4Error, ValueError):
    """A client request is malformed or violates a limit."""


class ConfigError(DSV4Error, ValueError):
    """A configuration value is missing, inconsistent or unsupported."""


class EngineDeadError(DSV4Error, RuntimeError):
    """The engine loop has died (or was shut down); no request can make progress."""


class RequestAbortedError(DSV4Error):
    """The request was aborted (by the client or by the engine) before it finished."""


class OutOfBlocksError(DSV4Error, RuntimeError):
    """The KV-cache block pool has too few free blocks for the requested allocation."""


class UnknownSequenceError(DSV4Error, LookupError):
    """A block-manager operation named a sequence that is not allocated (or was already freed)."""
