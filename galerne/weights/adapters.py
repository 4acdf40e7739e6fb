"""Save and load LoRA adapters in two layouts.

- Mistral (mistral-finetune / mistral-inference): one ``lora.safetensors`` with
  native names (``layers.0.attention.wq.lora_A.weight``). mistral-finetune keeps
  the rank and scaling in the run's config, not in the file; we also write
  ``{"r", "lora_alpha", "scaling"}`` into the file's safetensors metadata.
- PEFT: ``adapter_config.json`` + ``adapter_model.safetensors`` with Hugging Face
  names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``),
  mapped through :mod:`galerne.weights.names`. The q/k rotary row permutation
  applies to ``lora_B`` only: its rows are the projection's output rows, while
  ``lora_A``'s rows are the rank dimension (delta = B @ A, so permuting the rows
  of the delta is permuting the rows of B).

Loading fills the LoRA modules of a model on which :func:`apply_lora` has run;
any unknown, missing or mis-shaped tensor raises :class:`ModelLoadError` naming the
file and the tensor.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ModelLoadError
from ..models.lora import lora_config, lora_modules, lora_state_dict
from .names import hf_to_native, native_to_hf, permute_for, permute_rows

log = logging.getLogger(__name__)

MISTRAL_FILE = "lora.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# The scaling of an adapter whose files give neither a scaling nor an alpha (a bare
# lora.safetensors): alpha = rank, i.e. the update is B @ A as stored.
DEFAULT_SCALING = 1.0


def _heads(model) -> tuple[int, int]:
    return model.args.n_heads, model.args.n_kv_heads


def _rotary(native_name: str) -> str | None:
    conv = native_to_hf(native_name)
    return conv[1] if conv else None


# --- saving -------------------------------------------------------------------------


def save_adapter(model, folder: str | Path, layout: str = "mistral", base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA weights to ``folder`` as ``layout`` ("mistral" or "peft")."""
    if layout == "mistral":
        return save_mistral_adapter(model, folder)
    if layout == "peft":
        return save_peft_adapter(model, folder, base_model_name_or_path)
    raise ValueError(f"unknown adapter layout {layout!r}; use 'mistral' or 'peft'")


def save_mistral_adapter(model, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = lora_config(model)
    tensors = {n: t.contiguous().cpu() for n, t in lora_state_dict(model).items()}
    meta = {"r": str(cfg["rank"]), "lora_alpha": str(cfg["alpha"]), "scaling": str(cfg["scaling"]), "format": "pt"}
    path = folder / MISTRAL_FILE
    save_file(tensors, str(path), metadata=meta)
    return path


def save_peft_adapter(model, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = lora_config(model)
    n_heads, n_kv = _heads(model)
    tensors: dict[str, torch.Tensor] = {}
    hf_targets: set[str] = set()
    for name, t in lora_state_dict(model).items():
        conv = native_to_hf(name)
        if conv is None:
            raise ValueError(f"no Hugging Face name for LoRA tensor {name!r}")
        hf_name, rotary = conv
        if name.endswith(".lora_B.weight"):
            t = permute_rows(t, rotary, n_heads, n_kv, to="hf")
        tensors[PEFT_PREFIX + hf_name] = t.contiguous().cpu()
        hf_targets.add(hf_name.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight").rpartition(".")[2])
    save_file(tensors, str(folder / PEFT_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["rank"],
        "lora_alpha": cfg["alpha"],
        "lora_dropout": cfg["dropout"],
        "target_modules": sorted(hf_targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder / PEFT_FILE


# --- reading -----------------------------------------------------------------------


@dataclass
class AdapterWeights:
    """An adapter read into host memory, in native names and layout, independent of any
    model's LoRA modules: what merging, loading into :class:`LoRALinear` modules and the
    engine's adapter slots all start from.

    ``tensors``: native module name (``layers.0.attention.wq``) -> (A (rank, in),
    B (out, rank)), B's rows in native rotary order and *not* scaled: the update of a
    module is ``scaling * B @ A``."""

    path: Path  # the file the tensors came from
    layout: str  # "peft" | "mistral"
    rank: int
    scaling: float | None  # None: the files do not say (callers pick a default)
    alpha: float | None
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # A vision model's projector trained with it (PROJECTOR_FILE beside the adapter), once
    # read against the model's (``read_projector``); None: the base's projector serves.
    projector: dict[str, torch.Tensor] | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        """The modules' own names (``wq``, ``w2``...), sorted."""
        return tuple(sorted({name.rpartition(".")[2] for name in self.tensors}))

    @property
    def effective_scaling(self) -> float:
        return DEFAULT_SCALING if self.scaling is None else self.scaling

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.tensors.values())


def adapter_files(path: str | Path) -> tuple[str, Path, Path | None]:
    """(layout, weights file, config file or None) of the adapter at ``path``: a folder
    holding either layout, or a ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return "peft", path / PEFT_FILE, path / PEFT_CONFIG
        if (path / MISTRAL_FILE).is_file():
            return "mistral", path / MISTRAL_FILE, None
        raise ModelLoadError(f"no {PEFT_CONFIG} nor {MISTRAL_FILE} in the folder", path=str(path))
    if path.is_file():
        if path.name == PEFT_FILE and (path.parent / PEFT_CONFIG).is_file():
            return "peft", path, path.parent / PEFT_CONFIG
        return "mistral", path, None
    raise ModelLoadError("no such adapter file or folder", path=str(path))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in list(f.keys())}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read safetensors file: {e}", path=str(path)) from None


def _peft_config(cfg_path: Path) -> dict:
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read adapter config: {e}", path=str(cfg_path)) from None
    if not isinstance(cfg, dict):
        raise ModelLoadError("adapter config is not a JSON object", path=str(cfg_path))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)", path=str(cfg_path))
    if cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("bias", "none") != "none":
        raise ModelLoadError("rsLoRA, DoRA and LoRA biases are not supported", path=str(cfg_path))
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ModelLoadError("per-module ranks or alphas (rank_pattern, alpha_pattern) are not supported",
                             path=str(cfg_path))
    return cfg


def _number(source: dict, key: str, cast, where: Path):
    """``source[key]`` as ``cast`` (int or float), None when absent; anything else (a
    string, a bool, a list) is a ModelLoadError naming the key and the file."""
    value = source.get(key)
    if value is None:
        return None
    try:
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise TypeError
        number = cast(value)
    except (TypeError, ValueError, OverflowError):
        raise ModelLoadError(f"bad {key!r}: {value!r} (a number is expected)", path=str(where)) from None
    if cast is float and not math.isfinite(number):
        raise ModelLoadError(f"bad {key!r}: {value!r} (a finite number is expected)", path=str(where))
    return number


def _mistral_numbers(path: Path, meta: dict[str, str]) -> tuple[int | None, float | None, float | None]:
    """(r, lora_alpha, scaling) of a Mistral-layout file: from its safetensors metadata
    (galerne writes them there), else from the ``"lora"`` section of a ``params.json``
    beside it (mistral-finetune's checkpoint folder: ``{"rank", "scaling"}``)."""
    num = _number
    r, alpha, scaling = num(meta, "r", int, path), num(meta, "lora_alpha", float, path), num(meta, "scaling", float, path)
    params = path.parent / "params.json"
    if scaling is None and alpha is None and params.is_file():
        try:
            lora = json.loads(params.read_text()).get("lora")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ModelLoadError(f"cannot read the LoRA settings: {e}", path=str(params)) from None
        if isinstance(lora, dict):
            scaling = num(lora, "scaling", float, params)
            r = r if r is not None else num(lora, "rank", int, params)
    return r, alpha, scaling


def read_adapter(path: str | Path, model: nn.Module, *, max_rank: int | None = None) -> AdapterWeights:
    """Read the adapter at ``path`` (either layout) for the base ``model`` and check it:
    every tensor names a linear layer of the model (``nn.Linear``, or one already wrapped
    for LoRA), A and B come in pairs of one rank (at most ``max_rank``) whose shapes match
    that layer's in and out features. Any problem is a :class:`ModelLoadError` naming the
    file, the tensor and the limit. Nothing of ``model`` changes."""
    layout, file, cfg_path = adapter_files(path)
    cfg = _peft_config(cfg_path) if cfg_path is not None else None
    if not file.is_file():
        raise ModelLoadError("adapter weights not found", path=str(file))
    raw, meta = _read(file)
    if not raw:
        raise ModelLoadError("the file holds no tensors", path=str(file))
    args = model.args
    # native module name -> {"A"/"B": (name in the file, tensor, rotary kind)}
    pairs: dict[str, dict[str, tuple[str, torch.Tensor, str | None]]] = {}
    for k, t in raw.items():
        if not k.endswith(_LORA_SUFFIXES):
            raise ModelLoadError("not a LoRA tensor (expected a name ending in .lora_A.weight or .lora_B.weight)",
                                 path=str(file), tensor=k)
        rotary = None
        native = k
        if layout == "peft":
            conv = hf_to_native(k.removeprefix(PEFT_PREFIX))
            if conv is None:
                raise ModelLoadError("unknown LoRA tensor name", path=str(file), tensor=k)
            native, rotary = conv
        module, _, which = native.removesuffix(".weight").rpartition(".lora_")
        pairs.setdefault(module, {})[which] = (k, t, rotary)
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks: dict[int, str] = {}
    for module, pair in pairs.items():
        missing = "B" if "A" in pair else "A"
        if missing not in pair:
            have = pair["A" if missing == "B" else "B"][0]
            raise ModelLoadError(f"lora_{missing} is missing for this lora_{'A' if missing == 'B' else 'B'}",
                                 path=str(file), tensor=have.replace(f".lora_{'A' if missing == 'B' else 'B'}.",
                                                                     f".lora_{missing}."))
        (a_name, a, _), (b_name, b, rotary) = pair["A"], pair["B"]
        try:
            linear = model.get_submodule(module)
        except AttributeError:
            linear = None
        in_f, out_f = getattr(linear, "in_features", None), getattr(linear, "out_features", None)
        if in_f is None or out_f is None:
            raise ModelLoadError("the base model has no such linear layer", path=str(file), tensor=a_name)
        if a.ndim != 2 or a.shape[1] != in_f:
            raise ModelLoadError(f"shape {tuple(a.shape)} but {module} takes {in_f} inputs: expected (rank, {in_f}) "
                                 "(an adapter for another base model?)", path=str(file), tensor=a_name)
        r = a.shape[0]
        if b.ndim != 2 or tuple(b.shape) != (out_f, r):
            raise ModelLoadError(f"shape {tuple(b.shape)} but {module} has {out_f} outputs and lora_A rank {r}: "
                                 f"expected ({out_f}, {r}) (an adapter for another base model?)",
                                 path=str(file), tensor=b_name)
        ranks.setdefault(r, a_name)
        if layout == "peft":
            b = permute_for(args, b, rotary, to="native")
        tensors[module] = (a.contiguous(), b.contiguous())
    if len(ranks) != 1:
        raise ModelLoadError(f"expected one LoRA rank, found {sorted(ranks)} (e.g. {ranks[max(ranks)]!r})",
                             path=str(file))
    rank = next(iter(ranks))
    if rank < 1:
        raise ModelLoadError("rank 0", path=str(file), tensor=ranks[rank])
    if max_rank is not None and rank > max_rank:
        raise ModelLoadError(f"rank {rank} is above the largest rank served, {max_rank} (max_lora_rank)",
                             path=str(file), tensor=ranks[rank])
    if cfg is not None:
        r, alpha, scaling = _number(cfg, "r", int, cfg_path), _number(cfg, "lora_alpha", float, cfg_path), None
        where = cfg_path
    else:
        r, alpha, scaling = _mistral_numbers(file, meta)
        where = file
    if r is not None and int(r) != rank:
        raise ModelLoadError(f"the adapter's config says rank {r} but its tensors have rank {rank}", path=str(where))
    if alpha is not None:
        alpha = float(alpha)
    if scaling is None and alpha is not None:
        scaling = alpha / rank
    return AdapterWeights(path=file, layout=layout, rank=rank, scaling=scaling, alpha=alpha, tensors=tensors)


# --- loading into LoRA modules ------------------------------------------------------


def load_adapter(model, path: str | Path) -> str:
    """Fill the LoRA weights of ``model`` (after :func:`apply_lora`) from ``path``: a
    folder holding either layout, or a ``.safetensors`` file. The model's LoRA modules
    must be exactly the adapter's, of its rank. Returns the layout."""
    if not lora_modules(model):
        raise ModelLoadError("the model has no LoRA modules; call apply_lora() before loading an adapter", path=str(path))
    adapter = read_adapter(path, model)
    fill_lora(model, adapter)
    return adapter.layout


def fill_lora(model, adapter: AdapterWeights) -> None:
    """Copy ``adapter`` into the model's LoRA modules (and its scaling, when the files
    give one; else the modules keep theirs)."""
    path = str(adapter.path)
    mods = lora_modules(model)
    if not mods:
        raise ModelLoadError("the model has no LoRA modules; call apply_lora() before loading an adapter", path=path)
    for module in adapter.tensors:
        if module not in mods:
            raise ModelLoadError("unexpected tensor: the model has no such LoRA weight (check the rank/targets given "
                                 "to apply_lora)", path=path, tensor=f"{module}.lora_A.weight")
    missing = sorted(set(mods) - set(adapter.tensors))
    if missing:
        raise ModelLoadError(f"missing {len(missing)} LoRA tensor(s) the model expects", path=path,
                             tensor=f"{missing[0]}.lora_A.weight")
    for m in mods.values():
        if adapter.rank != m.rank:
            raise ModelLoadError(f"adapter rank {adapter.rank} but the model's LoRA rank is {m.rank}", path=path)
    with torch.no_grad():
        for module, (a, b) in adapter.tensors.items():
            m = mods[module]
            m.lora_A.weight.copy_(a.to(device=m.lora_A.weight.device, dtype=m.lora_A.weight.dtype))
            m.lora_B.weight.copy_(b.to(device=m.lora_B.weight.device, dtype=m.lora_B.weight.dtype))
    if adapter.scaling is not None:
        for m in mods.values():
            if abs(m.scaling - adapter.scaling) > 1e-12:
                log.info("%s: using the adapter's LoRA scaling %g (was %g)", path, adapter.scaling, m.scaling)
            m.scaling = float(adapter.scaling)
            if adapter.alpha is not None:
                m.alpha = adapter.alpha


def load_mistral_adapter(model, path: str | Path) -> None:
    fill_lora(model, read_adapter(path, model))


def load_peft_adapter(model, folder: str | Path) -> None:
    fill_lora(model, read_adapter(folder, model))


__all__ = [
    "AdapterWeights", "adapter_files", "fill_lora", "load_adapter", "load_mistral_adapter", "load_peft_adapter",
    "merge_adapter", "read_adapter", "save_adapter", "save_mistral_adapter", "save_peft_adapter",
]


def adapter_spec(path: str | Path) -> tuple[int, tuple[str, ...]]:
    """(rank, target module names such as "wq") of the adapter at ``path``, read from
    the file's tensor names and shapes alone (no model, no tensor data)."""
    layout, file, _ = adapter_files(path)
    ranks, targets = set(), set()
    try:
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                if not k.endswith(".lora_A.weight"):
                    continue
                module = k[: -len(".lora_A.weight")]
                if layout == "peft":
                    conv = hf_to_native(module.removeprefix(PEFT_PREFIX) + ".weight")
                    if conv is None:
                        raise ModelLoadError("not a Mistral-family module", path=str(file), tensor=k)
                    module = conv[0][: -len(".weight")]
                targets.add(module.rsplit(".", 1)[-1])
                ranks.add(f.get_slice(k).get_shape()[0])
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read safetensors file: {e}", path=str(file)) from None
    if len(ranks) != 1:
        raise ModelLoadError(f"expected one LoRA rank, found {sorted(ranks) or 'none'}", path=str(file))
    return ranks.pop(), tuple(sorted(targets))


def merge_adapter(model, path: str | Path, vision=None) -> tuple[str, int, tuple[str, ...]]:
    """Fold the adapter at ``path`` into ``model``'s base weights (in float32, whatever
    the weights' dtype): the model stays a plain model, as fast as the base. The adapter
    is read and checked whole before any weight changes. A projector trained with it
    (PROJECTOR_FILE) goes into ``vision``, the model's encoder and projector. Returns
    (layout, rank, targets)."""
    adapter = read_adapter(path, model)
    file = projector_file(path)
    projector = read_projector(file, vision) if file is not None and vision is not None else None
    linears = {name: model.get_submodule(name) for name in adapter.tensors}
    for name, m in linears.items():
        if type(m) is not nn.Linear:
            raise ModelLoadError(f"{name} is a {type(m).__name__}, not a plain linear layer: cannot merge into it",
                                 path=str(adapter.path))
    scaling = adapter.effective_scaling
    with torch.no_grad():
        for name, (a, b) in adapter.tensors.items():
            w = linears[name].weight
            delta = scaling * (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32))  # (out, in)
            w.copy_((w.float() + delta).to(w.dtype))
    if projector is not None:
        load_projector(vision, projector)
    return adapter.layout, adapter.rank, adapter.targets


# A vision model fine-tuned on images: its projector (pre_mm_projector_norm, patch_merger,
# vision_language_adapter, native names) is trained too, and travels beside the adapter
# (or the checkpoint) in this file; the encoder stays the base's.
PROJECTOR_FILE = "projector.safetensors"


def read_projector(path: str | Path, vision) -> dict[str, torch.Tensor]:
    """The projector tensors of ``path``, checked against ``vision`` (the base's
    ``VisionModel``: the same names and shapes), in its dtype and on its device."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read the projector: {e}", path=str(path)) from None
    own = vision.projector_state()
    if set(state) != set(own):
        raise ModelLoadError(f"the projector's tensors are not this model's ({', '.join(sorted(set(state) ^ set(own))[:4])})",
                             path=str(path))
    out = {}
    for name, t in state.items():
        if t.shape != own[name].shape:
            raise ModelLoadError(f"shape {tuple(t.shape)} is not the model's {tuple(own[name].shape)}", path=str(path),
                                 tensor=name)
        out[name] = t.to(device=own[name].device, dtype=own[name].dtype)
    return out


def projector_file(adapter_path: str | Path) -> Path | None:
    """The PROJECTOR_FILE beside an adapter (its folder, or its file's), if there is one."""
    path = Path(adapter_path)
    file = (path if path.is_dir() else path.parent) / PROJECTOR_FILE
    return file if file.is_file() else None


def with_projector(vision, state: dict[str, torch.Tensor]):
    """A ``VisionModel`` sharing ``vision``'s encoder (the same modules, no copy), its
    projector ``state`` (``read_projector``: every projector tensor, checked)."""
    from ..models.vision import VisionModel

    with torch.device("meta"):
        out = VisionModel(vision.args)
    out.vision_encoder = vision.vision_encoder
    out.load_state_dict(state, strict=False, assign=True)  # the encoder's keys: its own modules
    return out.eval()


def load_projector(vision, path_or_state) -> None:
    """Put the projector of ``path_or_state`` (PROJECTOR_FILE, or its tensors read) into
    ``vision``, in place."""
    state = path_or_state if isinstance(path_or_state, dict) else read_projector(path_or_state, vision)
    params = dict(vision.named_parameters())
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)
