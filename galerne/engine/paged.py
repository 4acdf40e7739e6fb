"""The paged KV cache and the attention backends that read it.

Layout, one tensor for keys and one for values, all layers:
``(layers, num_blocks, block_size, K, hd)``. Token position p of a sequence lives
in slot ``block_table[p // block_size] * block_size + p % block_size`` of the
flattened ``(num_blocks * block_size, K, hd)`` view of a layer.

Worked example, block_size 4, block table [7, 2]: position 5 is in table entry
5 // 4 = 1, i.e. block 2, at offset 5 % 4 = 1: slot 2 * 4 + 1 = 9.

A step's batch is flat: the new tokens of every scheduled sequence back to back
(a prefill chunk is many tokens, a decode one). ``BatchMetadata`` says where each
sequence's queries are and how long its context is; it is built once per step and
shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import hugepages
from ..models.args import ModelArgs
from ..models.attention import allowed_mask, sdpa


# --kv-cache-dtype: what the cache stores, when not the model's dtype.
KV_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "int8": torch.int8,
}


def kv_storage(name: str | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype the cache stores for ``--kv-cache-dtype name`` ("auto"/None: the model's ``dtype``)."""
    return dtype if name in (None, "auto") else KV_DTYPES[name]


class PagedKVCache:
    """Keys and values of every layer, in blocks.

    A model with multi-head latent attention (``args.mla``) caches one latent per
    token instead (``latent``): ``k`` is ``(layers, num_blocks, block_size, 1,
    kv_lora_rank + qk_rope_head_dim)`` (the normalised latent, then the rotated
    rotary key) and ``v`` a view of its first kv_lora_rank columns, stored once.

    ``storage``: the dtype stored when it is not ``dtype`` (``--kv-cache-dtype``),
    for half or a quarter of the memory, so twice or four times the tokens:
    float8 (e4m3 or e5m2) as the values are, clipped to the format's range, or int8
    with one float32 scale per token and head (``k_scale``, ``v_scale``: its
    largest magnitude / 127). Attention reads them back in ``dtype``
    (``write``/``read``)."""

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 storage: torch.dtype | None = None, huge_pages: bool = False):
        self.dtype, self.storage = dtype, storage or dtype
        self.latent = args.mla is not None
        st = self.storage
        # On the CPU, attention streams the cache as a decode step streams the weights.
        zeros = hugepages.zeros if huge_pages else torch.zeros
        if self.latent:
            m = args.mla
            self.k = zeros((args.n_layers, num_blocks, block_size, 1, m.latent_dim), dtype=st, device=device)
            self.v = self.k[..., : m.kv_lora_rank]
        else:
            shape = (args.n_layers, num_blocks, block_size, args.n_kv_heads, args.head_dim)
            self.k = zeros(shape, dtype=st, device=device)
            self.v = zeros(shape, dtype=st, device=device)
        self.k_scale = self.v_scale = None
        if st == torch.int8:  # one scale per (token, head); a latent's values share its keys'
            self.k_scale = torch.zeros(self.k.shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = self.k_scale if self.latent else torch.zeros(self.v.shape[:-1], dtype=torch.float32, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @property
    def _float8(self) -> bool:
        return self.storage.is_floating_point and self.storage.itemsize == 1

    @property
    def converted(self) -> bool:
        """Whether the stored dtype is not the model's (attention converts on read and write)."""
        return self.storage != self.dtype

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
        """Cache bytes one token takes, all layers (int8: with its scales)."""
        elem = torch.empty((), dtype=dtype).element_size()
        if args.mla:
            per_layer = args.mla.latent_dim * elem + (4 if dtype == torch.int8 else 0)
        else:
            per_layer = 2 * args.n_kv_heads * (args.head_dim * elem + (4 if dtype == torch.int8 else 0))
        return args.n_layers * per_layer

    @staticmethod
    def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
        return block_size * PagedKVCache.bytes_per_token(args, dtype)

    def layer_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, K, hd) views of one layer's keys and values."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])

    def _scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_scale[layer].view(-1, self.k.shape[3]), self.v_scale[layer].view(-1, self.v.shape[3])

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Store the new tokens' keys and values (T, K, hd) at ``slots`` (v None: a latent cache)."""
        k_slots, v_slots = self.layer_slots(layer)
        pairs = [(k_slots, k, 0)] + ([(v_slots, v, 1)] if v is not None else [])
        for dst, x, which in pairs:
            if self.storage == torch.int8:
                scale = x.float().abs().amax(-1) / 127  # (T, K)
                q = torch.round(x.float() / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).clamp(-127, 127)
                dst.index_copy_(0, slots, q.to(torch.int8))
                self._scales(layer)[which].index_copy_(0, slots, scale)
            elif self._float8:
                fmax = torch.finfo(self.storage).max  # float8 has no infinity: clip, never NaN
                x8 = x.float().clamp(-fmax, fmax).to(self.storage)
                dst.view(torch.uint8).index_copy_(0, slots, x8.view(torch.uint8))  # (no float8 index ops on CPU)
            else:
                dst.index_copy_(0, slots, x.to(self.storage))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (L, K, hd) at ``slots``, in the model's dtype."""
        k_slots, v_slots = self.layer_slots(layer)
        if self._float8:
            k_slots, v_slots = k_slots.view(torch.uint8), v_slots.view(torch.uint8)
        keys, values = k_slots.index_select(0, slots), v_slots.index_select(0, slots)
        if self._float8:
            keys, values = keys.view(self.storage), values.view(self.storage)
        if self.storage == torch.int8:
            ks, vs = self._scales(layer)
            keys = keys.float() * ks.index_select(0, slots).unsqueeze(-1)
            values = values.float() * vs.index_select(0, slots).unsqueeze(-1)
        return keys.to(self.dtype), values.to(self.dtype)


@dataclass
class BatchMetadata:
    """The layout of one step's flat batch (device tensors + host copies)."""

    positions: torch.Tensor  # (T,) absolute position of each new token
    slot_mapping: torch.Tensor  # (T,) int64 cache slot of each new token
    query_start_loc: torch.Tensor  # (B+1,) int32 cumulative new-token counts
    seq_lens: torch.Tensor  # (B,) int32 context length after this step
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded
    q_lens: list[int]  # host copies, for the CPU path
    ctx_lens: list[int]
    tables: list[list[int]]
    max_query_len: int

    @classmethod
    def build(cls, entries: list[tuple[list[int], int, int]], block_size: int, device: torch.device) -> "BatchMetadata":
        """entries: (block_table, num_computed_tokens, num_new_tokens) per sequence."""
        positions, slots, q_lens, ctx_lens, tables = [], [], [], [], []
        for table, start, n in entries:
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
            q_lens.append(n)
            ctx_lens.append(start + n)
            tables.append(table)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        qsl = [0]
        for n in q_lens:
            qsl.append(qsl[-1] + n)

        def dev(x, dtype):
            return torch.tensor(x, dtype=dtype).to(device, non_blocking=True)

        return cls(
            positions=dev(positions, torch.long), slot_mapping=dev(slots, torch.long),
            query_start_loc=dev(qsl, torch.int32), seq_lens=dev(ctx_lens, torch.int32),
            block_tables=dev(padded, torch.int32), q_lens=q_lens, ctx_lens=ctx_lens, tables=tables,
            max_query_len=max(q_lens),
        )


class TorchPagedAttention:
    """Paged attention in plain torch: the CPU path (and the reference on GPU).

    Per sequence: gather the keys it may see into a contiguous (K, L, hd) block,
    then one SDPA call. The gather reads only the window's blocks; on CPU the
    copy costs far less than the weights each step reads anyway.
    """

    def __init__(self, cache: PagedKVCache, meta: BatchMetadata):
        self.cache, self.meta = cache, meta
        bs = cache.block_size
        device = cache.k.device
        # Slots to gather per sequence, per window size: computed once per step.
        self._gather: dict[int | None, list[tuple[torch.Tensor, int]]] = {}
        self._bs, self._device = bs, device

    def _slots(self, window: int | None) -> list[tuple[torch.Tensor, int]]:
        got = self._gather.get(window)
        if got is None:
            got = []
            bs = self._bs
            for table, q_len, ctx in zip(self.meta.tables, self.meta.q_lens, self.meta.ctx_lens):
                first_q = ctx - q_len
                lo = max(0, first_q + 1 - window) if window is not None else 0
                pos = torch.arange(lo, ctx)
                t = torch.tensor(table, dtype=torch.long)
                got.append(((t[pos // bs] * bs + pos % bs).to(self._device), lo))
            self._gather[window] = got
        return got

    @property
    def latent(self) -> bool:
        return self.cache.latent

    def attend(self, layer: int, q, k, v, window: int | None, scale: float | None = None) -> torch.Tensor:
        # A latent cache's values are part of its keys: stored with them.
        self.cache.write(layer, self.meta.slot_mapping, k, None if self.cache.latent else v)
        out = q.new_empty(q.shape[:2] + v.shape[-1:])  # (T, H, vd)
        start = 0
        for (slots, lo), q_len, ctx in zip(self._slots(window), self.meta.q_lens, self.meta.ctx_lens):
            qs = q[start : start + q_len].transpose(0, 1)  # (H, q_len, hd)
            keys, values = self.cache.read(layer, slots)
            keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # (K, L, hd)
            if q_len == 1:
                o = sdpa(qs, keys, values, scale=scale)
            elif q_len == ctx and (window is None or window >= ctx):
                o = sdpa(qs, keys, values, causal=True, scale=scale)
            else:
                q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
                k_pos = torch.arange(lo, ctx, device=q.device)
                o = sdpa(qs, keys, values, mask=allowed_mask(q_pos, k_pos, window), scale=scale)
            out[start : start + q_len] = o.transpose(0, 1)
            start += q_len
        return out


class TritonPagedAttention:
    """Paged attention on CUDA: one Triton kernel for prefill chunks and decodes."""

    def __init__(self, cache: PagedKVCache, meta: BatchMetadata):
        from . import triton_attention

        self._ops = triton_attention
        self.cache, self.meta = cache, meta
        self._plan = None  # program map and block shapes: one per step, shared by the layers

    @property
    def latent(self) -> bool:
        return self.cache.latent

    def attend(self, layer: int, q, k, v, window: int | None, scale: float | None = None) -> torch.Tensor:
        k_slots, v_slots = self.cache.layer_slots(layer)
        k_slots.index_copy_(0, self.meta.slot_mapping, k)
        if not self.cache.latent:  # a latent cache's values are part of its keys: stored with them
            v_slots.index_copy_(0, self.meta.slot_mapping, v)
        m = self.meta
        if self._plan is None:
            T, H, hd = q.shape[0], q.shape[1], self.cache.v.shape[-1]
            self._plan = self._ops.plan_paged_attention(
                m.query_start_loc, T, H, k.shape[1], hd, m.max_query_len,
                max_seq_len=m.block_tables.shape[1] * self.cache.block_size,
            )
        return self._ops.paged_attention(q, self.cache.k[layer], self.cache.v[layer], m.block_tables,
                                         m.query_start_loc, m.seq_lens, window,
                                         q.shape[-1] ** -0.5 if scale is None else scale,
                                         m.max_query_len, plan=self._plan)
