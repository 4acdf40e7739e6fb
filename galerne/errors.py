"""Typed exceptions. Every error a user can cause is one of these.

The CLI prints ``str(error)`` and exits non-zero; the server maps each class to
an HTTP status and body in one place (``server/errors.py``). Never match on
message text: match on the class.
"""

from __future__ import annotations


class GalerneError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class ModelLoadError(GalerneError):
    """A model folder, config or weight file cannot be used.

    ``path`` names the file (or folder) and ``tensor`` the tensor, when known,
    so that the message always says where the problem is.
    """

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None):
        self.path = path
        self.tensor = tensor
        where = []
        if path:
            where.append(str(path))
        if tensor:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class ConfigError(ModelLoadError):
    """``config.json`` / ``params.json`` is missing, unreadable or unsupported; or a setting
    has a wrong value (``path``: where it came from: a file, "command line", or an
    environment variable)."""


class TokenizerError(GalerneError):
    """A tokenizer file cannot be found or read, or a request cannot be encoded."""


class InvalidParameter(GalerneError, ValueError):
    """A request parameter is out of range or of the wrong kind; ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class PromptTooLong(InvalidParameter):
    """The prompt does not fit the model's context (or, to generate, fills it)."""

    def __init__(self, prompt_len: int, limit: int, what: str = "prompt"):
        self.prompt_len = prompt_len
        self.limit = limit
        super().__init__(
            what,
            f"{prompt_len} tokens is longer than the model's context of {limit} tokens" if prompt_len > limit
            else f"{prompt_len} tokens fill the model's context of {limit} tokens: no room is left to generate",
        )


class EngineDeadError(GalerneError):
    """The engine loop stopped (a failed step: a bug or a device failure; or a shutdown):
    it takes no more requests, and those it was running end with this error."""
