"""OpenAI's request types: chat completions and the legacy text completions."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ...errors import InvalidParameter
from ...sampling.params import MAX_N
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
    Wire,
    dump,
    sampling_kwargs,
    tool_choice_value,
)


class StreamOptions(Wire):
    include_usage: bool = Field(False, description="send a last chunk with the usage (and usage: null before it)")


class OpenAIChatCompletionRequest(SamplingFields):
    model: str = Field(description="the served model's id (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens
    max_completion_tokens: MaxTokens
    n: N
    seed: Seed
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = Field(False, description="return the log-probability of each generated token")
    top_logprobs: TopLogprobs
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    tools: list[Tool] | None = None
    tool_choice: ToolChoiceMode | NamedToolChoice | None = Field(
        None, description="'required' (or 'any') forces a call; a named function forces that one")
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort
    user: str | None = None

    def normalize(self) -> ChatRequest:
        return ChatRequest(
            model=self.model,
            messages=[m.wire() for m in self.messages],
            tools=dump(self.tools),
            tool_choice=tool_choice_value(self.tool_choice),
            parallel_tool_calls=self.parallel_tool_calls is not False,
            response_format=dump(self.response_format),
            sampling=sampling_kwargs(self, n=self.n, seed=self.seed, logit_bias=self.logit_bias,
                                     max_tokens=self.max_completion_tokens or self.max_tokens),
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs or 0,
            stream=self.stream,
            include_usage=bool(self.stream_options and self.stream_options.include_usage),
            reasoning_effort=self.reasoning_effort,
        )


class OpenAICompletionRequest(SamplingFields):
    """Legacy text completions; with ``suffix``, a fill-in-the-middle prompt."""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, texts, token ids, or lists of token ids (one completion set each)")
    suffix: str | None = Field(None, description="text after the gap: the prompt becomes fill-in-the-middle")
    max_tokens: int | None = Field(16, ge=0, description=(
        "tokens to generate at most (OpenAI's default: 16); 0 with echo scores the prompt alone"))
    n: N
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only best_of == n is supported")
    seed: Seed
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="return the prompt before the completion")
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probabilities of the chosen and that many top tokens")
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def normalize(self) -> TextRequest:
        if self.best_of not in (None, self.n or 1):
            raise InvalidParameter("best_of", f"only best_of == n is supported (got best_of {self.best_of}, n {self.n or 1})")
        return TextRequest(
            model=self.model,
            prompts=_prompts(self.prompt),
            suffix=self.suffix,
            fim=self.suffix is not None,
            echo=self.echo,
            sampling=sampling_kwargs(self, n=self.n, max_tokens=self.max_tokens, seed=self.seed,
                                     logit_bias=self.logit_bias),
            logprobs=self.logprobs,
            stream=self.stream,
            include_usage=bool(self.stream_options and self.stream_options.include_usage),
        )


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:  # no prompt, or no token: either way nothing to complete
        raise InvalidParameter("prompt", "is empty")
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)
