"""ModelRunner: turn a scheduled step into one forward over the flat batch.

Steps made only of decodes (one token per sequence) skip the per-op cost that
dominates decoding at small batch: on CUDA they replay a CUDA graph captured for the
next larger batch size; on CPU, up to ``kernels.cpu.MAX_BATCH`` of them run through
galerne's native decode kernel (``galerne/kernels``), one call for the whole step.

Adapters (``enable_adapters``): the runner wraps the model's linears in adapter slots.
The CPU decoder is then rebuilt on the wrapped model: it reads the slots' stacks in
place, so decode steps with adapters run through the kernel too, each row with its
slot. The CUDA graphs, captured before, hold the base weights (the wrappers keep them
as they are): they still run the steps where no row has an adapter; a CUDA step where
some row has one runs eagerly, each wrapper adding its rows' deltas with the Triton
kernel (``kernels.triton_lora``: it reads ``LoRARows.slot_of_row`` on the device and
syncs nothing, so such steps could be captured too, with the slots in a static buffer).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

import torch

from ..models.lora import MultiLoRA, apply_multi_lora
from ..models.quant import QuantLinear
from ..cache import ByteLRU
from ..hugepages import move_to_huge_pages
from ..images import ImageInput
from ..models.transformer import Transformer
from ..models.vision import VisionModel
from .paged import BatchMetadata, PagedKVCache, TorchPagedAttention, TritonPagedAttention
from .scheduler import ScheduledSeq
from .sequence import Sequence as Sequence_

log = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache, *, use_cuda_graphs: bool = True, max_num_seqs: int = 256,
                 use_cpu_kernel: bool = True, int8_dot: bool = True, vision: VisionModel | None = None,
                 huge_pages: bool = False):
        """``int8_dot``: on the CPU, block-quantized weights multiply inputs rounded to int8
        (``--quantized-activations``), in the decode kernel and in QuantLinear's GEMV.
        ``vision``: the encoder and projector of a vision-language model (prompts with
        images), None for a text model. ``huge_pages``: on the CPU, the model's weights
        are moved into 2 MB pages (``galerne.hugepages``)."""
        self.model, self.cache = model, cache
        self.vision = vision
        # Adapters trained on images carry their own projector (engine/adapters.py): the
        # vision model each one's sequences use, sharing the base's encoder.
        self.adapter_vision: dict = {}
        # (image digest, adapter key or None) -> the rows for the image through that
        # adapter's projector; an entry as big as the whole cache is still kept.
        self.encoder_cache: ByteLRU = ByteLRU(ENCODER_CACHE_BYTES, max_item_bytes=ENCODER_CACHE_BYTES)
        self.int8_dot = int8_dot and cache.k.device.type == "cpu"
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.int8_dot = self.int8_dot
        self.device = cache.k.device
        self.block_size = cache.block_size
        self.on_cuda = self.device.type == "cuda"
        # A latent (MLA) cache goes through the same Triton kernel: keys of
        # kv_lora_rank + qk_rope_head_dim, values the first kv_lora_rank of them.
        # The Triton kernel reads caches in the model's dtype; a converted one (--kv-cache-dtype
        # fp8, int8) goes through torch ops, which convert as they read.
        self.attention = TritonPagedAttention if self.on_cuda and not cache.converted else TorchPagedAttention
        self.graphs = None
        # MoE routing picks token subsets with data-dependent shapes: not capturable.
        if self.attention is TritonPagedAttention and use_cuda_graphs and model.args.moe is None and not cache.latent:
            from .cuda_graphs import DecodeGraphs

            max_blocks = -(-model.args.max_seq_len // self.block_size)
            sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_num_seqs]
            self.graphs = DecodeGraphs(model, cache, sizes, max_blocks)
        self.cpu_decoder = None
        if self.device.type == "cpu" and huge_pages:
            move_to_huge_pages(model)  # a decode step streams every weight: 2 MB pages read faster
        if self.device.type == "cpu" and use_cpu_kernel:
            from ..kernels.cpu import CpuDecoder

            self.cpu_decoder = CpuDecoder.create(model, cache.k, cache.v, int8_dot=self.int8_dot)
        self.lora: MultiLoRA | None = None

    def enable_adapters(self, max_loras: int, max_rank: int) -> MultiLoRA:
        """Wrap the model's target linears in ``max_loras`` adapter slots of rank
        ``max_rank`` (once); see the module's docstring for the kernels."""
        if self.lora is None:
            self.lora = apply_multi_lora(self.model, max_loras, max_rank)
            if self.cpu_decoder is not None:  # the same weights, now with the slots' stacks
                from ..kernels.cpu import CpuDecoder

                self.cpu_decoder = CpuDecoder.create(self.model, self.cache.k, self.cache.v, int8_dot=self.int8_dot)
        return self.lora

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq], hidden_of: Collection[int] = (), slots: Sequence[int] | None = None
            ) -> tuple[torch.Tensor, list[int], dict[int, torch.Tensor]]:
        """Forward the step; returns the float32 logits of the sequences that
        reached the end of their known tokens (they sample next), their indices
        in ``scheduled``, and the hidden states of every new token of the
        sequences whose indices are in ``hidden_of`` (for prompt logprobs). The
        logits are valid until the next step (the CPU kernel reuses its buffer).
        ``slots``: the adapter slot of each scheduled sequence (-1: the base model;
        None: all base)."""
        entries, tokens, sample_rows, rows, spans, with_images = [], [], [], [], {}, []
        want = set(hidden_of)
        end = 0
        for i, s in enumerate(scheduled):
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            entries.append((seq.block_table, start, n))
            tokens.extend(seq.token_ids[start : start + n])
            if seq.images and seq.images_in(start, start + n):
                with_images.append((end, seq, start, n))
            if i in want:
                spans[i] = (end, end + n)
            end += n
            if start + n == seq.num_tokens:
                sample_rows.append(end - 1)  # its last new token predicts the next one
                rows.append(i)
        adapters = slots is not None and any(s >= 0 for s in slots)
        decode_only = len(tokens) == len(scheduled) == len(rows) and not hidden_of and not with_images
        if self.cpu_decoder is not None and decode_only and len(tokens) <= self.cpu_decoder.max_batch:
            logits = self.cpu_decoder(tokens, entries, list(slots)) if adapters else self.cpu_decoder(tokens, entries)
            return logits, rows, {}
        if (self.graphs is not None and len(tokens) == len(scheduled) and not hidden_of and not adapters
                and not with_images and self.graphs.fits(len(tokens), entries)):
            hidden = self.graphs.run(tokens, entries)
        else:
            meta = BatchMetadata.build(entries, self.block_size, self.device)
            ids = torch.tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)
            backend = self.attention(self.cache, meta)
            embeds = self.image_embeds(ids, with_images) if with_images else None
            if adapters:
                with self.lora.batch(list(slots), meta.q_lens, self.device):
                    hidden = self.model(ids, meta.positions, backend, embeds)
            else:
                hidden = self.model(ids, meta.positions, backend, embeds)
        kept = {i: hidden[a:b] for i, (a, b) in spans.items()}
        if not rows:
            return hidden.new_empty((0, self.model.args.vocab_size), dtype=torch.float32), rows, kept
        index = torch.tensor(sample_rows, device=self.device)
        return self.model.logits(hidden.index_select(0, index)).float(), rows, kept

    def image_embeds(self, ids: torch.Tensor, with_images: list[tuple[int, Sequence_, int, int]]) -> torch.Tensor:
        """The step's input embeddings with the encoder's rows in place of the [IMG]
        tokens of the images it holds: ``with_images`` lists (row of the sequence's first
        new token in the flat batch, sequence, its first new token, how many). Each image
        is encoded once, when its first tokens are scheduled, and kept in the encoder
        cache for the chunks that follow (and for other prompts with the same image)."""
        embeds = self.model.tok_embeddings(ids)
        # By the vision model each sequence's adapter uses (its projector, or the base's).
        needed: dict = {}
        for _, seq, start, n in with_images:
            key = seq.adapter if seq.adapter in self.adapter_vision else None
            needed.setdefault(key, {}).update((im.digest, im) for im in seq.images_in(start, start + n))
        features = {key: self.encode_images(list(images.values()), key) for key, images in needed.items()}
        img = self.vision.args.image_token_id
        rows, parts = [], []
        for base, seq, start, n in with_images:
            mine = features[seq.adapter if seq.adapter in self.adapter_vision else None]
            for im in seq.images_in(start, start + n):
                at = im.rows(seq.token_ids, img)
                lo = next((k for k, p in enumerate(at) if p >= start), len(at))
                hi = next((k for k, p in enumerate(at) if p >= start + n), len(at))
                rows.extend(base + p - start for p in at[lo:hi])
                parts.append(mine[im.digest][lo:hi])
        if rows:
            index = torch.tensor(rows, device=embeds.device)
            embeds = embeds.index_copy(0, index, torch.cat(parts).to(embeds.dtype))
        return embeds

    def encode_images(self, images: list[ImageInput], adapter=None) -> dict[str, torch.Tensor]:
        """digest -> the (its [IMG] tokens, dim) rows of each image, through the projector
        of ``adapter`` (an adapter key in ``adapter_vision``; None: the base's): from the
        encoder cache, the missing ones encoded in one call."""
        vision = self.vision if adapter is None else self.adapter_vision[adapter]
        out = {im.digest: f for im in images if (f := self.encoder_cache.get((im.digest, adapter))) is not None}
        missing = [im for im in images if im.digest not in out]
        if missing:
            dtype = vision.patch_conv_dtype
            for im, f in zip(missing, vision([im.pixels.to(self.device, dtype) for im in missing])):
                out[im.digest] = f
                self.encoder_cache.put((im.digest, adapter), f, f.numel() * f.element_size())
        return out


# The encoder cache's size: a 1024x1024 image on Mistral Small 3.1 (1024 tokens of 5120
# floats) takes 20 MiB in float32.
ENCODER_CACHE_BYTES = 512 << 20
