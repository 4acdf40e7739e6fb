"""Grammar-constrained ("guided") decoding with llguidance.

A request asks for a constraint with a ``Guidance`` (``SamplingParams.guided``):
a JSON schema, "any JSON object", a Lark grammar or a regex. The engine compiles it
for its tokenizer when the request is added (errors are raised there, never
mid-generation), keeps one ``GuidedMatcher`` per sequence, and each step masks the
logits of the guided rows to the tokens the grammar allows. When the grammar is
complete (nothing but EOS can follow) the sequence ends with finish reason "stop".

``guidance_for_chat`` turns a checked ``Conversation``'s options (``response_format``,
``tool_choice``, ``tools``: see ``galerne.conversation``) into a Guidance. Forced tool
calls use the model's own format, from mistral-common:

* tokenizer v2..v7: ``[TOOL_CALLS]`` then a JSON list
  ``[{"name": ..., "arguments": {...}}, ...]``;
* v11 and later (tekken): ``[TOOL_CALLS]name[ARGS]{...}``, once per call, the
  grammar of mistral-common's ``GrammarFactory``.

``[TOOL_CALLS]`` (and ``[ARGS]``) are special tokens: they are in the token ids,
but ``Tokenizer.decode`` (and so the streamed text) leaves them out. Parse the ids
(``galerne.tokenizer.toolcalls``).

JSON is forced compact, as Mistral's models write it (``json.dumps``'s separators,
``{"a": 1, "b": [2, 3]}``, no other whitespace): a model that cannot choose
whitespace cannot spend its token budget on it. A schema's own "x-guidance"
options replace this.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance as llg
import numpy as np
import torch

from ..cache import ByteLRU, byte_cached, text_bytes
from ..conversation import (
    JSON_OBJECT_SCHEMA,
    Conversation,
    check_text,
    parse_json_schema,
)
from ..errors import InvalidParameter, TokenizerError

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "lark", "regex")
# Before the JSON, one space at most: a SentencePiece model writes "▁{" / "▁[" (the
# encoder's dummy prefix), a tekken one "{"; nothing else is free to waste tokens on.
_LEAD = '" "?'
# Mistral tool-call ids (v3..v7 calls may carry one after the arguments).
_CALL_ID_SCHEMA = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
_NO_ARGS_SCHEMA = {"type": "object", "properties": {}, "additionalProperties": False}
# llguidance's JSON layout options: json.dumps's separators and no other whitespace
# (its own default allows any whitespace anywhere, unbounded).
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Compiled grammars are cached per tokenizer by the bytes they take, not their number:
# grammars (text) up to 32 MB, matchers up to 64 MB (llguidance's compiled form, about
# 25 bytes per grammar character, measured), schema checks up to 16 MB; an entry over a
# quarter of its cache is not kept (its request holds its own, see Guidance).
GRAMMAR_CACHE_BYTES = 32 << 20
MATCHER_CACHE_BYTES = 64 << 20
SCHEMA_CACHE_BYTES = 16 << 20
_MATCHER_BYTES_PER_CHAR = 32
# An error message quotes at most this much of llguidance's (which may quote a whole grammar).
_MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Guidance:
    """A constraint on the generated text.

    ``kind``: "json_schema" (``spec`` is the schema as JSON text), "json_object"
    (any JSON object; ``spec`` is ignored and may be empty), "lark" (``spec`` is a
    Lark grammar in llguidance's dialect; special tokens are written ``<[id]>``) or
    "regex" (``spec`` is the regex the whole output matches).
    ``field`` names the request field that errors are reported against.
    """

    kind: str
    spec: str = ""
    field: str = "guided"

    def __post_init__(self) -> None:
        if not isinstance(self.field, str) or not self.field:
            raise InvalidParameter("guided", f"field must be a non-empty string, got {self.field!r}")
        if self.kind not in KINDS:
            raise InvalidParameter(self.field, f"unknown guidance kind {self.kind!r} (one of {', '.join(KINDS)})")
        if not isinstance(self.spec, str):
            raise InvalidParameter(self.field, f"the {self.kind} must be given as a string, got {type(self.spec).__name__}")
        check_text(self.spec, self.field)  # llguidance cannot take a lone surrogate
        if self.kind == "json_schema":
            parse_json_schema(self.spec, self.field)
        elif self.kind in ("lark", "regex") and not self.spec:
            raise InvalidParameter(self.field, f"the {self.kind} is empty")

    @classmethod
    def json_schema(cls, schema: dict | str, field: str = "guided") -> Guidance:
        text = schema if isinstance(schema, str) else _dumps(schema)
        return cls("json_schema", text, field)

    @property
    def schema(self) -> dict | None:
        """The JSON schema of a json_schema / json_object guidance, else None."""
        if self.kind == "json_object":
            return JSON_OBJECT_SCHEMA
        if self.kind == "json_schema":
            return json.loads(self.spec)
        return None


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------- matcher


class GuidedMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llg.LLMatcher, grammar_vocab: int):
        self._m = matcher
        self._n = grammar_vocab  # tokens the grammar knows; ids beyond are never allowed

    def copy(self) -> GuidedMatcher:
        return GuidedMatcher(self._m.deep_copy(), self._n)

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: the tokens the grammar allows next."""
        return allowed_masks([self], vocab_size)[0]

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the packed mask (int32, 32 tokens a word, CPU, contiguous) into ``row``."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def advance(self, token_id: int) -> None:
        """Consume a sampled token. A token the grammar forbids puts the matcher in
        an error state (``error``), which also counts as finished."""
        self._m.consume_token(int(token_id))

    @property
    def is_finished(self) -> bool:
        """Nothing but EOS can follow (or the matcher failed): the sequence is done."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        return (self._m.get_error() or "error") if self._m.is_error() else None


def allowed_masks(matchers: Sequence[GuidedMatcher], vocab_size: int,
                  executor: llg.LLExecutor | None = None) -> torch.Tensor:
    """(len(matchers), vocab_size) bool masks; with an ``executor`` (a thread pool,
    ``GuidedCompiler.executor``) several rows are computed in parallel."""
    n = max(m._n for m in matchers)
    words = (n + 31) // 32
    bits = torch.zeros(len(matchers), words, dtype=torch.int32)
    if executor is None or len(matchers) == 1:
        for i, m in enumerate(matchers):
            m.fill_bitmask(bits[i])
    else:
        executor.unsafe_compute_mask_ptr([(m._m, i) for i, m in enumerate(matchers)],
                                         bits.data_ptr(), words * 4, len(matchers))
    # Bit j of word w is token 32 w + j: little-endian words, little-endian bits.
    allowed = torch.from_numpy(np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little").view(np.bool_))
    k = min(vocab_size, n)
    if vocab_size == words * 32:
        out = allowed
        out[:, n:] = False  # the last word's unused bits
    else:
        out = torch.zeros(len(matchers), vocab_size, dtype=torch.bool)
        out[:, :k] = allowed[:, :k]
    for i, m in enumerate(matchers):
        if m._n < k:  # a smaller grammar vocabulary in a mixed batch (another tokenizer)
            out[i, m._n :] = False
    return out


# --------------------------------------------------------------------------- compiler


# mistral-common's think template's JSON rule when it allows no thought first (< v15).
_JSON_RULE = "json_grammar: SAFE_WS? %json"


class GuidedCompiler:
    """Compiles Guidance for one tokenizer. Get it with ``compiler_for(tokenizer)``."""

    def __init__(self, tokenizer):
        # Not the Tokenizer itself: compiler_for's weak cache must let it go.
        self.kind = tokenizer.kind
        self.path = tokenizer.path
        self.eos_ids = sorted(tokenizer.stop_token_ids())
        self.mistral_version = tokenizer.mistral_version
        self.tool_call_format = tokenizer.tool_call_format
        self.special_ids = {name: tokenizer.special_token_id(name) for name in ("[TOOL_CALLS]", "[ARGS]")}
        self.thinks = tokenizer.thinks
        self._mt = tokenizer.mistral_tokenizer
        self._hf = tokenizer.hf_tokenizer
        self._lock = threading.Lock()
        self._llg: llg.LLTokenizer | None = None
        self._factory = None
        # Keyed by (kind, spec), never by a Guidance: that object carries its compiled
        # matcher (see matcher()), which a key would keep alive past the cache's bound.
        self._grammars: ByteLRU[tuple[str, str], str] = ByteLRU(GRAMMAR_CACHE_BYTES)
        self._protos: ByteLRU[tuple[str, str], llg.LLMatcher] = ByteLRU(MATCHER_CACHE_BYTES)
        self._executor: llg.LLExecutor | None = None

    @property
    def executor(self) -> llg.LLExecutor:
        """A thread pool that computes several rows' masks at once (see allowed_masks)."""
        with self._lock:
            if self._executor is None:
                self._executor = llg.LLExecutor()
            return self._executor

    # ---- the tokenizer, as llguidance sees it

    @property
    def factory(self):
        """mistral-common's GrammarFactory where it supports the tokenizer (tekken >= v11), else None."""
        self.llg_tokenizer  # noqa: B018 - builds both
        return self._factory

    @property
    def llg_tokenizer(self) -> llg.LLTokenizer:
        with self._lock:
            if self._llg is None:
                try:
                    self._llg, self._factory = self._build()
                except Exception as e:  # llguidance / mistral-common raise all kinds
                    raise TokenizerError(f"{self.path}: guided decoding cannot use this tokenizer: "
                                         f"{type(e).__name__}: {e}") from e
            return self._llg

    def _build(self):
        if self._hf is not None:
            return llg.LLTokenizer(self._hf.to_str(), eos_token=self.eos_ids), None
        factory = _grammar_factory(self._mt)
        if factory is not None:
            return factory.llg_tokenizer, factory
        inner = self._mt.instruct_tokenizer.tokenizer
        from mistral_common.tokens.tokenizers.tekken import is_tekkenizer

        if is_tekkenizer(inner):
            from mistral_common.guidance.tokenizer import from_mistral_tokenizer

            return from_mistral_tokenizer(self._mt), None
        return llg.LLTokenizer(llg.TokenizerWrapper(_SentencePieceForLLG(inner))), None

    # ---- grammars

    def compile(self, guidance: Guidance, field: str | None = None) -> str:
        """The llguidance grammar of ``guidance``, validated for this tokenizer.
        Raises InvalidParameter naming ``field`` (default: ``guidance.field``)."""
        field = field or guidance.field
        grammar = self._grammars.get((guidance.kind, guidance.spec))
        if grammar is not None:
            return grammar
        grammar = self._grammar(guidance, field)
        try:
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.llg_tokenizer)
        except Exception as e:  # API-level failure: still the request's grammar
            raise InvalidParameter(field, f"cannot compile the {_what(guidance)}: {_short(e)}") from None
        if is_error:
            raise InvalidParameter(field, f"cannot compile the {_what(guidance)}: {_short(messages[0] if messages else 'invalid')}")
        for m in messages:
            log.debug("grammar warning (%s): %s", field, _short(m))
        self._grammars.put((guidance.kind, guidance.spec), grammar, text_bytes(guidance.spec, grammar))
        return grammar

    def _grammar(self, g: Guidance, field: str) -> str:
        if g.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(g.spec)
        if g.kind == "lark":
            return llg.LLMatcher.grammar_from_lark(g.spec)
        schema = g.schema
        try:
            if self.factory is not None:
                lark = self.factory.get_lark_for_json_schema(self.factory.select_jinja_template(),
                                                             compact_json(schema))
                if self.thinks:
                    # mistral-common lets a thought precede JSON from v15 on only; a v13
                    # reasoning model (Magistral) forced straight into JSON loses its
                    # thinking, so here the thought is optional before JSON too.
                    lark = lark.replace(_JSON_RULE, "json_grammar: think? SAFE_WS? %json", 1)
            else:
                lark = json_lark(schema)
        except Exception as e:
            raise InvalidParameter(field, f"cannot compile the JSON schema: {e}") from None
        return llg.LLMatcher.grammar_from_lark(lark)

    def matcher(self, guidance: Guidance, field: str | None = None) -> GuidedMatcher:
        """A fresh matcher at the start of ``guidance``'s grammar.

        The first call for a Guidance compiles it (a few ms, up to seconds for a big
        schema) and keeps the compiled form on that Guidance object, whatever the cache
        keeps: the server compiles in its worker thread (``guidance_for_chat``), and the
        engine, which asks again when the request is added, only copies it."""
        compiler, proto = guidance.__dict__.get("_compiled", (None, None))
        if compiler is not self:
            proto = self._protos.get((guidance.kind, guidance.spec))
        if proto is None:
            grammar = self.compile(guidance, field)
            proto = llg.LLMatcher(self.llg_tokenizer, grammar, log_level=0)
            _check_start(proto, guidance, field or guidance.field, self.llg_tokenizer.vocab_size)
            self._protos.put((guidance.kind, guidance.spec), proto,
                             text_bytes(guidance.spec) + _MATCHER_BYTES_PER_CHAR * len(grammar) + (64 << 10))
        # Not a field: a Guidance compares and hashes by its kind, spec and field alone.
        guidance.__dict__["_compiled"] = (self, proto)
        return GuidedMatcher(proto.deep_copy(), self.llg_tokenizer.vocab_size)


def _check_start(proto: llg.LLMatcher, guidance: Guidance, field: str, vocab_size: int) -> None:
    """Compute the first mask now: a grammar that fails there (too complex for the
    parser, or nothing allowed) is a 400, not a failure in the middle of an answer."""
    error = proto.get_error() if proto.is_error() else None
    if error is None:
        probe = GuidedMatcher(proto.deep_copy(), vocab_size)
        allowed = probe.allowed_mask(vocab_size)
        if probe.error is None and (allowed.any() or probe.is_accepting):
            return
        error = probe.error
        if error is None or error.startswith("NoExtension"):  # llguidance: nothing can follow
            error = "no text can match it"
    raise InvalidParameter(field, f"cannot compile the {_what(guidance)}: {_short(error)}")


def _short(error: Any) -> str:
    """llguidance's message, without the grammar it may quote after its first line."""
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    first = next((line for line in lines if line.startswith("Error:") and line != "Error: None"),
                 lines[0] if lines else "invalid")
    return first if len(first) <= _MAX_ERROR_CHARS else first[:_MAX_ERROR_CHARS] + "..."


def _what(g: Guidance) -> str:
    return {"json_schema": "JSON schema", "json_object": "JSON grammar", "lark": "grammar", "regex": "regex"}[g.kind]


def json_lark(schema: dict) -> str:
    """A Lark grammar for one JSON value matching ``schema``, after a little whitespace."""
    return f"start: {_LEAD} %json {_json(schema)}\n"


def compact_json(schema: dict) -> dict:
    """``schema`` with llguidance's options for compact JSON (COMPACT_JSON), unless it
    sets its own "x-guidance" options."""
    if "x-guidance" in schema:
        return schema
    return {**schema, "x-guidance": COMPACT_JSON}


def _json(schema: dict) -> str:
    """A schema as the argument of a Lark ``%json``."""
    return _dumps(compact_json(schema))


def _grammar_factory(mt):
    """mistral-common's GrammarFactory for ``mt`` when it supports it, else None."""
    try:
        from mistral_common.guidance.grammar_factory import GrammarFactory
    except ImportError:  # older mistral-common
        return None
    if not GrammarFactory.is_supported(mt):
        return None
    _uncache_grammar_factory()
    return GrammarFactory(mt)


def _uncache_grammar_factory() -> None:
    """mistral-common caches each grammar it renders in an lru_cache of 128 entries keyed
    by the JSON schema's text: megabytes each, never freed. The compiler keeps what it
    compiles (by bytes); the factory renders without a cache of its own."""
    from mistral_common.guidance import grammar_factory

    render = getattr(grammar_factory, "_cached_get_lark_from_jinja", None)
    if render is not None and hasattr(render, "cache_clear") and hasattr(render, "__wrapped__"):
        render.cache_clear()
        grammar_factory._cached_get_lark_from_jinja = render.__wrapped__


class _SentencePieceForLLG:
    """A mistral-common SentencePiece tokenizer as llguidance's TokenizerWrapper wants it:
    every token's bytes, control tokens as "<NAME>" special tokens."""

    def __init__(self, tok):
        sp = tok._model
        self._tok = tok
        self.bos_token_id = tok.bos_id
        self.eos_token_id = tok.eos_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(tok.n_words):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                m = re.fullmatch(r"\[(.*)\]", piece)
                self.tokens.append((f"<{m.group(1)}>" if m else piece).encode())
                self.special_token_ids.append(i)
            elif sp.is_byte(i):
                self.tokens.append(bytes([int(piece[3:5], 16)]))  # "<0x0A>"
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())

    def __call__(self, text: str) -> list[int]:
        # No dummy-prefix space: mistral-common's own trick for infilling.
        return self._tok.encode("\u263a" + text, bos=False, eos=False)[2:]


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer) -> GuidedCompiler:
    """The GuidedCompiler of ``tokenizer`` (one per Tokenizer object, made on first use)."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = GuidedCompiler(tokenizer)
        return compiler


# --------------------------------------------------------------------------- chat options


def guidance_for_chat(tokenizer, chat: Conversation) -> Guidance | None:
    """The Guidance for a conversation's options, or None when the answer is free.

    * ``tool_choice`` required (OpenAI's "required", Mistral's "any") or a named function:
      the output is one or more tool calls (only that function for a named choice; exactly
      one when ``parallel_tool_calls`` is false), in the model's native format, arguments
      matching each tool's ``parameters`` schema. ``response_format`` is then moot.
    * ``response_format`` json_schema: JSON matching the schema (whatever ``strict``
      says); json_object: any JSON object. With tools and tool_choice "auto", a Mistral
      tokenizer may instead produce tool calls (the JSON or the calls, nothing else).
    * free text, with tool_choice "auto" or "none": None.

    Compiles the grammar for ``tokenizer`` now, so that errors (InvalidParameter naming
    "tools", "tool_choice" or "response_format") come at request time.
    """
    compiler = compiler_for(tokenizer)
    forced = chat.forced_tools
    schema = chat.response_schema
    if forced is not None:
        lark = _tool_calls_lark(compiler, chat.tools, forced, chat.parallel_tool_calls, field="tool_choice")
        guidance = Guidance("lark", lark, "tool_choice")
    elif schema is None:
        return None
    elif chat.calls_allowed and compiler.tool_call_format is not None:
        lark = _tool_calls_lark(compiler, chat.tools, chat.tools, chat.parallel_tool_calls, field="tools",
                                json_schema=schema)
        guidance = Guidance("lark", lark, "response_format")
    else:
        guidance = Guidance.json_schema(schema, "response_format")
    compiler.matcher(guidance)  # compiled and cached: adding the request only copies it
    return guidance


def _tool_args_schema(tool: dict, i: int) -> dict:
    """The arguments' schema of ``tools[i]`` (checked by the conversation), compilable."""
    params = tool["function"].get("parameters")
    if not params:
        return _NO_ARGS_SCHEMA
    field = f"tools[{i}].function.parameters"
    problem = _compile_problem(_dumps(params))
    if problem is not None:
        raise InvalidParameter(field, f"cannot compile the JSON schema: {problem}")
    return params


@byte_cached(SCHEMA_CACHE_BYTES)
def _compile_problem(schema_text: str) -> str | None:
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(llg.LLMatcher.grammar_from_json_schema(schema_text))
    return _short(messages[0] if messages else "invalid") if is_error else None


def _tool_calls_lark(compiler: GuidedCompiler, all_tools: list[dict], tools: list[dict], parallel: bool, *,
                     field: str, json_schema: dict | None = None) -> str:
    """Lark grammar of the model's native calls of ``tools`` (some of ``all_tools``, which
    errors index), or, with ``json_schema``, of either a JSON answer or such calls."""
    fmt = compiler.tool_call_format
    if fmt is None:
        what = "a Mistral tokenizer (tekken.json / tokenizer.model.vN)" if compiler.mistral_version is None \
            else "a tokenizer with tool calls (v2 or later)"
        raise InvalidParameter(field, f"forcing tool calls needs {what}: the tool-call format of this model is unknown")
    args = [_tool_args_schema(t, all_tools.index(t)) for t in tools]
    factory = compiler.factory
    if factory is not None:
        return _factory_lark(factory, tools, args, parallel, json_schema, field)
    tc = f"<[{compiler.special_ids['[TOOL_CALLS]']}]>"
    if fmt == "list":
        one = len(tools) == 1
        items = [
            {
                "type": "object",
                "properties": {"name": {"const": t["function"]["name"]},
                               "arguments": embedded(a, "/items" + ("" if one else f"/anyOf/{j}") + "/properties/arguments"),
                               "id": _CALL_ID_SCHEMA},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for j, (t, a) in enumerate(zip(tools, args))
        ]
        calls = {"type": "array", "items": items[0] if one else {"anyOf": items}, "minItems": 1}
        if not parallel:
            calls["maxItems"] = 1
        fcalls = f"{tc} {_LEAD} %json {_json(calls)}"
    else:  # [TOOL_CALLS]name[ARGS]{...} per call, as mistral-common's grammar
        args_tok = compiler.special_ids["[ARGS]"]
        if args_tok is None:
            raise InvalidParameter(field, "the tokenizer has no [ARGS] token for its tool-call format")
        one = " | ".join(
            f"({tc} {_dumps(t['function']['name'])} <[{args_tok}]> {_LEAD} %json {_json(a)})"
            for t, a in zip(tools, args)
        )
        fcalls = f"({one})+" if parallel else f"({one})"
    start = "fcalls" if json_schema is None else f"fcalls | {_LEAD} %json {_json(json_schema)}"
    return f"start: {start}\nfcalls: {fcalls}\n"


def embedded(schema: Any, where: str) -> Any:
    """``schema`` to be placed at JSON pointer ``where`` inside another schema: its local
    references ("#", "#/$defs/X": pydantic's models, recursive schemas) now point
    where it lies, so that they resolve from the outer schema's root."""
    if isinstance(schema, dict):
        out = {k: embedded(v, where) for k, v in schema.items()}
        ref = schema.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            out["$ref"] = "#" + where + ref[1:]
        return out
    if isinstance(schema, list):
        return [embedded(v, where) for v in schema]
    return schema


def _factory_lark(factory, tools, args, parallel, json_schema, field) -> str:
    from mistral_common.protocol.instruct.request import (
        ChatCompletionRequest,
        ResponseFormat,
    )
    from mistral_common.protocol.instruct.tool_calls import (
        Function,
        Tool,
        ToolChoiceEnum,
    )

    # Every tool strict: the grammar enforces each tool's parameters schema.
    mtools = [
        Tool(function=Function(name=t["function"]["name"], description=t["function"].get("description") or "",
                               parameters=compact_json(a), strict=True))
        for t, a in zip(tools, args)
    ]
    if json_schema is None:
        request = ChatCompletionRequest(messages=[{"role": "user", "content": "-"}], tools=mtools,
                                        tool_choice=ToolChoiceEnum.required, parallel_tool_calls=parallel)
    else:
        fmt = ResponseFormat(type="json_schema",
                             json_schema={"name": "response", "schema": compact_json(json_schema), "strict": True})
        request = ChatCompletionRequest(messages=[{"role": "user", "content": "-"}], tools=mtools,
                                        tool_choice=ToolChoiceEnum.auto, parallel_tool_calls=parallel,
                                        response_format=fmt)
    try:
        lark = factory.get_grammar_for_chat_request(request, factory.select_jinja_template())
    except Exception as e:  # InvalidRequestException, ValueError
        raise InvalidParameter(field, str(e)) from None
    assert lark is not None
    return lark
