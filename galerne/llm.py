"""``LLM``: the offline Python front end.

    llm = LLM("path/to/model")
    llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .config import EngineSettings
from .engine.adapters import AdapterInfo
from .engine.engine import Engine, PromptLogprob, StepOutput
from .engine.request import EngineRequest, Limits, validate_request
from .engine.sequence import Sequence as EngineSequence
from .errors import InvalidParameter, ModelLoadError
from .images import ImageInput, ImagePolicy, check_image_format
from .models.attention import NoCacheAttention
from .models.transformer import Transformer
from .models.vision import VisionModel
from .quant.plan import quantize_model_
from .sampling.params import SamplingParams
from .tokenizer import Tokenizer
from .weights.adapters import merge_adapter
from .weights.loader import load_model, load_vision, resolve_device, resolve_dtype, resolve_model_path

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]  # generated tokens only (a final EOS / stop token included)
    finish_reason: str | None  # "stop" | "length"
    # With "stop": the token id (EOS, a stop_token_ids entry) or stop string that ended it;
    # None when a grammar completed.
    stop_reason: int | str | None = None
    logprobs: list[float] | None = None  # per token, when SamplingParams.logprobs is set
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    # With SamplingParams.prompt_logprobs: one per prompt token (None for the first).
    prompt_logprobs: list[PromptLogprob | None] | None = None

    # The first (usually only) completion, for the common case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def stop_reason(self) -> int | str | None:
        return self.outputs[0].stop_reason


class LLM:
    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        tokenizer: str | Path | None = None,
        max_model_len: int | None = None,
        layout: str | None = None,
        revision: str | None = None,
        adapter: str | Path | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        progress: bool | None = None,
        quantization: str | None = None,
        **engine: object,
    ):
        """``adapter``: a LoRA adapter trained on this base (PEFT's folder, or Mistral's
        ``lora.safetensors``), folded into the weights at load: the fastest way to serve
        one. ``adapters``: name -> such an adapter, each served unmerged, per request
        (``generate(..., adapter=NAME)``), many in one batch; more with ``load_adapter``.
        ``engine`` takes the fields of ``EngineSettings`` (block_size, kv_cache_gb,
        max_num_seqs, max_num_batched_tokens, enable_prefix_caching, max_loras,
        max_lora_rank, ...). ``quantization``: a block scheme (q8_0, q4_0, q4_k) the
        weights are quantized to as they load (``galerne.quant``)."""
        self.engine_settings = _engine_settings(engine)
        path = resolve_model_path(model, revision)
        # A merged adapter goes into float weights: then quantize (the float model is in memory once).
        transformer, self.checkpoint = load_model(path, dtype=dtype, device=device, layout=layout, progress=progress,
                                                  quantization=None if adapter is not None else quantization)
        self.adapter = Path(adapter) if adapter is not None else None
        vision = load_vision(self.checkpoint, dtype=resolve_dtype(dtype, resolve_device(device)),
                             device=next(transformer.parameters()).device)
        if self.adapter is not None:
            kind, rank, targets = merge_adapter(transformer, self.adapter, vision)
            log.info("merged %s adapter %s (rank %d, %s)", kind, self.adapter, rank, ", ".join(targets))
            if quantization is not None:
                quantize_model_(transformer, quantization)
        self._setup(transformer, Tokenizer.from_path(tokenizer or path), max_model_len, vision)
        log.info("loaded %s (%s layout, %.1fM parameters, %s on %s)", path, self.checkpoint.layout,
                 transformer.args.n_params / 1e6, next(transformer.parameters()).dtype, self.device)
        for name, adapter_path in (adapters or {}).items():
            self.load_adapter(name, adapter_path)

    @classmethod
    def from_model(cls, model: Transformer, tokenizer: Tokenizer, max_model_len: int | None = None, *,
                   vision: VisionModel | None = None, **engine: object) -> "LLM":
        """Wrap a model already in memory (built by hand, or transformed); ``vision``: its
        encoder and projector, for a vision-language model."""
        self = cls.__new__(cls)
        self.checkpoint = None
        self.adapter = None
        self.engine_settings = _engine_settings(engine)
        self._setup(model, tokenizer, max_model_len, vision)
        return self

    def _setup(self, model: Transformer, tokenizer: Tokenizer, max_model_len: int | None,
               vision: VisionModel | None = None) -> None:
        self.model, self.tokenizer, self.vision = model, tokenizer, vision
        if vision is not None:
            check_image_format(tokenizer, vision.args)
        args = model.args
        if tokenizer.vocab_size > args.vocab_size:
            raise ModelLoadError(
                f"tokenizer {tokenizer.path.name} has {tokenizer.vocab_size} tokens but the model's "
                f"vocabulary has {args.vocab_size}",
                path=str(tokenizer.path),
            )
        if max_model_len is not None and not 0 < max_model_len <= args.max_seq_len:
            raise InvalidParameter("max_model_len", f"must be in 1..{args.max_seq_len} (the model's context), got {max_model_len}")
        # What every request is checked against (validate_request), here and in the server.
        self.limits = Limits(vocab_size=tokenizer.vocab_size, max_model_len=max_model_len or args.max_seq_len)
        self.device = next(model.parameters()).device
        self._engine: Engine | None = None

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    @property
    def engine(self) -> Engine:
        """The paged engine, made on first use (it sizes and allocates the KV cache)."""
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, self.engine_settings, limits=self.limits,
                                  vision=self.vision)
        return self._engine

    # ------------------------------------------------------------- generation

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt (with BOS); a list of ids as it is (checked by ``validate``)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=True)
        return list(prompt)

    def validate(self, prompt: Prompt, params: SamplingParams, adapter: str | None = None) -> EngineRequest:
        """The request ``Engine.add_request`` takes, checked against this model's limits
        (and ``adapter``, the name of a loaded adapter or None, against those loaded)."""
        if adapter is not None:
            self.engine.adapters.resolve(adapter)
        return validate_request(self.encode(prompt), params, self.limits, adapter=adapter)

    # --------------------------------------------------------------- adapters

    def load_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Serve the LoRA adapter at ``path`` (PEFT folder, or Mistral ``lora.safetensors``)
        unmerged as ``name``. A bad one is refused (ModelLoadError, InvalidParameter) and
        changes nothing."""
        return self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        """Stop serving ``name``: new requests naming it are refused at once, those in
        flight (a ``stream`` not consumed yet) finish through it first."""
        self.engine.unload_adapter(name)

    def adapters(self) -> list[AdapterInfo]:
        """The adapters served unmerged, in load order."""
        return self.engine.list_adapters() if self._engine is not None else []

    # ------------------------------------------------------------- generation

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *,
               adapter: str | None = None) -> Iterator[StepOutput]:
        """Stream one completion: text deltas as they become final."""
        params = params or SamplingParams()
        if params.n != 1:
            raise InvalidParameter("n", "stream() yields one completion; use generate() for n > 1")
        request = self.validate(prompt, params, adapter)
        engine = self.engine
        rid = engine.add_request(request)
        try:
            while True:
                for out in engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finish_reason is not None:
                            return
        finally:
            engine.abort(rid)  # a consumer that stops early frees the request's blocks

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        adapter: str | None | Sequence[str | None] = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt (text, or a list of token ids) in one continuous
        batch. One params for all, or one per prompt; one adapter (a loaded adapter's
        name, None: the base model) for all, or one per prompt. Outputs come back in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidParameter("params", f"{len(params)} SamplingParams for {len(prompts)} prompts")
        names = [adapter] * len(prompts) if adapter is None or isinstance(adapter, str) else list(adapter)
        if len(names) != len(prompts):
            raise InvalidParameter("adapter", f"{len(names)} adapters for {len(prompts)} prompts")
        return self._run([(p, self.validate(p, sp, a)) for p, sp, a in zip(prompts, params, names)], use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        params: SamplingParams | None = None,
        tools: list[dict] | None = None,
        *,
        adapter: str | None = None,
    ) -> list[RequestOutput]:
        """Chat completion with the model's own template (mistral-common for Mistral
        tokenizers). One conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        sp = params or SamplingParams()
        return self._run([(None, self.validate_chat(c, sp, tools, adapter)) for c in conversations], None)

    def validate_chat(self, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
                      adapter: str | None = None, *, images: ImagePolicy | None = None) -> EngineRequest:
        """A conversation (its images too, read under ``images``: by default data URIs
        only) as the request ``Engine.add_request`` takes, checked."""
        if adapter is not None:
            self.engine.adapters.resolve(adapter)
        ids, found = self.tokenizer.encode_chat_with_images(list(messages), tools, images)
        return validate_request(ids, params, self.limits, field="messages", adapter=adapter, images=found)

    def _run(self, items: list[tuple[Prompt | None, EngineRequest]], use_tqdm: bool | None) -> list[RequestOutput]:
        # Every request was validated (the callers' list comprehensions) before any runs.
        engine = self.engine
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        try:
            for prompt, request in items:
                rid = engine.add_request(request)  # the KV-capacity check, which only the engine knows
                order.append(rid)
                results[rid] = RequestOutput(
                    prompt=prompt if isinstance(prompt, str) else None, prompt_token_ids=list(request.prompt),
                    outputs=[CompletionOutput(i, "", [], None) for i in range(request.params.n)],
                )
            bar = tqdm(total=len(order), desc="generating", unit="req", disable=(not use_tqdm) if use_tqdm is not None else None, leave=False)
            pending = {rid: len(results[rid].outputs) for rid in order}  # completions still running
            while pending:
                for out in engine.step():
                    r = results[out.request_id]
                    if out.prompt_logprobs is not None and r.prompt_logprobs is None:
                        r.prompt_logprobs = out.prompt_logprobs
                    c = r.outputs[out.index]
                    c.text += out.text
                    c.token_ids.extend(out.token_ids)
                    if out.logprobs is not None:
                        c.logprobs = (c.logprobs or []) + out.logprobs
                        c.top_logprobs = (c.top_logprobs or []) + (out.top_logprobs or [])
                    if out.finish_reason is not None:
                        c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
                        pending[out.request_id] -= 1
                        if pending[out.request_id] == 0:
                            del pending[out.request_id]
                            bar.update(1)
            bar.close()
        finally:
            for rid in order:
                engine.abort(rid)  # no-op for finished requests; frees the rest on error
        return [results[rid] for rid in order]

    # ---------------------------------------------------------------- scoring

    def score(self, token_ids: Sequence[int], *, adapter: str | None = None,
              images: Sequence[ImageInput] = ()) -> torch.Tensor:
        """float32 logits (len(token_ids), vocab) for one sequence, without a cache, through
        the loaded ``adapter`` (None: the base model). The sequence may fill the context
        (nothing is generated). ``images``: the prompt's (``encode_chat_with_images``)."""
        request = validate_request(self.encode(token_ids), None, self.limits, field="token_ids", images=images)
        ids = request.prompt
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        embeds = None
        if images:
            self.engine._check_images(request)
            seq = EngineSequence(list(ids), SamplingParams(), images=request.images)
            with torch.inference_mode():
                embeds = self.engine.runner.image_embeds(tokens, [(0, seq, 0, len(ids))])
        scope = contextlib.nullcontext()
        if adapter is not None:
            engine = self.engine
            key = engine.adapters.resolve(adapter)
            slot = engine.adapters.slots_for([key], keep=engine.scheduler.active_adapters())[0]
            scope = engine.runner.lora.batch([slot], [len(ids)], self.device)
        with torch.inference_mode(), scope:
            hidden = self.model(tokens, torch.arange(len(ids), device=self.device), NoCacheAttention([len(ids)], self.device),
                                embeds)
            return self.model.logits(hidden).float().cpu()


def _engine_settings(kwargs: dict) -> EngineSettings:
    try:
        return EngineSettings(**kwargs)
    except TypeError as e:
        raise InvalidParameter("engine", f"{e}; valid settings: {', '.join(EngineSettings.__dataclass_fields__)}") from None
