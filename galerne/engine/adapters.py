"""Adapter slots: many LoRA adapters served at once, unmerged, in one batch.

Loaded adapters live in host memory (``AdapterWeights``, as read from their files);
``max_loras`` of them at a time sit in the device slots of the model's
``MultiLoRALinear`` stacks (``models.lora``), put there by the step that needs them:
a slot is reused least recently used first, never one whose adapter a running
sequence uses (the scheduler keeps those to at most ``max_loras``), and swapping in
copies the adapter's A and B into the stacks and zeroes what the previous occupant
left. The stacks are allocated on the first load, so an engine that never serves an
adapter pays nothing.

Each load gets an ``AdapterKey`` (name, generation), never reused: sequences carry it,
the scheduler counts slots by it and the prefix cache keys KV blocks on it, so that an
adapter unloaded and loaded again under the same name (maybe from other files) never
meets the KV blocks of its predecessor.

Unloading waits: the name is gone at once (new requests naming it are refused, and
the name may be loaded again), the requests already in the engine run to their end
through the adapter they started with, and its memory and slot are released when the
last one ends.

Not thread-safe: call it where the engine steps (its thread), between steps. ``read``
alone touches no state: a server may run it in a worker thread and hand the result
to ``add``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParameter, ModelLoadError
from ..models.lora import MULTI_TARGETS, MultiLoRA, multi_lora_unsupported
from ..weights.adapters import AdapterWeights, projector_file, read_adapter, read_projector, with_projector

log = logging.getLogger(__name__)

MAX_NAME_LEN = 256


@dataclass(frozen=True)
class AdapterKey:
    """One load of one adapter (``generation`` counts the loads of its manager)."""

    name: str
    generation: int


@dataclass(frozen=True)
class AdapterInfo:
    """What ``AdapterManager.list`` says of a loaded adapter."""

    name: str
    path: str  # the weights file it was read from
    layout: str  # "peft" | "mistral"
    rank: int
    scaling: float
    targets: tuple[str, ...]  # the modules' own names: "wq", "w2", ...


@dataclass
class _Loaded:
    key: AdapterKey
    weights: AdapterWeights
    info: AdapterInfo
    users: int = 0  # sequences in the engine that run through it


class AdapterManager:
    def __init__(self, runner, max_loras: int, max_rank: int):
        """``runner``: the engine's ``ModelRunner``, which installs the slots
        (``enable_adapters``) on the first load."""
        self.runner, self.model = runner, runner.model
        self.max_loras, self.max_rank = max_loras, max_rank
        self.lora: MultiLoRA | None = None  # the slots, once installed
        self._by_name: dict[str, _Loaded] = {}  # loaded and not unloaded
        self._loaded: dict[AdapterKey, _Loaded] = {}  # the same, and unloaded ones still in use
        self._generation = 0
        self._occupant: list[AdapterKey | None] = [None] * max_loras
        self._slot: dict[AdapterKey, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict.fromkeys(range(max_loras))  # least recently used first
        self.num_swaps = 0

    # ------------------------------------------------------------ loading

    def read(self, path: str | Path) -> AdapterWeights:
        """Read and check the adapter at ``path`` against this model and the slots'
        limits (ModelLoadError with the reason). Changes nothing."""
        path = Path(path)
        if self.max_loras < 1:
            raise InvalidParameter("max_loras", "is 0: this engine serves no adapter unmerged (merge it at load instead)")
        reason = multi_lora_unsupported(self.model) if self.lora is None else None
        if reason is not None:
            raise ModelLoadError(f"adapters can't be served unmerged on this model ({reason}); merge it at load instead",
                                 path=str(path))
        weights = read_adapter(path, self.model, max_rank=self.max_rank)
        file = projector_file(path)
        if file is not None and self.runner.vision is not None:  # trained on images with it
            weights.projector = read_projector(file, self.runner.vision)
        for module in weights.tensors:
            if module.rpartition(".")[2] not in MULTI_TARGETS or not module.startswith("layers."):
                raise ModelLoadError(f"{module} is not among the layers served with adapters unmerged "
                                     f"({', '.join(MULTI_TARGETS)} of each layer); merge it at load instead",
                                     path=str(weights.path), tensor=f"{module}.lora_A.weight")
        return weights

    def add(self, name: str, weights: AdapterWeights) -> AdapterInfo:
        """Register ``weights`` (from ``read``) under ``name``."""
        _check_name(name)
        if name in self._by_name:
            raise InvalidParameter("adapter", f"an adapter named {name!r} is already loaded; unload it first")
        if self.lora is None:
            try:
                self.lora = self.runner.enable_adapters(self.max_loras, self.max_rank)
            except (ValueError, RuntimeError) as e:  # out of memory for the slots, most likely
                raise ModelLoadError(f"cannot make the adapter slots ({self.max_loras} of rank {self.max_rank}): {e}",
                                     path=str(weights.path)) from None
            log.info("adapter slots: %d of rank up to %d (%.1f MB)", self.max_loras, self.max_rank,
                     self.lora.nbytes / 1e6)
        self._generation += 1
        key = AdapterKey(name, self._generation)
        info = AdapterInfo(name, str(weights.path), weights.layout, weights.rank, weights.effective_scaling,
                           weights.targets)
        self._by_name[name] = self._loaded[key] = _Loaded(key, weights, info)
        if weights.projector is not None:
            self.runner.adapter_vision[key] = with_projector(self.runner.vision, weights.projector)
        log.info("loaded %s adapter %r from %s (rank %d, %s)", weights.layout, name, weights.path, weights.rank,
                 ", ".join(weights.targets))
        return info

    def load(self, name: str, path: str | Path) -> AdapterInfo:
        """``read`` then ``add``: nothing changes when either refuses."""
        _check_name(name)
        if name in self._by_name:  # before reading the files
            raise InvalidParameter("adapter", f"an adapter named {name!r} is already loaded; unload it first")
        return self.add(name, self.read(path))

    def unload(self, name: str) -> None:
        """Forget ``name`` now; the requests running through it finish first (see the
        module's docstring)."""
        entry = self._by_name.pop(name, None)
        if entry is None:
            raise InvalidParameter("adapter", f"no adapter named {name!r} is loaded")
        if entry.users == 0:
            self._drop(entry)
        else:
            log.info("unloading adapter %r once its %d running sequence(s) end", name, entry.users)

    def _drop(self, entry: _Loaded) -> None:
        del self._loaded[entry.key]
        self.runner.adapter_vision.pop(entry.key, None)
        slot = self._slot.pop(entry.key, None)
        if slot is not None:  # free: reused first (zeroed by the next occupant's copy)
            self._occupant[slot] = None
            self._lru.move_to_end(slot, last=False)

    def list(self) -> list[AdapterInfo]:
        """The loaded adapters, in load order (not those being unloaded)."""
        return [e.info for e in self._by_name.values()]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    # ----------------------------------------------------------- requests

    def resolve(self, name: str | None, field: str = "adapter") -> AdapterKey | None:
        """The key of the adapter loaded as ``name`` (None: the base model); an unknown
        name is an InvalidParameter naming ``field``."""
        if name is None:
            return None
        entry = self._by_name.get(name)
        if entry is None:
            loaded = ", ".join(repr(n) for n in self._by_name) or "none"
            raise InvalidParameter(field, f"no adapter named {name!r} is loaded (loaded: {loaded})")
        return entry.key

    def retain(self, key: AdapterKey | None, n: int = 1) -> None:
        """``n`` more sequences run through ``key`` (until each ``release``)."""
        if key is not None:
            self._loaded[key].users += n

    def release(self, key: AdapterKey | None) -> None:
        """A sequence through ``key`` ended; an unloaded adapter goes with its last one."""
        if key is None:
            return
        entry = self._loaded[key]
        entry.users -= 1
        if entry.users == 0 and self._by_name.get(key.name) is not entry:
            self._drop(entry)

    # -------------------------------------------------------------- slots

    def slots_for(self, keys: list[AdapterKey | None], keep: set = frozenset()) -> list[int]:
        """The slot of each key (-1: base) for one step, swapping in the adapters not in
        a slot yet. A slot is taken from an adapter neither in ``keys`` nor in ``keep``
        (the running sequences' adapters), least recently used first."""
        needed = list(dict.fromkeys(k for k in keys if k is not None))
        if len(needed) > self.max_loras:
            raise RuntimeError(f"a step uses {len(needed)} adapters but there are {self.max_loras} slots")
        for key in needed:
            slot = self._slot.get(key)
            if slot is None:
                slot = self._victim(set(needed), keep)
                self._swap_in(key, slot)
            self._lru.move_to_end(slot)
        return [-1 if k is None else self._slot[k] for k in keys]

    def _victim(self, needed: set, keep: set) -> int:
        fallback = None
        for slot in self._lru:  # least recently used first; free slots sit at the front
            occupant = self._occupant[slot]
            if occupant is None or (occupant not in needed and occupant not in keep):
                return slot
            if fallback is None and occupant not in needed:
                fallback = slot  # a running sequence's adapter, not in this step: swapped back later
        assert fallback is not None, "more adapters than slots in one step"
        return fallback

    def _swap_in(self, key: AdapterKey, slot: int) -> None:
        old = self._occupant[slot]
        if old is not None:
            del self._slot[old]
        w = self._loaded[key].weights
        self.lora.fill(slot, w.tensors, w.effective_scaling)
        self._occupant[slot] = key
        self._slot[key] = slot
        self.num_swaps += 1

    def stats(self) -> dict:
        return {"adapters_loaded": len(self._by_name), "adapter_slots_used": len(self._slot),
                "adapter_swaps": self.num_swaps}


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name != name.strip() or len(name) > MAX_NAME_LEN \
            or not name.isprintable():
        raise InvalidParameter("adapter", f"an adapter name must be 1..{MAX_NAME_LEN} printable characters without "
                                          f"surrounding spaces, got {name!r}")
