"""Error hierarchy: every failure a user can cause is a ``LaserError`` with a message that names the fix."""
from __future__ import annotations


class LaserError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(LaserError, ValueError):
    """A setting is out of range or inconsistent (rho, K, q, grids, split sizes, recipes)."""


class ModelLoadError(LaserError):
    """A model could not be found, read or used (bad path, offline hub id, corrupt file)."""


class TaskFormatError(LaserError, ValueError):
    """A task file or dataset is missing, malformed or does not fit the requested splits."""


class NumericsError(LaserError):
    """A loss or gradient is NaN or infinite."""


class Cancelled(LaserError):
    """A job was cancelled through its ``CancelToken``; partial results were kept."""


class JobBusy(LaserError):
    """Another job is already editing this model."""


class OutOfMemory(LaserError):
    """The device ran out of memory (a model too large for it, a stack of candidates too tall); nothing was left
    edited, and what was cached stays."""
