"""Mistral's request types (La Plateforme): chat completions and FIM."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ...sampling.params import MISTRAL_DEFAULT_TEMPERATURE
from ..protocol import (
    ChatMessage,
    ChatRequest,
    MaxTokens,
    N,
    NamedToolChoice,
    ReasoningEffort,
    ResponseFormat,
    SamplingFields,
    Seed,
    TextRequest,
    Tool,
    ToolChoiceMode,
    TopLogprobs,
    dump,
    sampling_kwargs,
    tool_choice_value,
)

# Mistral's documented guardrail prompt for safe_prompt=true.
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)


class MistralChatCompletionRequest(SamplingFields):
    model: str = Field(description="the served model's id (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens
    n: N
    random_seed: Seed
    stream: bool = False
    logprobs: bool | None = Field(None, description="return the log-probability of each generated token")
    top_logprobs: TopLogprobs
    tools: list[Tool] | None = None
    tool_choice: ToolChoiceMode | NamedToolChoice | None = Field(
        None, description="'any' (or 'required') forces a call; a named function forces that one")
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    safe_prompt: bool = Field(False, description="prepend Mistral's guardrail prompt to the system prompt")
    prompt_mode: Literal["reasoning"] | None = Field(None, description=(
        "'reasoning': the model's reasoning system prompt (its SYSTEM_PROMPT.txt) comes first"))
    reasoning_effort: ReasoningEffort
    metadata: dict[str, Any] | None = None

    def normalize(self) -> ChatRequest:
        messages = [m.wire() for m in self.messages]
        if self.safe_prompt:
            messages = with_safe_prompt(messages)
        return ChatRequest(
            model=self.model,
            messages=messages,
            tools=dump(self.tools),
            tool_choice=tool_choice_value(self.tool_choice),
            parallel_tool_calls=self.parallel_tool_calls is not False,
            response_format=dump(self.response_format),
            sampling=sampling_kwargs(self, default_temperature=MISTRAL_DEFAULT_TEMPERATURE, n=self.n,
                                     max_tokens=self.max_tokens, seed=self.random_seed),
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs or 0,
            stream=self.stream,
            reasoning_effort=self.reasoning_effort,
            prompt_mode=self.prompt_mode,
        )


class MistralFIMCompletionRequest(SamplingFields):
    """Codestral's fill-in-the-middle: the code before the gap and after it."""

    model: str
    prompt: str = Field(description="the text before the gap")
    suffix: str | None = Field(None, description="the text after the gap")
    max_tokens: MaxTokens
    n: N
    random_seed: Seed
    stream: bool = False
    metadata: dict[str, Any] | None = None

    def normalize(self) -> TextRequest:
        return TextRequest(
            model=self.model,
            prompts=[self.prompt],
            suffix=self.suffix,
            fim=True,
            sampling=sampling_kwargs(self, default_temperature=MISTRAL_DEFAULT_TEMPERATURE, n=self.n,
                                     max_tokens=self.max_tokens, seed=self.random_seed),
            logprobs=None,
            stream=self.stream,
        )


def with_safe_prompt(messages: list[dict]) -> list[dict]:
    """The guardrail prompt before the system prompt (or as one, if there is none)."""
    return with_system_prompt(messages, SAFE_PROMPT)


def with_system_prompt(messages: list[dict], prompt: str | list[dict]) -> list[dict]:
    """``prompt`` (text, or content parts) before the request's own system prompt: joined to
    it by a blank line when both are text, else as a system message of its own before it."""
    first = messages[0] if messages else None
    if (first is not None and first["role"] in ("system", "developer") and isinstance(first.get("content"), str)
            and isinstance(prompt, str)):
        return [dict(first, content=f"{prompt}\n\n{first['content']}"), *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]
