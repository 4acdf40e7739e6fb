"""Which API a request speaks: OpenAI's or Mistral's.

Both clients post to the same ``/v1/chat/completions`` with nearly the same body;
the dialect decides the error envelope, where usage goes in a stream, and a few
field names. The rule, first match wins:

1. the path, where only one API has it: ``/v1/fim/...`` and ``/v1/batch/...`` are
   Mistral's, ``/v1/completions`` and ``/v1/batches...`` OpenAI's;
2. an explicit ``X-Galerne-Dialect: openai | mistral`` header;
3. the client: a ``User-Agent`` starting with ``mistral-client`` (the official
   ``mistralai`` SDK) is Mistral; one starting with ``OpenAI/`` or an
   ``X-Stainless-Lang`` header (the official ``openai`` SDKs) is OpenAI;
4. the body (chat only): a field only Mistral's API has (``random_seed``,
   ``safe_prompt``, ``prompt_mode``, ``tool_choice: "any"``) makes it Mistral;
5. otherwise OpenAI: most third-party tools are written for OpenAI's API.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from starlette.requests import Request


class Dialect(str, Enum):
    OPENAI = "openai"
    MISTRAL = "mistral"


HEADER = "x-galerne-dialect"
MISTRAL_ONLY_FIELDS = ("random_seed", "safe_prompt", "prompt_mode")


def from_headers(request: Request) -> Dialect | None:
    """Rules 1-3: what the path and headers alone say (None: undecided)."""
    path = request.url.path
    if path.startswith(("/v1/fim/", "/v1/batch/")):
        return Dialect.MISTRAL
    if path.rstrip("/") == "/v1/completions" or path.startswith("/v1/batches"):
        return Dialect.OPENAI
    explicit = request.headers.get(HEADER, "").strip().lower()
    if explicit in (Dialect.OPENAI.value, Dialect.MISTRAL.value):
        return Dialect(explicit)
    agent = request.headers.get("user-agent", "").lower()
    if agent.startswith("mistral-client"):
        return Dialect.MISTRAL
    if agent.startswith("openai/") or "x-stainless-lang" in request.headers:
        return Dialect.OPENAI
    return None


def from_body(body: Any) -> Dialect:
    """Rules 4-5, for a request whose headers did not decide."""
    if isinstance(body, dict) and (
        any(body.get(f) is not None for f in MISTRAL_ONLY_FIELDS) or body.get("tool_choice") == "any"
    ):
        return Dialect.MISTRAL
    return Dialect.OPENAI


def detect(request: Request, body: Any = None) -> Dialect:
    """The request's dialect, remembered on ``request.state`` for the error handlers."""
    dialect = from_headers(request) or from_body(body)
    request.state.dialect = dialect
    return dialect


def of(request: Request) -> Dialect:
    """The dialect already detected for this request, or what the headers say."""
    return getattr(request.state, "dialect", None) or from_headers(request) or Dialect.OPENAI
