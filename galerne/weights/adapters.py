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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ModelLoadError
from ..models.lora import lora_config, lora_modules, lora_state_dict
from .names import hf_to_native, native_to_hf, permute_rows

log = logging.getLogger(__name__)

MISTRAL_FILE = "lora.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


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


# --- loading ------------------------------------------------------------------------


def load_adapter(model, path: str | Path) -> str:
    """Fill the LoRA weights of ``model`` (after :func:`apply_lora`) from ``path``: a
    folder holding either layout, or a ``.safetensors`` file. Returns the layout."""
    path = Path(path)
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            load_peft_adapter(model, path)
            return "peft"
        if (path / MISTRAL_FILE).is_file():
            load_mistral_adapter(model, path / MISTRAL_FILE)
            return "mistral"
        raise ModelLoadError(f"no {PEFT_CONFIG} nor {MISTRAL_FILE} in the folder", path=str(path))
    if path.is_file():
        if path.name == PEFT_FILE and (path.parent / PEFT_CONFIG).is_file():
            load_peft_adapter(model, path.parent)
            return "peft"
        load_mistral_adapter(model, path)
        return "mistral"
    raise ModelLoadError("no such adapter file or folder", path=str(path))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in list(f.keys())}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read safetensors file: {e}", path=str(path)) from None


def _set_scaling(model, path: Path, r: int | None, alpha: float | None, scaling: float | None) -> None:
    mods = lora_modules(model).values()
    for m in mods:
        if r is not None and int(r) != m.rank:
            raise ModelLoadError(f"adapter rank {r} but the model's LoRA rank is {m.rank}", path=str(path))
    if scaling is None and alpha is not None:
        scaling = float(alpha) / int(r) if r else None
    if scaling is not None:
        for m in mods:
            if abs(m.scaling - scaling) > 1e-12:
                log.info("%s: using the adapter's LoRA scaling %g (was %g)", path, scaling, m.scaling)
            m.scaling = float(scaling)
            if alpha is not None:
                m.alpha = float(alpha)


def _fill(model, path: Path, named: dict[str, tuple[str, torch.Tensor]]) -> None:
    """named: native LoRA tensor name -> (name in the file, tensor in native layout)."""
    mods = lora_modules(model)
    if not mods:
        raise ModelLoadError("the model has no LoRA modules; call apply_lora() before loading an adapter", path=str(path))
    params = {}
    for name, m in mods.items():
        params[f"{name}.lora_A.weight"] = m.lora_A.weight
        params[f"{name}.lora_B.weight"] = m.lora_B.weight
    for native, (file_name, t) in named.items():
        p = params.get(native)
        if p is None:
            raise ModelLoadError("unexpected tensor: the model has no such LoRA weight (check the rank/targets given to apply_lora)",
                                 path=str(path), tensor=file_name)
        if tuple(t.shape) != tuple(p.shape):
            raise ModelLoadError(f"shape {tuple(t.shape)} but the model expects {tuple(p.shape)}", path=str(path), tensor=file_name)
    missing = sorted(set(params) - set(named))
    if missing:
        raise ModelLoadError(f"missing {len(missing)} LoRA tensor(s) the model expects", path=str(path), tensor=missing[0])
    with torch.no_grad():
        for native, (_, t) in named.items():
            params[native].copy_(t.to(device=params[native].device, dtype=params[native].dtype))


def load_mistral_adapter(model, path: str | Path) -> None:
    path = Path(path)
    tensors, meta = _read(path)
    named = {}
    for k, t in tensors.items():
        if not k.endswith(_LORA_SUFFIXES):
            raise ModelLoadError("not a LoRA tensor (expected a name ending in .lora_A.weight or .lora_B.weight)",
                                 path=str(path), tensor=k)
        named[k] = (k, t)
    _fill(model, path, named)

    def num(key, cast):
        try:
            return cast(meta[key]) if key in meta else None
        except ValueError:
            raise ModelLoadError(f"bad {key!r} in the file's metadata: {meta[key]!r}", path=str(path)) from None

    _set_scaling(model, path, num("r", int), num("lora_alpha", float), num("scaling", float))


def load_peft_adapter(model, folder: str | Path) -> None:
    folder = Path(folder)
    cfg_path, path = folder / PEFT_CONFIG, folder / PEFT_FILE
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read adapter config: {e}", path=str(cfg_path)) from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)", path=str(cfg_path))
    if cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("bias", "none") != "none":
        raise ModelLoadError("rsLoRA, DoRA and LoRA biases are not supported", path=str(cfg_path))
    if not path.is_file():
        raise ModelLoadError("adapter weights not found", path=str(path))
    tensors, _ = _read(path)
    n_heads, n_kv = _heads(model)
    mods = lora_modules(model)
    named = {}
    for k, t in tensors.items():
        hf_name = k.removeprefix(PEFT_PREFIX)
        conv = hf_to_native(hf_name)
        if conv is None or not hf_name.endswith(_LORA_SUFFIXES):
            raise ModelLoadError("unknown LoRA tensor name", path=str(path), tensor=k)
        native, rotary = conv
        if native.endswith(".lora_B.weight"):
            m = mods.get(native.removesuffix(".lora_B.weight"))
            if m is not None and tuple(t.shape) == tuple(m.lora_B.weight.shape):
                t = permute_rows(t, rotary, n_heads, n_kv, to="native")
        named[native] = (k, t)
    _fill(model, path, named)
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    _set_scaling(model, cfg_path, r, alpha, None)


__all__ = [
    "load_adapter", "load_mistral_adapter", "load_peft_adapter",
    "save_adapter", "save_mistral_adapter", "save_peft_adapter",
]


def adapter_spec(path: str | Path) -> tuple[int, tuple[str, ...]]:
    """(rank, target module names such as "wq") of the adapter at ``path``, read from
    the file's tensor names and shapes: what :func:`apply_lora` needs before loading."""
    path = Path(path)
    peft = (path / PEFT_CONFIG).is_file() if path.is_dir() else path.name == PEFT_FILE
    file = (path / (PEFT_FILE if peft else MISTRAL_FILE)) if path.is_dir() else path
    if not file.is_file():
        raise ModelLoadError(f"no {PEFT_CONFIG} nor {MISTRAL_FILE} here", path=str(path))
    ranks, targets = set(), set()
    try:
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                if not k.endswith(".lora_A.weight"):
                    continue
                module = k[: -len(".lora_A.weight")]
                if peft:
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


def merge_adapter(model, path: str | Path) -> tuple[str, int, tuple[str, ...]]:
    """Apply the adapter at ``path`` to ``model`` and fold it into the base weights (in
    float32, whatever the weights' dtype): the model is then a plain model again, as fast
    as the base. Returns (layout, rank, targets)."""
    from galerne.models.lora import apply_lora, merge_lora

    rank, targets = adapter_spec(path)
    apply_lora(model, rank=rank, alpha=float(rank), targets=targets)  # the adapter's own scaling replaces alpha
    layout = load_adapter(model, path)
    merge_lora(model)
    return layout, rank, targets
