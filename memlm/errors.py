"""Errors a user can cause and fix. The CLI prints them as one line and exits with code 2."""


class MemlmError(Exception):
    """Base class for user-facing errors (bad input, missing model, corrupt file)."""


class ModelNotFoundError(MemlmError):
    pass


class ModelFormatError(MemlmError):
    """A model file or folder exists but cannot be read: corrupt, truncated or unsupported."""


class InvalidRequestError(MemlmError):
    """A generation request with invalid parameters (empty prompt, temperature < 0, ...)."""


class QueueFullError(MemlmError):
    """The engine's waiting queue is full: try again later (the server answers 503 with Retry-After)."""
