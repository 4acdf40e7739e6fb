"""Wire types shared by both dialects: one field per API parameter, with bounds
and a description (they make the OpenAPI docs and the 400/422 errors).

Every model allows extra fields: a parameter we do not know is ignored, never an
error, so that clients newer than this server keep working. The conversation
(roles, content parts, tool calls, tools, tool_choice, response_format) is checked
by ``galerne.conversation``, which names the field at fault in the same way.

Types are strict (pydantic's strict mode): ``max_tokens: "10"``, ``max_tokens: true``,
``n: 1.5`` or ``stream: "yes"`` are refused, not coerced; a number field takes an
integer (``temperature: 1``), as JSON does not tell 1 from 1.0. And no string
anywhere in a body (known field or not, dict keys included) may hold a lone UTF-16
surrogate (``"\\ud800"``): the encoders cannot take it, so it is refused naming the
place (``messages[0].content``), as any other invalid value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..conversation import find_lone_surrogate, surrogate_message
from ..errors import InvalidParameter
from ..sampling.params import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP,
    MAX_STOP_CHARS,
    MISTRAL_DEFAULT_TEMPERATURE,
    SamplingParams,
)
from .errors import FieldError, RequestInvalid


class Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)


class RequestBody(Wire):
    """A whole request body: its text is checked once, here (see the module's doc)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = find_lone_surrogate(data)
        if found is not None:
            where, char = found
            # Not a ValueError: pydantic lets it through, with the place inside the body.
            raise RequestInvalid([FieldError(("body", *where), surrogate_message(char), "string_unicode")])
        return data


# ---------------------------------------------------------------- messages


class ImageURL(Wire):
    url: str = Field(description="a base64 data URI (data:image/png;base64,...), or an http(s) URL where the server "
                                 "allows them (--allow-image-urls)")
    detail: str | None = Field(None, description="OpenAI's detail level: accepted, not used (images keep their "
                                                  "resolution up to the model's maximum)")


class ContentPart(Wire):
    type: str = Field(description="'text', 'image_url' (user messages, models with a vision encoder) and "
                                  "'thinking' (reasoning models); other kinds are refused")
    image_url: str | ImageURL | None = Field(None, description="type 'image_url': the image (OpenAI's object, or "
                                                                  "Mistral's plain string)")
    text: str | None = None
    thinking: str | list[ContentPart] | None = Field(None, description=(
        "type 'thinking': the thought, as text (mistral-common) or text chunks (Mistral's API)"))
    closed: bool | None = Field(None, description="type 'thinking': false when the thought goes on (a prefix)")


class FunctionCall(Wire):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] | None = Field(None, description="a JSON object, as a string (OpenAI) or an object (Mistral)")


class ToolCall(Wire):
    id: str | None = Field(None, description="any string: ids that are not 9 characters of [a-zA-Z0-9] are mapped")
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="'developer' is read as 'system'")
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: the calls it made")
    tool_call_id: str | None = Field(None, description="tool: the call this message answers")
    name: str | None = Field(None, description="tool: the function's name")
    prefix: bool = Field(False, description="assistant, last message only: the answer must continue this text")
    reasoning_content: str | None = Field(None, description="assistant: its thinking (vLLM's field)")
    reasoning: str | None = Field(None, description="assistant: its thinking (another name of reasoning_content)")

    def wire(self) -> dict:
        return self.model_dump(exclude_none=True, exclude={"prefix"} if not self.prefix else set())


# ---------------------------------------------------------------- tools


class FunctionDefinition(Wire):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")
    strict: bool | None = None


class Tool(Wire):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(Wire):
    name: str = Field(min_length=1)


class NamedToolChoice(Wire):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoiceMode = Literal["auto", "none", "any", "required"]


class JsonSchemaFormat(Wire):
    name: str = Field("response", max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON schema the answer must match")
    strict: bool | None = None


class ResponseFormat(Wire):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = Field(None, description="with type 'json_schema'")


# ---------------------------------------------------------------- sampling

Temperature = Annotated[float | None, Field(None, ge=0.0, le=2.0, description=(
    f"0 is greedy; default {SamplingParams.temperature} (OpenAI) / {MISTRAL_DEFAULT_TEMPERATURE} (Mistral)"))]
TopP = Annotated[float | None, Field(None, ge=0.0, le=1.0, description="nucleus sampling mass; 0 is greedy")]
MaxTokens = Annotated[int | None, Field(None, ge=1, description="tokens to generate at most; default: until the context is full")]
Stop = Annotated[str | list[str] | None, Field(None, description=(
    f"stop strings (not included in the text): at most {MAX_STOP}, of at most {MAX_STOP_CHARS} characters each"))]
N = Annotated[int | None, Field(None, ge=1, le=MAX_N, description="completions to return")]
Penalty = Annotated[float | None, Field(None, ge=-2.0, le=2.0)]
Seed = Annotated[int | None, Field(None, ge=-(2**63), le=2**64 - 1, description="reproducible sampling")]
ReasoningEffort = Annotated[Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None, Field(
    None, description=("how much the model thinks, where its prompt format carries it (tokenizer v15); "
                       "ignored for other models"))]
TopLogprobs = Annotated[int | None, Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per token, with logprobs")]


class SamplingFields(RequestBody):
    """Fields every generation endpoint takes, and galerne's extensions (vLLM's names)."""

    temperature: Temperature
    top_p: TopP
    stop: Stop
    presence_penalty: Penalty
    frequency_penalty: Penalty
    top_k: int | None = Field(None, ge=-1, description="extension: keep the k most likely tokens (0 or -1: off)")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="extension: min-p sampling")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="extension: HF-style repetition penalty (1: off)")
    min_tokens: int | None = Field(None, ge=0, description="extension: tokens generated before EOS may end the answer")
    ignore_eos: bool | None = Field(None, description="extension: keep generating past the end-of-sequence token")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=(
        "extension (vLLM's): each prompt token's log-probability, rank and that many top alternatives"))


def sampling_kwargs(req: SamplingFields, *, default_temperature: float | None = None, n: int | None = None,
                    max_tokens: int | None = None, seed: int | None = None, logit_bias: dict | None = None) -> dict:
    """SamplingParams keyword arguments of what a request gave: its sampling fields, and
    the others a dialect names in its own way. A value left out (None) is left to
    SamplingParams' default, but the temperature: the dialect's ``default_temperature``
    when it has one (Mistral's)."""
    given = {"n": n, "max_tokens": max_tokens, "seed": seed, "logit_bias": logit_bias}
    out = {name: value for name, value in given.items() if value is not None}
    for name in SamplingFields.model_fields:
        value = getattr(req, name)
        if value is not None:
            out[name] = value
    if "temperature" not in out and default_temperature is not None:
        out["temperature"] = default_temperature
    if out.get("top_p") == 0.0:  # OpenAI reads top_p 0 as "only the most likely token"
        del out["top_p"]
        out["temperature"] = 0.0
    return out


def sampling_params(kwargs: dict) -> SamplingParams:
    """The SamplingParams of a request's keyword arguments (``sampling_kwargs`` plus what
    the route adds); a keyword it does not know is an InvalidParameter, not a 500."""
    try:
        return SamplingParams(**kwargs)
    except TypeError as e:
        raise InvalidParameter("body", str(e)) from None


def tool_choice_value(choice: str | NamedToolChoice | None) -> str | dict | None:
    """One spelling for both dialects: "auto" | "none" | "required" | {"type": "function", ...}."""
    if choice is None or isinstance(choice, str):
        return "required" if choice == "any" else choice
    return {"type": "function", "function": {"name": choice.function.name}}


def dump(items) -> Any:
    """Wire objects as the plain dicts the tokenizer and guidance take."""
    if items is None:
        return None
    if isinstance(items, list):
        return [dump(i) for i in items] or None
    return items.model_dump(exclude_none=True, by_alias=True)


# ---------------------------------------------------------------- adapters (vLLM's bodies)


class LoadLoRAAdapterRequest(RequestBody):
    lora_name: str = Field(description="the adapter's name: requests pick it with \"model\": NAME")
    lora_path: str = Field(description="its PEFT folder, or Mistral lora.safetensors (or the folder holding it); "
                                       "absolute, or relative to a --lora-dir, and inside one")


class UnloadLoRAAdapterRequest(RequestBody):
    lora_name: str = Field(description="the name it was loaded under")


# ---------------------------------------------------------------- normalized requests


@dataclass
class ChatRequest:
    """A chat request, whichever dialect it came in."""

    model: str
    messages: list[dict]
    sampling: dict  # SamplingParams keyword arguments
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True
    response_format: dict | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False  # OpenAI's stream_options.include_usage (the usage comes last either way)
    reasoning_effort: str | None = None
    prompt_mode: str | None = None  # Mistral's: "reasoning" puts the model's reasoning system prompt first


@dataclass
class TextRequest:
    """A text completion (OpenAI's legacy endpoint) or a fill-in-the-middle (Mistral's FIM)."""

    model: str
    prompts: list[str | list[int]]
    sampling: dict
    suffix: str | None = None
    fim: bool = False  # encode as fill-in-the-middle (prompt + suffix)
    echo: bool = False
    logprobs: int | None = None
    stream: bool = False
    include_usage: bool = False

    def check_size(self, max_queued: int) -> None:
        """Refuse (400) a request for more completions (prompts times ``n``) than the server
        ever queues (``max_queued_requests``): it could never be admitted, and a 429 would
        have its client retry forever."""
        k, n = len(self.prompts), self.sampling.get("n", 1)
        if k * n > max_queued:
            field, asked = ("n", f"n = {n} asks") if k == 1 else ("prompt", f"{k} prompts x n = {n} ask")
            raise InvalidParameter(field, f"{asked} for {k * n} completions; this server queues at most {max_queued} "
                                          "(max_queued_requests)")


# ------------------------------------------------------------------ lists (files, jobs, checkpoints)


def page_of(rows: list[dict], *, limit: int, after: str | None = None, page: int | None = None,
            page_size: int | None = None, default_page_size: int = 100) -> tuple[list[dict], bool]:
    """One page of ``rows`` (filtered and ordered already), and whether more follow.
    Mistral's paging when ``page`` or ``page_size`` is given (``page`` from 0); else
    OpenAI's: the ``limit`` rows after the row whose id is ``after`` (an unknown ``after``:
    none)."""
    if page is not None or page_size is not None:
        size = page_size or default_page_size
        start = (page or 0) * size
        return rows[start:start + size], start + size < len(rows)
    if after is not None:
        ids = [r["id"] for r in rows]
        rows = rows[ids.index(after) + 1:] if after in ids else []
    return rows[:limit], len(rows) > limit


def id_bounds(data: list[dict]) -> dict:
    """OpenAI's ``first_id`` and ``last_id`` of a list's page."""
    return {"first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

