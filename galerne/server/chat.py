"""Chat completions, one implementation for both dialects (and the shape of
Mistral's FIM answers, which are chat-shaped).

The dialects differ only in a few places, all here: which request type validates
the body, the error envelope (errors.py), ids, and ``finish_reason`` (Mistral
says ``model_length`` when the context, not max_tokens, ran out), and a reasoning
model's thinking, which each API writes its own way (below). Streams are
otherwise the same in both, so that a client detected as the wrong dialect (a Mistral
client with a plain user agent) still reads them: each tool call goes out whole,
in one entry (id, name, arguments), as Mistral's client requires and OpenAI's
accepts (the openai SDK's stream helper and instructor merge entries by index,
and would see two calls for a name and its arguments sent in one chunk); and the
stream's last chunk carries the usage: with OpenAI's
``stream_options.include_usage``, an extra chunk with no choices (as OpenAI
sends it), otherwise the last choice's finish chunk (as Mistral sends it).

Thinking, content and tool calls: each choice's ids go to one ``AnswerParser``
(``galerne.tokenizer.answer``), streamed or not. A reasoning model's thinking goes
out as Mistral's API writes it, a ``thinking`` chunk in ``content``
(``[{"type": "thinking", "thinking": [{"type": "text", "text": ..}]}, {"type":
"text", "text": ..}]``; a streamed delta carries its thinking as such a list, its
text as a string), and as vLLM writes it for OpenAI's clients, ``reasoning_content``
beside ``content`` (``delta.reasoning_content`` in a stream), with
``usage.completion_tokens_details.reasoning_tokens``. ``completion_tokens`` counts
the thinking in both.

Tool calls: an answer cut by ``max_tokens`` ends with finish_reason "length" and
the calls as far as they went, never with the model's control text as content. An
answer that ends (EOS) without a well-formed call after the marker was not a call:
its raw text, special tokens written out, is the content, so that nothing the model
said is lost.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from ..conversation import Conversation
from ..engine.engine import StepOutput
from ..engine.request import INTERACTIVE, EngineRequest, validate_request
from ..errors import InvalidParameter
from ..sampling.guided import guidance_for_chat
from ..sampling.params import SamplingParams
from ..tokenizer.answer import AnswerParser
from ..tokenizer.toolcalls import ToolEvent
from . import dialect as dialects
from .auth import require_api_key
from .dialect import Dialect
from .logprobs import api_logprob, prompt_logprobs
from .mistral.protocol import MistralChatCompletionRequest, with_system_prompt
from .openai.protocol import OpenAIChatCompletionRequest
from .protocol import ChatRequest, sampling_params
from .serving import Generation, Responder, read_json, read_request, respond
from .state import ServerState

router = APIRouter(dependencies=[Depends(require_api_key)])

CHAT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"anyOf": [
            {"$ref": "#/components/schemas/OpenAIChatCompletionRequest"},
            {"$ref": "#/components/schemas/MistralChatCompletionRequest"},
        ]}}},
    }
}


CHAT_WIRE = {Dialect.OPENAI: OpenAIChatCompletionRequest, Dialect.MISTRAL: MistralChatCompletionRequest}


@router.post("/v1/chat/completions", openapi_extra=CHAT_BODY, tags=["chat"],
             summary="Chat completion (OpenAI and Mistral dialects)")
async def chat_completions(request: Request) -> Response:
    """Both APIs' chat completions. The dialect is picked by the rule in ``server/dialect.py``."""
    body = await read_json(request)
    dialect = dialects.detect(request, body)
    req = await read_request(request, CHAT_WIRE[dialect], body)
    gen, responder = await start_chat(request.app.state.server, req, dialect=dialect)
    return await respond(request, gen, responder, dialect)


async def start_chat(server: ServerState, wire: OpenAIChatCompletionRequest | MistralChatCompletionRequest, *,
                     dialect: Dialect, priority: int = INTERACTIVE) -> tuple[Generation, ChatResponder]:
    """A chat body, validated as ``CHAT_WIRE[dialect]``, as the generation to run (at
    ``priority``) and the responder that answers it: what the route and a batch job's
    line share (``server/endpoints.py``)."""
    req = wire.normalize()
    model, adapter = server.check_model(req.model)
    # Checking, tokenizing and compiling a grammar take CPU time: not on the event loop.
    engine_request, chat = await asyncio.to_thread(prepare, server, req, adapter)
    gen = Generation(server, [engine_request], request_id=new_id(dialect), priority=priority)
    responder = ChatResponder(server, dialect, gen, model=model, stream=req.stream, tools=chat.calls_allowed,
                              top_logprobs=req.top_logprobs if req.logprobs else None,
                              include_usage=req.include_usage, in_thought=chat.open_thinking)
    return gen, responder


def new_id(dialect: Dialect, prefix: str = "chatcmpl-") -> str:
    """OpenAI's ids carry a prefix; Mistral's are bare hex."""
    return (prefix if dialect is Dialect.OPENAI else "") + uuid.uuid4().hex


def prepare(server: ServerState, req: ChatRequest, adapter: str | None = None) -> tuple[EngineRequest, Conversation]:
    """A chat request checked once, top-down: its conversation, its prompt ids, its
    SamplingParams, then the request as the engine takes it (through ``adapter``, a
    loaded adapter's name, or the base: None)."""
    messages = req.messages
    if req.prompt_mode == "reasoning":
        messages = with_system_prompt(messages, reasoning_prompt(server.tokenizer))
    chat = Conversation.parse(messages, tools=req.tools, tool_choice=req.tool_choice,
                              response_format=req.response_format, parallel_tool_calls=req.parallel_tool_calls,
                              reasoning_effort=req.reasoning_effort)
    if chat.images and server.llm.vision is None:
        raise InvalidParameter(chat.images[0][0], f"{server.model_id} has no vision encoder: it does not take images")
    prompt, images = server.tokenizer.encode_chat_with_images(chat, policy=server.image_policy)
    return validate_request(prompt, chat_params(server, req, chat), server.limits, field="messages",
                            adapter=adapter, images=images), chat


def reasoning_prompt(tokenizer) -> str | list[dict]:
    """The model's reasoning system prompt, for Mistral's ``prompt_mode: "reasoning"``."""
    prompt = tokenizer.reasoning_system_prompt()
    if prompt is None:
        raise InvalidParameter("prompt_mode", "this model ships no reasoning system prompt (SYSTEM_PROMPT.txt "
                                              "next to its tokenizer)")
    return prompt


def chat_params(server: ServerState, req: ChatRequest, chat: Conversation) -> SamplingParams:
    """SamplingParams for a chat request: the request's sampling fields, its logprobs, and
    what the conversation's options ask (a grammar, no tool call)."""
    kwargs = dict(req.sampling)
    if req.logprobs:
        kwargs["logprobs"] = req.top_logprobs
    marker = server.tokenizer.special_token_id("[TOOL_CALLS]")
    if chat.tools and chat.tool_choice.mode == "none" and marker is not None:
        # The model sees the tools but may not call one: [TOOL_CALLS] cannot be drawn.
        bias = dict(kwargs.get("logit_bias") or {})
        bias[str(marker)] = -100.0
        kwargs["logit_bias"] = bias
    # Compiled now (in the caller's worker thread), so a bad schema is a 400.
    guided = guidance_for_chat(server.tokenizer, chat)
    if guided is not None:
        kwargs["guided"] = guided
    return sampling_params(kwargs)


# ------------------------------------------------------------------ the response


@dataclass
class _Choice:
    index: int
    answer: AnswerParser  # its thinking, content and tool calls
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False  # role delta sent


class ChatResponder(Responder):
    def __init__(self, server: ServerState, dialect: Dialect, gen: Generation, *, model: str, stream: bool,
                 tools: bool = False, top_logprobs: int | None = None, include_usage: bool = False,
                 object_name: str = "chat.completion", thinking: bool = True, in_thought: bool = False):
        self.server, self.dialect, self.gen, self.model = server, dialect, gen, model
        self.stream, self.tools, self.top_logprobs = stream, tools, top_logprobs
        self.include_usage = include_usage  # OpenAI's stream_options.include_usage
        self.object = object_name
        self.created = int(time.time())
        tok = server.tokenizer
        self.tokenizer = tok
        n = gen.params.n * len(gen.prompts)
        self.choices = [_Choice(i, AnswerParser(tok, tools=tools, thinking=thinking, in_thought=in_thought))
                        for i in range(n)]
        self.thinks = thinking and tok.thinks
        self._unfinished = n
        self.prompt_logprobs: list | None = None  # vLLM's field, at the top level (one prompt)

    # --- pieces

    def _logprobs(self, out: StepOutput, ids: list[int]) -> list[dict]:
        if self.top_logprobs is None or out.logprobs is None:
            return []
        tok, entries = self.tokenizer, []
        for j, t in enumerate(ids):
            top = (out.top_logprobs or [[]] * len(out.token_ids))[j][: self.top_logprobs]
            entries.append({
                "token": tok.token_str(t), "logprob": api_logprob(out.logprobs[j]), "bytes": list(tok.token_bytes(t)),
                "token_id": t,
                "top_logprobs": [{"token": tok.token_str(a), "logprob": api_logprob(lp), "bytes": list(tok.token_bytes(a)),
                                  "token_id": a} for a, lp in top],
            })
        return entries

    def _finish_reason(self, c: _Choice, engine_reason: str) -> str:
        if engine_reason == "length":  # also when it cut a tool call
            k = c.index // self.gen.params.n
            if self.dialect is Dialect.MISTRAL and len(self.gen.prompts[k]) + len(c.token_ids) >= self.server.max_model_len:
                return "model_length"
            return "length"
        if c.answer.calls is not None and c.answer.calls.calls:
            return "tool_calls"
        return "stop"  # "abort" too: nobody reads it

    def _usage(self) -> dict:
        """The usage; in OpenAI's dialect, with a reasoning model, the thinking tokens among
        the completion tokens (as OpenAI's reasoning models and vLLM count them)."""
        usage = self.gen.usage()
        if self.thinks and self.dialect is Dialect.OPENAI:
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(c.answer.reasoning_tokens
                                                                          for c in self.choices)}
        return usage

    def _text_delta(self, thinking: str, content: str) -> dict:
        """A delta's thinking and content, in the dialect's shape (see the module's doc)."""
        if self.dialect is Dialect.OPENAI:
            return {**({"reasoning_content": thinking} if thinking else {}), **({"content": content} if content else {})}
        if not thinking:
            return {"content": content} if content else {}
        parts = [_thinking_chunk(thinking)] + ([{"type": "text", "text": content}] if content else [])
        return {"content": parts}

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.gen.id, "object": f"{self.object}.chunk", "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None or self.include_usage:
            out["usage"] = usage  # with include_usage: null on every chunk but the last, as OpenAI's
        return out

    @staticmethod
    def _tool_delta(events: list[ToolEvent]) -> list[dict]:
        """Each finished call, whole: one entry per call (see the module's docstring)."""
        return [{"index": e.index, "id": e.id, "type": "function", "function": {"name": e.name, "arguments": e.arguments}}
                for e in events if e.kind == "end"]

    # --- Responder

    def add(self, i: int, out: StepOutput) -> list[dict]:
        c = self.choices[i]
        c.token_ids += out.token_ids
        ids = out.answer_token_ids
        logprobs = self._logprobs(out, ids)
        c.logprobs += logprobs
        part = c.answer.push(ids, out.text)
        tool_deltas = self._tool_delta(part.tool_events)
        chunks = []
        first = None
        if out.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = prompt_logprobs(self.tokenizer, self.gen.prompts[0], out.prompt_logprobs)
            first = self.prompt_logprobs
        if self.stream:
            if not c.started:
                c.started = True
                chunks.append(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None, "logprobs": None}]))
                if first is not None:
                    chunks[-1]["prompt_logprobs"] = first
            delta = self._text_delta(part.thinking, part.content)
            if tool_deltas:
                delta["tool_calls"] = tool_deltas
            if delta or logprobs:
                chunks.append(self._chunk([{"index": i, "delta": delta, "finish_reason": None,
                                            "logprobs": {"content": logprobs} if logprobs else None}]))
        if out.finish_reason is not None:
            chunks += self._finish(c, out.finish_reason)
        return chunks if self.stream else []

    def _finish(self, c: _Choice, engine_reason: str) -> list[dict]:
        part = c.answer.finish(engine_reason)
        delta = self._text_delta("", part.content)
        tool_deltas = self._tool_delta(part.tool_events)
        if tool_deltas:
            delta["tool_calls"] = tool_deltas
        c.finish_reason = self._finish_reason(c, engine_reason)
        self._unfinished -= 1
        if not self.stream:
            return []
        # Without include_usage (OpenAI's extra chunk, in end()), the last chunk carries it.
        usage = self._usage() if self._unfinished == 0 and not self.include_usage else None
        return [self._chunk([{"index": c.index, "delta": delta, "finish_reason": c.finish_reason, "logprobs": None}], usage)]

    def end(self) -> list[dict]:
        if self.include_usage:
            return [self._chunk([], self._usage())]
        return []

    def body(self) -> dict:
        choices = []
        for c in self.choices:
            a = c.answer
            calls = None
            if a.calls is not None:
                calls = [k.as_api() for k in a.calls.calls] or None
            content = a.content if (a.content or not calls) else None
            message: dict = {"role": "assistant", "content": content}
            if a.thought and self.dialect is Dialect.OPENAI:
                message["reasoning_content"] = a.thinking
            elif a.thought:
                message["content"] = [_thinking_chunk(a.thinking)] + (
                    [{"type": "text", "text": content}] if content else [])
            if self.dialect is Dialect.MISTRAL:
                message.update(tool_calls=calls, prefix=False)
            elif calls:
                message["tool_calls"] = calls
            choices.append({"index": c.index, "message": message, "finish_reason": c.finish_reason,
                            "logprobs": {"content": c.logprobs} if self.top_logprobs is not None else None})
        out = {"id": self.gen.id, "object": self.object, "created": self.created, "model": self.model,
               "choices": choices, "usage": self._usage()}
        if self.gen.params.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs
        return out


def _thinking_chunk(text: str) -> dict:
    """Mistral's thinking content chunk (the ``mistralai`` SDK's ``ThinkChunk``)."""
    return {"type": "thinking", "thinking": [{"type": "text", "text": text}]}
