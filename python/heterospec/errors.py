"""Errors the driver raises for bad input, each with a message that says what to fix."""


class HeteroSpecError(Exception):
    """Base class of every error the driver raises on purpose."""


class ModelLoadError(HeteroSpecError, FileNotFoundError):
    """A model path or package that does not exist or cannot be loaded."""


class UnsupportedModelError(HeteroSpecError, ValueError):
    """A model the driver cannot run exactly (no 4D attention mask / position ids support,
    a cache layout it cannot compact)."""


class TokenizerMismatchError(HeteroSpecError, ValueError):
    """Draft and target do not share a vocabulary."""


class PolicyFileError(HeteroSpecError, ValueError):
    """A policy JSON that is missing, unreadable or malformed."""


class GenerationConfigError(HeteroSpecError, ValueError):
    """Bad generation arguments (max_new_tokens, temperature, top_k, top_p, tree shape)."""


class DraftCheckpointError(HeteroSpecError, ValueError):
    """A draft checkpoint (EAGLE-3 head) that is malformed or does not fit the target."""


class ContextLengthError(GenerationConfigError):
    """A request (prompt + new tokens + the largest draft tree) longer than the model's context."""


class DataError(HeteroSpecError, ValueError):
    """A prompt set or data set that is unknown, too small for the request, or malformed."""


class UsageError(HeteroSpecError, ValueError):
    """A command-line argument that is out of range or does not fit the others; the message
    names the flag."""
