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
    """The prompt and the tokens asked for do not fit the model's context.

    The message is OpenAI's wording ("This model's maximum context length is N
    tokens. However, you requested M tokens ..."), which clients (LiteLLM,
    LangChain, agents that trim their history) match on; ``field`` names the
    parameter (``what``, the prompt's, unless ``field`` says max_tokens), the message
    does not start with it.
    ``completion_tokens``: the tokens asked for (1 when the prompt alone fills the
    context: generating needs at least one).
    """

    def __init__(self, prompt_len: int, limit: int, what: str = "prompt", completion_tokens: int = 0, *,
                 field: str | None = None):
        self.prompt_len, self.limit, self.completion_tokens = prompt_len, limit, completion_tokens
        self.field = field or what
        where = "messages" if what == "messages" else "prompt"
        GalerneError.__init__(
            self,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + completion_tokens} tokens ({prompt_len} in the {where}, {completion_tokens} in the "
            f"completion). Please reduce the length of the {where} or completion.",
        )


class EngineDeadError(GalerneError):
    """The engine loop stopped (a failed step: a bug or a device failure; or a shutdown):
    it takes no more requests, and those it was running end with this error."""


class NotFound(GalerneError):
    """No file, job or fine-tuned model of that id (the platform: files, jobs, fine-tuned models). ``code``:
    ``file_not_found``, ``job_not_found``, ``model_not_found``."""

    def __init__(self, message: str, code: str, field: str | None = None):
        self.code, self.field = code, field
        super().__init__(message)


class WrongState(GalerneError):
    """An action the record's status does not allow (cancel a finished job, start a running
    one, delete a file a job still reads): nothing changed. ``code`` names the case."""

    def __init__(self, message: str, code: str = "invalid_state", field: str | None = None):
        self.code, self.field = code, field
        super().__init__(message)
