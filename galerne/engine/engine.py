"""The engine: continuous batching over a paged KV cache.

``step()`` is three calls: the scheduler picks this step's tokens (prefill chunks
and decodes within a token budget), the runner does one forward over them, and
postprocessing samples, detokenizes and checks stop conditions per sequence.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..config import EngineSettings
from ..errors import InvalidParameter
from ..models.transformer import Transformer
from ..models.vision import VisionModel
from ..sampling.guided import GuidedMatcher, allowed_masks, compiler_for
from ..sampling.sampler import (
    SamplingRow,
    make_generator,
    min_tokens_masked_ids,
    sample_batch,
)
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .adapters import AdapterInfo, AdapterManager
from .block_manager import BlockManager
from .paged import PagedKVCache, kv_storage
from .request import EngineRequest, Limits
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence, Status
from .stop import StopChecker, drain

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_GB = 2.0


@dataclass(frozen=True)
class PromptLogprob:
    """One prompt token's log-probability under the model's raw logits, given the tokens
    before it."""

    logprob: float
    rank: int  # 1 + how many tokens the model found more likely
    top: list[tuple[int, float]]  # the SamplingParams.prompt_logprobs most likely (id, logprob)


# Prompt positions turned into logits at once when computing prompt logprobs: bounds the
# (rows, vocab) float32 buffer (512 x 131k = 268 MB).
PROMPT_LOGPROBS_ROWS = 512


@dataclass
class StepOutput:
    """What one step added to one completion of one request."""

    request_id: str
    index: int  # which of the request's n completions
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last output
    # What stopped it, with finish_reason "stop": the token id (EOS or one of
    # stop_token_ids; it is the last of token_ids) or the stop string; None when the
    # grammar completed. Callers never recompute it (ignore_eos, stop_token_ids...).
    stop_reason: int | str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # On a completion's first output, with SamplingParams.prompt_logprobs: one entry per
    # prompt token, None for the first (nothing predicts it).
    prompt_logprobs: list[PromptLogprob | None] | None = None

    @property
    def answer_token_ids(self) -> list[int]:
        """``token_ids`` but the token that stopped the sequence (``stop_reason``): what
        is content and has a logprob in an API answer."""
        return self.token_ids[:-1] if isinstance(self.stop_reason, int) else self.token_ids


@dataclass
class _SeqState:
    detok: IncrementalDetokenizer
    stopper: StopChecker
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    # Guided decoding: where the sequence is in its grammar (advanced in _append only,
    # on newly sampled tokens: a recompute after preemption samples nothing old).
    guide: GuidedMatcher | None = None
    # With SamplingParams.prompt_logprobs: those of the prompt positions computed so far
    # (a recompute after preemption adds none twice); handed out with the first output.
    prompt_logprobs: list[PromptLogprob | None] | None = None


@dataclass
class _Request:
    seqs: list[Sequence]
    arrival: float = field(default_factory=time.monotonic)


def background_cap(setting: int | None, device: torch.device) -> int | None:
    """``max_background_seqs`` as given, or its default for ``device``: 0 on a CPU, where a
    step's time grows with every row it carries (benchmarks/batch_latency.py: an interactive
    client 1.14x slower beside a 200-request batch with 0, 1.9x with 2, 5.4x without a cap,
    on galerne-mini and 2 cores); none on a GPU, where a decode row costs little until the
    step is compute-bound."""
    if setting is not None:
        return setting
    return 0 if device.type == "cpu" else None


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        settings: EngineSettings | None = None,
        *,
        limits: Limits | None = None,
        vision: VisionModel | None = None,
    ):
        """``limits``: what requests were validated against (``validate_request``); by
        default the tokenizer's vocabulary and the model's context. ``vision``: a
        vision-language model's encoder and projector (prompts with images)."""
        self.model, self.tokenizer = model, tokenizer
        self.vision = vision
        self.settings = s = settings or EngineSettings()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.kv_dtype = kv_storage(s.kv_cache_dtype, self.dtype)
        args = model.args
        self.limits = limits or Limits(tokenizer.vocab_size, args.max_seq_len)
        self.max_model_len = self.limits.max_model_len
        num_blocks = self._num_blocks()
        # One block more than the manager owns: a scratch block that CUDA-graph
        # padding rows write into.
        self.cache = PagedKVCache(args, num_blocks + 1, s.block_size, self.dtype, self.device, storage=self.kv_dtype,
                                  huge_pages=s.huge_pages)
        windows = [args.window(i) for i in range(args.n_layers)]
        # Blocks can be released only when every layer forgets them.
        window = max(windows) if all(w is not None for w in windows) else None
        self.block_manager = BlockManager(num_blocks, s.block_size, enable_prefix_caching=s.enable_prefix_caching, window=window)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=s.max_num_seqs,
                                   max_num_batched_tokens=s.max_num_batched_tokens, max_adapters=s.max_loras,
                                   max_background_seqs=background_cap(s.max_background_seqs, self.device))
        self.runner = ModelRunner(model, self.cache, use_cuda_graphs=not s.enforce_eager,
                                   max_num_seqs=s.max_num_seqs, use_cpu_kernel=not s.enforce_eager,
                                   int8_dot=s.quantized_activations == "int8", vision=vision, huge_pages=s.huge_pages)
        # Adapters served unmerged: load_adapter / unload_adapter, and a request's adapter.
        self.adapters = AdapterManager(self.runner, s.max_loras, s.max_lora_rank)
        self._requests: dict[str, _Request] = {}
        self._state: dict[int, _SeqState] = {}
        # Sequences whose prompt logprobs are not all computed yet: steps look for chunks
        # to score only while there are some (no per-sequence check on the hot path).
        self._scoring: set[int] = set()
        self._eos = frozenset(tokenizer.stop_token_ids())
        log.info("KV cache: %d blocks of %d tokens (%.2f GB, %s)", num_blocks, s.block_size,
                 num_blocks * PagedKVCache.bytes_per_block(args, s.block_size, self.kv_dtype) / 1e9,
                 str(self.kv_dtype).removeprefix("torch."))

    # ----------------------------------------------------------------- sizing

    def _num_blocks(self) -> int:
        s, args = self.settings, self.model.args
        per_block = PagedKVCache.bytes_per_block(args, s.block_size, self.kv_dtype)
        if s.kv_cache_gb is not None:
            budget = s.kv_cache_gb * 1e9
        elif self.device.type == "cuda":
            budget = self._free_gpu_bytes()
        else:
            budget = DEFAULT_CPU_KV_GB * 1e9
        # More blocks than every running sequence at full context could use is waste.
        useful = s.max_num_seqs * -(-self.max_model_len // s.block_size) + 1
        n = min(int(budget // per_block), useful)
        if n < 1:
            raise InvalidParameter("kv_cache_gb", f"{budget / 1e9:.3f} GB does not hold one KV block ({per_block} bytes)")
        return n

    def _free_gpu_bytes(self) -> float:
        """What --gpu-memory-utilization leaves after the weights and the peak
        activations of the largest step (measured by running one)."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = min(self.settings.max_num_batched_tokens, self.max_model_len)
        from ..models.attention import NoCacheAttention

        with torch.inference_mode():
            h = self.model(torch.zeros(n, dtype=torch.long, device=self.device),
                           torch.arange(n, device=self.device), NoCacheAttention([n], self.device))
            self.model.logits(h[-self.settings.max_num_seqs:])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = total * self.settings.gpu_memory_utilization - peak
        if budget <= 0:
            raise InvalidParameter(
                "gpu_memory_utilization",
                f"weights and activations take {peak / 1e9:.1f} GB, more than {self.settings.gpu_memory_utilization:.0%} "
                f"of the GPU's {total / 1e9:.1f} GB: nothing is left for the KV cache",
            )
        return budget

    # --------------------------------------------------------------- requests

    def add_request(self, request: EngineRequest) -> str:
        """Queue a request (n sequences) that ``validate_request`` passed. Errors here,
        never later, for what only the engine knows: a request the KV cache can never
        hold, a grammar that does not compile, a request id already running."""
        prompt, params, request_id = list(request.prompt), request.params, request.request_id
        if params is None:
            raise InvalidParameter("params", "a prompt validated for scoring has no SamplingParams to generate with")
        if request_id in self._requests:
            raise InvalidParameter("request_id", f"{request_id!r} is already running")
        self._check_images(request)
        # Checked before (validate_request's callers), but an unload may have come between.
        adapter = self.adapters.resolve(request.adapter)
        guides: list[GuidedMatcher | None] = [None] * params.n
        if params.guided is not None:
            # Compiled now: a bad grammar is an error of this call, never of a later step.
            first = compiler_for(self.tokenizer).matcher(params.guided)
            guides = [first] + [first.copy() for _ in range(params.n - 1)]
        seqs = [Sequence(prompt, params, request_id=request_id, index=i, adapter=adapter,
                         max_tokens=request.max_tokens, priority=request.priority, images=request.images)
                for i in range(params.n)]
        if params.prompt_logprobs is not None:
            for seq in seqs:  # every position is computed: none may come from the prefix cache
                seq.use_prefix_cache = False
                if len(prompt) > 1:  # else its one entry (None) is all there is
                    self._scoring.add(seq.seq_id)
        for seq in seqs:
            # All n sequences are the same size: the first check decides for all.
            self.scheduler.add(seq)
        self.adapters.retain(adapter, len(seqs))
        self._requests[request_id] = _Request(seqs)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._eos)
        for seq, guide in zip(seqs, guides):
            self._state[seq.seq_id] = _SeqState(
                detok=IncrementalDetokenizer(self.tokenizer, prompt),
                stopper=StopChecker(params.stop, params.include_stop_str_in_output),
                generator=make_generator(params, self.device, seq.index),
                stop_ids=stop_ids,
                guide=guide,
                prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            )
        return request_id

    def _check_images(self, request: EngineRequest) -> None:
        """A prompt's images against the encoder: one it has, images of its shape, and as
        many [IMG] tokens in each span as the encoder gives rows for it."""
        if not request.images:
            return
        if self.vision is None:
            raise InvalidParameter("messages", "this model has no vision encoder: it does not take images")
        a = self.vision.args
        for k, im in enumerate(request.images):
            try:
                rows = self.vision.check_image(im.pixels)
            except ValueError as e:
                raise InvalidParameter(f"images[{k}]", str(e)) from None
            found = len(im.rows(request.prompt, a.image_token_id))
            if found != rows:
                raise InvalidParameter(f"images[{k}]", f"its span holds {found} image tokens for the encoder's {rows} "
                                                       "rows (the tokenizer's image config does not match the model's)")

    def abort(self, request_id: str) -> None:
        """Cancel a request: its blocks are freed now."""
        if self._requests.pop(request_id, None) is None:
            return
        for seq in self.scheduler.abort(request_id):
            self._state.pop(seq.seq_id, None)
            self._scoring.discard(seq.seq_id)
            self.adapters.release(seq.adapter)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict:
        return self.scheduler.stats() | {"num_blocks": self.block_manager.num_blocks} | self.adapters.stats()

    # --------------------------------------------------------------- adapters

    def load_adapter(self, name: str, path) -> AdapterInfo:
        """Serve the LoRA adapter at ``path`` (either layout) as ``name``, unmerged, from the
        next step on. A bad adapter (ModelLoadError, InvalidParameter) changes nothing."""
        return self.adapters.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Refuse new requests for ``name`` now; those running finish through it first."""
        self.adapters.unload(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.list()

    # ------------------------------------------------------------------- step

    def step(self) -> list[StepOutput]:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        scoring = [i for i, s in enumerate(plan.scheduled) if self._needs_prompt_logprobs(s.seq)] if self._scoring else []
        keys = [s.seq.adapter for s in plan.scheduled]
        slots = None
        if any(k is not None for k in keys):  # swap in the adapters this step needs
            slots = self.adapters.slots_for(keys, keep=self.scheduler.active_adapters())
        logits, rows, hidden = self.runner.run(plan.scheduled, scoring, slots)
        for i in scoring:  # before advance(): the chunk starts at num_computed_tokens
            self._add_prompt_logprobs(plan.scheduled[i].seq, hidden[i])
        self.scheduler.advance(plan)
        outputs = []
        # A sequence with no budget (max_tokens 0) ends when its prompt is computed.
        done = {j for j, i in enumerate(rows) if plan.scheduled[i].seq.max_tokens == 0}
        for j in sorted(done):
            seq = plan.scheduled[rows[j]].seq
            outputs.append(self._finish(seq, StepOutput(seq.request_id, seq.index, "", [], num_prompt_tokens=seq.num_prompt_tokens,
                                                        num_cached_tokens=seq.num_cached_tokens), "length"))
        if done:
            keep = [j for j in range(len(rows)) if j not in done]
            logits, rows = logits[keep], [rows[j] for j in keep]
        seqs = [plan.scheduled[i].seq for i in rows]
        if not seqs:
            return outputs
        sampled = sample_batch(logits, self._sampling_rows(seqs, logits.shape[1]))
        for i, seq in enumerate(seqs):
            lp = None if sampled.logprobs is None else sampled.logprobs[i]
            top = None if sampled.top_logprobs is None else sampled.top_logprobs[i]
            outputs.append(self._append(seq, sampled.token_ids[i], lp, top))
        return outputs

    # ------------------------------------------------------- prompt logprobs

    def _needs_prompt_logprobs(self, seq: Sequence) -> bool:
        """Whether this step's chunk of ``seq`` holds prompt positions still to score
        (position p predicts prompt token p + 1)."""
        return seq.seq_id in self._scoring and seq.num_computed_tokens < seq.num_prompt_tokens - 1

    def _add_prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """The logprobs of the prompt tokens that ``hidden`` (this step's new tokens of
        ``seq``, from position num_computed_tokens) predicts, in bounded slices."""
        st = self._state[seq.seq_id]
        collected, k = st.prompt_logprobs, seq.params.prompt_logprobs
        start = seq.num_computed_tokens
        first = len(collected) - 1  # the position that predicts the first token still missing
        last = min(start + hidden.shape[0], seq.num_prompt_tokens - 1)  # positions first..last-1
        for a in range(max(first, start), last, PROMPT_LOGPROBS_ROWS):
            b = min(a + PROMPT_LOGPROBS_ROWS, last)
            logprobs = torch.log_softmax(self.model.logits(hidden[a - start : b - start]).float(), dim=-1)
            targets = torch.tensor(seq.token_ids[a + 1 : b + 1], device=logprobs.device)
            actual = logprobs.gather(1, targets[:, None])
            ranks = (logprobs > actual).sum(dim=1) + 1
            if k:
                vals, ids = torch.topk(logprobs, min(k, logprobs.shape[1]), dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
            else:
                tops = [[] for _ in range(b - a)]
            collected += [PromptLogprob(lp, r, t) for lp, r, t in zip(actual[:, 0].tolist(), ranks.tolist(), tops)]
        if len(collected) == seq.num_prompt_tokens:
            self._scoring.discard(seq.seq_id)

    def _sampling_rows(self, seqs: list[Sequence], vocab_size: int) -> list[SamplingRow]:
        # Grammar masks cost CPU time: only guided rows pay, all computed together.
        guided = [seq for seq in seqs if self._state[seq.seq_id].guide is not None]
        masks = {}
        if guided:
            executor = compiler_for(self.tokenizer).executor if len(guided) > 1 else None
            allowed = allowed_masks([self._state[seq.seq_id].guide for seq in guided], vocab_size, executor)
            masks = {seq.seq_id: allowed[j] for j, seq in enumerate(guided)}
        return [self._sampling_row(seq, masks.get(seq.seq_id)) for seq in seqs]

    def _sampling_row(self, seq: Sequence, allowed: torch.Tensor | None = None) -> SamplingRow:
        st = self._state[seq.seq_id]
        masked = min_tokens_masked_ids(seq.params, seq.num_output_tokens, self._eos)
        if allowed is not None and masked:
            # min_tokens cannot hold back the end of a complete grammar: the grammar wins.
            ids = [t for t in masked if 0 <= t < allowed.numel()]
            if ids and int(allowed.sum()) == int(allowed[ids].sum()):
                masked = frozenset()
        return SamplingRow(seq.params, seq.token_ids[: seq.num_prompt_tokens], seq.output_token_ids, st.generator,
                           masked, allowed)

    def _append(self, seq: Sequence, token: int, logprob, top) -> StepOutput:
        st = self._state[seq.seq_id]
        seq.token_ids.append(token)
        out = StepOutput(seq.request_id, seq.index, "", [token],
                         logprobs=None if logprob is None else [logprob],
                         top_logprobs=None if top is None else [top],
                         num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens)
        if seq.num_output_tokens == 1:
            out.prompt_logprobs = st.prompt_logprobs
        grammar_done = False
        if st.guide is not None:
            st.guide.advance(token)
            grammar_done = st.guide.is_finished  # nothing but EOS can follow
            if st.guide.error is not None:
                log.error("request %s: guided decoding failed: %s", seq.request_id, st.guide.error)
        finish = None
        if token in st.stop_ids:
            out.text, _ = drain(st.detok, st.stopper)
            finish, out.stop_reason = "stop", token
        else:
            out.text, stopped = st.stopper.push(st.detok.push(token))
            if stopped:
                finish, out.stop_reason = "stop", st.stopper.matched
            elif grammar_done or seq.num_output_tokens >= seq.max_tokens:
                tail, stopped = drain(st.detok, st.stopper)
                out.text += tail
                finish = "stop" if stopped or grammar_done else "length"
                out.stop_reason = st.stopper.matched
        return self._finish(seq, out, finish) if finish is not None else out

    def _finish(self, seq: Sequence, out: StepOutput, reason: str) -> StepOutput:
        """``out`` as ``seq``'s last output: its state and blocks are freed."""
        st = self._state.pop(seq.seq_id)
        self._scoring.discard(seq.seq_id)
        if seq.num_output_tokens == 0:  # max_tokens 0: this is its first output too
            out.prompt_logprobs = st.prompt_logprobs
        out.finish_reason = reason
        self.scheduler.finish(seq, reason)
        self.adapters.release(seq.adapter)
        req = self._requests.get(seq.request_id)
        if req is not None and all(s.status is Status.FINISHED for s in req.seqs):
            del self._requests[seq.request_id]
        return out
