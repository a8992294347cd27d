"""Exceptions raised for bad input; the CLI turns them into one clear line and a non-zero exit."""


class SparsetrainError(Exception):
    """Base class of every error a user can fix by changing their input."""


class ConfigError(SparsetrainError, ValueError):
    """A bad option, sparsity, layer name, method, model or YAML value."""


class DataError(SparsetrainError):
    """A dataset that is missing, incomplete or corrupt."""


class CheckpointError(SparsetrainError):
    """A checkpoint that is corrupt, truncated, of another run, or of a newer format."""


class ExportError(SparsetrainError):
    """A model whose masks do not fit the requested export format."""
