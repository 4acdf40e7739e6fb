"""``galerne finetune``: a LoRA (or full-weight) training run from a :class:`FinetuneConfig`.

A run reads and checks its JSONL sources (the checks of ``galerne data validate``), mixes
them by weight with a seeded sampler, packs the samples into ``seq_len`` sequences and
trains with :func:`~galerne.finetune.train.optimizer_step` (the step of ``train_steps``).

Batches. One optimizer step consumes ``batch_size x num_microbatches x world_size``
packed sequences from one global, deterministic stream (mistral-finetune's definition:
``batch_size`` and ``num_microbatches`` are per process). Process ``r`` takes the ``r``-th
contiguous shard of ``batch_size x num_microbatches`` sequences, in micro-batches of
``batch_size`` sequences, and every loss is divided by the weight of the whole step summed
over processes. So 2 processes with ``num_microbatches: 1`` train on exactly the batches,
and the loss curve, of 1 process with ``num_microbatches: 2``.

Run folder (``run_dir``), written by process 0 only:

* ``metrics.jsonl``: a line every ``log_freq`` steps (step, loss, lr, grad_norm, tokens,
  tokens_per_s, elapsed) and one per evaluation (step, eval_loss, eval_perplexity);
* ``checkpoints/checkpoint_NNNNNN/``: the trainable weights (``lora.safetensors``, or the
  whole model as ``params.json`` + ``consolidated.safetensors``), ``optimizer.pt``,
  ``trainer_state.pt`` (scheduler, RNG states of every process), ``trainer_state.json``
  (step, data position, tokens, elapsed) and ``config.yaml``; written to a temporary folder
  then renamed; the ``num_ckpt_keep`` newest are kept;
* ``adapter/``: the final LoRA adapter in PEFT's layout (``adapter_config.json`` +
  ``adapter_model.safetensors``) and Mistral's (``lora.safetensors``); or ``model/``, the
  full fine-tuned model in the base's layout, when ``lora.enable`` is false;
* ``tb/``: TensorBoard events, only when ``tensorboard`` is installed;
* ``galerne_run.json``: the manifest of every file and folder the run created
  (:class:`~galerne.finetune.files.RunDir`): a run starts only in a new or empty folder, or
  resumes its own, and removes or replaces nothing but what it listed there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from galerne.errors import ConfigError
from galerne.finetune.config import FinetuneConfig, config_yaml, parse_sources
from galerne.finetune.data import DataError, PackedBatch, Sample, pack, pack_stream, shifted
from galerne.weights.adapters import PROJECTOR_FILE, load_projector
from galerne.finetune.evaluate import loss_sums
from galerne.finetune.evaluate import result as eval_result
from galerne.finetune.files import RunDir
from galerne.finetune.train import (
    batch_loss,
    checkpoint_blocks,
    make_optimizer,
    optimizer_step,
)
from galerne.finetune.validate import MAX_LINE_BYTES, Problem, check_file

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
CONFIG = "config.yaml"
TENSORBOARD = "tb"
# What a run writes in run_dir; the first four mean it produced something.
_RESULTS = (METRICS, CHECKPOINTS, ADAPTER_DIR, MODEL_DIR)
_OUTPUTS = (*_RESULTS, CONFIG, TENSORBOARD)
_CKPT_PREFIX = "checkpoint_"
_SHOWN_PROBLEMS = 20
# Keys a resumed run must share with the checkpoint's run (else its data position,
# or its weights, mean something else).
_RESUME_KEYS = ("lora.enable", "lora.rank", "lora.targets", "seq_len", "seed",
                "data.instruct_data", "data.data", "data.shuffle")


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # the last completed step
    losses: list[float] = field(default_factory=list)  # each step run by this call
    eval: dict[str, float] | None = None  # the last evaluation
    interrupted: bool = False
    checkpoint: Path | None = None  # the last checkpoint written
    skipped_lines: int = 0
    output: Path | None = None  # adapter/ or model/


# --------------------------------------------------------------------------- processes


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.on:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t


def init_distributed(device: str) -> Dist:
    """Under ``torchrun`` (RANK and WORLD_SIZE set): join the process group (nccl on CUDA,
    gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local)


def check_device(device: str) -> None:
    """A CUDA device asked for where there is none is a one-line ConfigError (not torch's
    assertion from deep inside the first transfer)."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        why = f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ConfigError(f"device: {device}: CUDA is not available ({why}); use device: cpu, or auto")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device: {device}: there are {torch.cuda.device_count()} GPU(s) visible (cuda:0 "
                          f"to cuda:{torch.cuda.device_count() - 1})")


def _device(cfg: FinetuneConfig, d: Dist) -> torch.device:
    from galerne.weights.loader import resolve_device

    dev = resolve_device(cfg.device)
    if dev.type == "cuda" and d.on:
        return torch.device("cuda", d.local_rank)
    return dev


def _precision(cfg: FinetuneConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype, torch.dtype | None]:
    """(dtype the base weights load in, dtype of the trained weights, autocast dtype)."""
    if cfg.dtype in ("float32", "fp32"):
        return torch.float32, torch.float32, None
    if cfg.dtype in ("bfloat16", "bf16"):
        return torch.bfloat16, torch.bfloat16, None
    if device.type == "cuda":  # auto: fp32 master weights, bf16 compute
        return (torch.bfloat16 if cfg.lora.enable else torch.float32), torch.float32, torch.bfloat16
    return torch.float32, torch.float32, None


# --------------------------------------------------------------------------- data


def read_source(path: str, tokenizer, seq_len: int, max_line_bytes: int = MAX_LINE_BYTES) -> tuple[list[Sample], list[Problem]]:
    """The samples of one JSONL file, checked as ``galerne data validate`` checks them."""
    samples: list[Sample] = []
    problems: list[Problem] = []
    for _, sample in check_file(path, tokenizer, seq_len, max_line_bytes=max_line_bytes):
        (problems if isinstance(sample, Problem) else samples).append(sample)
    return samples, problems


def load_sources(spec: str, key: str, tokenizer, seq_len: int, *, skip_bad_lines: bool,
                 max_line_bytes: int = MAX_LINE_BYTES) -> tuple[list[tuple[float, list[Sample]]], int]:
    """[(weight, samples)] of each source of ``spec``, and the count of skipped lines.
    Bad lines are an error listing them (``file:line: reason``) unless ``skip_bad_lines``."""
    out, problems = [], []
    for src in parse_sources(spec, key):
        samples, bad = read_source(src.path, tokenizer, seq_len, max_line_bytes)
        problems += bad
        out.append((src, samples))
    if problems and not skip_bad_lines:
        shown = "\n".join(str(p) for p in problems[:_SHOWN_PROBLEMS])
        more = f"\n... and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
        raise DataError(f"{len(problems)} invalid line(s) in {key} (fix them, or set skip_bad_lines: true "
                        f"to skip them):\n{shown}{more}")
    for src, samples in out:
        if not samples:
            raise DataError("no valid sample in the file", path=src.path)
    return [(src.weight, samples) for src, samples in out], len(problems)


def _epochs(samples: list[Sample], seed: int, shuffle: bool) -> Iterator[Sample]:
    epoch = 0
    while True:
        order = list(range(len(samples)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for i in order:
            yield samples[i]
        epoch += 1


def sample_stream(sources: Sequence[tuple[float, list[Sample]]], seed: int, shuffle: bool) -> Iterator[Sample]:
    """Endless: each sample comes from a source drawn with probability proportional to its
    weight (a seeded ``random.Random``); each source is read in epochs, reshuffled each."""
    picker = random.Random(seed)
    iters = [_epochs(samples, seed * 7919 + k, shuffle) for k, (_, samples) in enumerate(sources)]
    weights = [w for w, _ in sources]
    ks = range(len(iters))
    while True:
        k = picker.choices(ks, weights)[0] if len(iters) > 1 else 0
        yield next(iters[k])


def sequence_stream(sources, cfg: FinetuneConfig, pad_id: int) -> Iterator[PackedBatch]:
    """The run's global stream of packed sequences (the same on every process)."""
    return pack_stream(sample_stream(sources, cfg.seed, cfg.data.shuffle), cfg.seq_len, pad_id=pad_id)


def concat(seqs: Sequence[PackedBatch]) -> PackedBatch:
    """Sequences side by side as one micro-batch (documents stay apart: document masking)."""
    images, at = [], 0
    for s in seqs:
        images += shifted(s.images, at)
        at += len(s.tokens)
    return PackedBatch([t for s in seqs for t in s.tokens], [w for s in seqs for w in s.weights],
                       [n for s in seqs for n in s.seqlens], images)


def local_microbatches(global_batch: Sequence[PackedBatch], cfg: FinetuneConfig, d: Dist) -> list[PackedBatch]:
    per_rank = cfg.batch_size * cfg.num_microbatches
    mine = global_batch[d.rank * per_rank:(d.rank + 1) * per_rank]
    return [concat(mine[i:i + cfg.batch_size]) for i in range(0, per_rank, cfg.batch_size)]


# --------------------------------------------------------------------------- model


class LossModule(nn.Module):
    """(weighted loss sum, weight) of a micro-batch, as a module so that DDP sees the whole
    computation (the chunked logits included) inside its forward."""

    def __init__(self, model: nn.Module, vision: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.vision = vision  # a vision model's encoder (frozen) and projector (trained), for data with images

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_loss(self.model, batch, vision=self.vision)


def _sum_hook(state, bucket):
    """DDP communication hook: sum the gradients over processes (the losses are already
    divided by the global weight), instead of DDP's default mean."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _wrap(module: nn.Module, d: Dist, device: torch.device, *, find_unused: bool, shard: bool = False,
          amp_dtype: torch.dtype | None = None) -> tuple[nn.Module, Callable | None]:
    """(the module, or its distributed form under torchrun; its ``no_sync``).

    LoRA: DDP (every process holds the frozen base; only the adapter's gradients are
    all-reduced). MoE models leave the experts no token was routed to without gradient:
    DDP must look for them. ``shard`` (full-weight training): FSDP2, see :func:`_shard`.
    """
    if not d.on:
        return module, None
    if shard:
        return _shard(module, amp_dtype)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp, ddp.no_sync


def _shard(loss_module: nn.Module, amp_dtype: torch.dtype | None) -> tuple[nn.Module, Callable]:
    """FSDP2 (``fully_shard``) for full-weight training: each transformer block is one
    unit (its weights all-gathered just before its forward and backward, resharded after),
    and the root is the loss module, whose own parameters (embeddings, final norm, output)
    stay gathered through the whole loss, the chunked logits included. Each process then
    holds 1/world of the weights, gradients and AdamW state. Gradients are summed, not
    averaged, over processes (the losses are already divided by the global weight), as
    DDP's hook does. With an autocast dtype (CUDA), the weights are gathered in that dtype
    and the gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else MixedPrecisionPolicy()
    units = [fully_shard(block, mp_policy=mp) for block in loss_module.model.layers]
    root = fully_shard(loss_module, mp_policy=mp)
    for unit in (*units, root):
        unit.set_gradient_divide_factor(1.0)
        if hasattr(unit, "set_force_sum_reduction_for_comms"):  # torch 2.12+
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM

    @contextlib.contextmanager
    def no_sync():
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)

    return root, no_sync


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def build_model(cfg: FinetuneConfig, folder: Path, device: torch.device) -> tuple[nn.Module, Any]:
    from galerne.models.lora import apply_lora
    from galerne.weights.loader import load_model

    load_dtype, train_dtype, _ = _precision(cfg, device)
    model, ckpt = load_model(folder, dtype=load_dtype, device=device, progress=False)
    if cfg.lora.enable:
        torch.manual_seed(cfg.seed)  # lora_A's init
        try:
            apply_lora(model, cfg.lora.rank, cfg.lora.scaling * cfg.lora.rank, cfg.lora.dropout, cfg.lora.targets)
        except ValueError as e:
            raise ConfigError(f"lora.targets: {e}") from None
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    for p in model.parameters():
        if p.requires_grad and p.dtype != train_dtype:
            p.data = p.data.to(train_dtype)
    blocks = checkpointed_blocks(cfg, model, device)
    if blocks:
        checkpoint_blocks(model, blocks)
    return model, ckpt


def build_vision(cfg: FinetuneConfig, ckpt, sources, eval_batches, dtype: torch.dtype, device: torch.device,
                 d: Dist) -> nn.Module | None:
    """The base's vision encoder (frozen) and projector (trained), when the data holds
    images; None otherwise (a vision model trained on text keeps its projector as it is)."""
    if not any(s.images for _, group in sources for s in group) and not any(b.images for b in eval_batches):
        return None
    from galerne.weights.loader import load_vision

    if not cfg.lora.enable and d.world > 1:
        raise ConfigError("fine-tuning all weights on data with images runs in one process for now (FSDP shards "
                          "the language model only); use LoRA, or nproc 1")
    vision = load_vision(ckpt, dtype=dtype, device=device)
    if vision is None:
        raise ConfigError(f"the data holds images but {cfg.model_id_or_path} has no vision encoder")
    vision.train_projector()
    return vision


def checkpointed_blocks(cfg: FinetuneConfig, model: nn.Module, device: torch.device) -> int:
    """How many transformer blocks run under activation checkpointing: ``checkpoint``
    true: all, false: none, auto: :func:`~galerne.finetune.memory.choose_checkpointing`'s
    plan for a micro-batch of ``batch_size x seq_len`` tokens, logged with its reason."""
    n = len(model.layers)
    if cfg.checkpoint != "auto":
        return n if cfg.checkpoint == "true" else 0
    from galerne.finetune.memory import choose_checkpointing

    load_dtype, train_dtype, amp_dtype = _precision(cfg, device)
    plan = choose_checkpointing(model, device, cfg.seq_len * cfg.batch_size, amp_dtype or load_dtype,
                                lora_rank=cfg.lora.rank if cfg.lora.enable else 0,
                                amp_copies=amp_dtype is not None and not cfg.lora.enable,
                                limit_bytes=int(cfg.max_memory_gb * 1e9) if cfg.max_memory_gb else None)
    log.info("checkpoint: auto: checkpointing %d of %d blocks on %s: %s", plan.blocks, n, device, plan.reason)
    return plan.blocks


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_CKPT_PREFIX) and p.name[len(_CKPT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_CKPT_PREFIX):]))


def find_checkpoint(run_dir: Path, resume: str | Path | bool | None) -> Path | None:
    """``resume``: None/False: none; True or "latest": the newest of ``run_dir``; else a path."""
    if resume in (None, False):
        return None
    if resume is True or resume == "latest":
        found = checkpoint_dirs(run_dir)
        if not found:
            raise ConfigError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS}")
        return found[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"--resume: {path} is not a checkpoint folder (no trainer_state.json)")
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_pt(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, no code
    run from the file. A file it refuses is refused here, with torch's reason."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(str(e))
        raise ConfigError(f"--resume: refused: not a weights-only file ({reason}); galerne loads checkpoints "
                          "with torch.load(weights_only=True), which runs no code from a file", path=str(path)) from None
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise ConfigError(f"--resume: cannot read: {_first_line(e)}", path=str(path)) from None


def _unpickler_reason(message: str) -> str:
    """The line of torch's weights-only refusal that says what was refused (its message
    wraps it in paragraphs of advice, which vary between torch versions)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", message)
    if found:
        return found.group(1).strip().rstrip(".")
    advice = ("Weights only load failed", "Check the documentation", "Please file", "(1)", "(2)")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(advice)]
    return (useful or lines or ["refused"])[0].rstrip(".")


def _read_state_json(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        for key in ("step", "sequences", "tokens", "elapsed"):
            if not isinstance(info.get(key), (int, float)):
                raise ValueError(f"no number {key!r}")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"--resume: cannot read: {_first_line(e)}", path=str(path)) from None
    return info


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Progress:
    """Where a run stands: what a checkpoint restores besides weights and optimizer."""

    step: int = 0
    sequences: int = 0  # global packed sequences consumed: the data position
    tokens: int = 0
    elapsed: float = 0.0

    def advance(self, sequences: int, seq_len: int, elapsed: float) -> None:
        self.step += 1
        self.sequences += sequences
        self.tokens += sequences * seq_len
        self.elapsed = elapsed


class Run:
    """One training run's state and outputs."""

    def __init__(self, cfg: FinetuneConfig, d: Dist, run_dir: RunDir, base: Path, model: nn.Module, ckpt_info,
                 opt: torch.optim.Optimizer, sched, vision: nn.Module | None = None):
        self.cfg, self.d, self.dir, self.run_dir, self.base = cfg, d, run_dir, run_dir.path, base
        self.model, self.ckpt_info, self.opt, self.sched = model, ckpt_info, opt, sched
        self.vision = vision  # trained on data with images: its projector is saved with the weights
        self.progress = Progress()
        self.last_checkpoint: Path | None = None
        self.on_checkpoint: Callable[[Path, int], None] | None = None

    # -- saving
    def save_checkpoint(self, *, gather: bool = True) -> Path | None:
        states = [_rng_state()]
        if self.d.on and gather:
            import torch.distributed as dist

            states = [None] * self.d.world
            dist.all_gather_object(states, _rng_state())
        weights = opt_state = None
        if self.sharded:  # every process takes part in gathering the shards
            if not gather:
                log.warning("interrupted: FSDP shards cannot be gathered without every process; no checkpoint saved")
                return None
            weights, opt_state = self._full_state(), self._full_optimizer_state()
        if not self.d.main:
            return None
        p = self.progress
        rel = f"{CHECKPOINTS}/{_CKPT_PREFIX}{p.step:06d}"
        with self.dir.staged(rel) as tmp:  # written aside, then renamed
            self._save_weights(tmp, weights)
            torch.save(opt_state if opt_state is not None else self.opt.state_dict(), tmp / "optimizer.pt")
            torch.save({"scheduler": self.sched.state_dict(), "rng": states}, tmp / "trainer_state.pt")
            info = {"step": p.step, "sequences": p.sequences, "tokens": p.tokens, "elapsed": p.elapsed,
                    "world_size": self.d.world, "lora": self.cfg.lora.enable, "fsdp": self.sharded}
            (tmp / "trainer_state.json").write_text(json.dumps(info, indent=2) + "\n")
            (tmp / CONFIG).write_text(config_yaml(self.cfg))
        for old in self._own_checkpoints()[:-self.cfg.num_ckpt_keep]:
            self.dir.remove(old)
        self.last_checkpoint = self.run_dir / rel
        log.info("saved checkpoint %s", self.last_checkpoint)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.last_checkpoint, p.step)
        return self.last_checkpoint

    def _own_checkpoints(self) -> list[str]:
        """The checkpoints this run (or the run it resumes) wrote, oldest first."""
        prefix = f"{CHECKPOINTS}/{_CKPT_PREFIX}"
        found = [k for k, kind in self.dir.entries.items()
                 if kind == "dir" and k.startswith(prefix) and k[len(prefix):].isdigit() and self.dir.exists(k)]
        return sorted(found, key=lambda k: int(k[len(prefix):]))

    @property
    def sharded(self) -> bool:
        """FSDP2: the weights and optimizer state are DTensor shards, one per process."""
        return _is_sharded(self.model)

    def _full_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict, gathered on the CPU of process 0 (a collective:
        every process calls it; the others get an empty dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _full_optimizer_state(self) -> dict[str, Any]:
        """AdamW's state gathered on process 0, keyed by parameter name (a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _save_weights(self, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        from galerne.weights.adapters import save_mistral_adapter
        from galerne.weights.export import save_model

        if self.cfg.lora.enable:
            save_mistral_adapter(self.model, folder)
        else:  # the trained dtype, for an exact resume; ``folder`` is still empty
            save_model(self.model, folder, "mistral", companions_from=self.base, progress=False, state_dict=state)
        self._save_projector(folder)

    def _save_projector(self, folder: Path) -> None:
        """The projector trained on images, beside the adapter or weights (PROJECTOR_FILE)."""
        if self.vision is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in self.vision.projector_state().items()},
                      str(folder / PROJECTOR_FILE))

    def save_outputs(self) -> Path | None:
        state = self._full_state() if self.sharded and self.cfg.save_adapters else None  # every process
        if not (self.d.main and self.cfg.save_adapters):
            return None
        if self.cfg.lora.enable:
            from galerne.weights.adapters import save_mistral_adapter, save_peft_adapter

            with self.dir.staged(ADAPTER_DIR) as out:
                save_peft_adapter(self.model, out, base_model_name_or_path=self.cfg.model_id_or_path)
                save_mistral_adapter(self.model, out)
                self._save_projector(out)
            return self.run_dir / ADAPTER_DIR
        from galerne.weights.export import save_model

        stored = next(t for _, _, t in self.ckpt_info.tensors(meta=True)).dtype  # the base's dtype
        with self.dir.staged(MODEL_DIR) as out:
            save_model(self.model, out, self.ckpt_info.layout, companions_from=self.base, progress=False,
                       dtype=str(stored).removeprefix("torch."), state_dict=state, vision=self.vision)
        return self.run_dir / MODEL_DIR

    # -- loading
    def load_checkpoint(self, folder: Path) -> None:
        """Restore the run from ``folder``. A file that is not what galerne writes there (a
        pickle that ``torch.load(weights_only=True)`` refuses, a truncated file, other keys) is
        a ConfigError naming it, before any training."""
        info = _read_state_json(folder / "trainer_state.json")
        self._check_resume_config(folder)
        self._load_weights(folder)
        opt_state = _load_pt(folder / "optimizer.pt")
        state = _load_pt(folder / "trainer_state.pt")
        try:
            if self.sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.model, self.opt, opt_state, options=StateDictOptions(full_state_dict=True))
            else:
                self.opt.load_state_dict(opt_state)
            self.sched.load_state_dict(state["scheduler"])
            rngs = state["rng"]
            _set_rng_state(rngs[self.d.rank] if self.d.rank < len(rngs) else rngs[0])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"--resume: the optimizer or trainer state does not fit this run: {_first_line(e)}",
                              path=str(folder)) from None
        self.progress = Progress(*(info[k] for k in ("step", "sequences", "tokens", "elapsed")))
        self.last_checkpoint = folder

    def _check_resume_config(self, folder: Path) -> None:
        from galerne.finetune.config import load_config

        saved = load_config(folder / "config.yaml").to_dict()
        now = self.cfg.to_dict()
        for key in _RESUME_KEYS:
            a, b = saved, now
            for part in key.split("."):
                a, b = a[part], b[part]
            if a != b:
                raise ConfigError(f"--resume: {key} is {b!r} but the checkpoint's run used {a!r}", path=str(folder))

    def _load_weights(self, folder: Path) -> None:
        if self.vision is not None:
            load_projector(self.vision, folder / PROJECTOR_FILE)
        if self.cfg.lora.enable:
            from galerne.weights.adapters import load_mistral_adapter

            load_mistral_adapter(self.model, folder / "lora.safetensors")
            return
        from galerne.weights.loader import Checkpoint

        if self.sharded:  # each process reads the whole file and keeps its shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            full = {native: t for _, _, native, t in Checkpoint.open(folder, "mistral").native_tensors()}
            set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for _, _, native, t in Checkpoint.open(folder, "mistral").native_tensors():
                if native in params:
                    params[native].copy_(t.to(params[native].dtype))


# --------------------------------------------------------------------------- logging


class Metrics:
    """metrics.jsonl (+ TensorBoard when installed), process 0 only."""

    def __init__(self, run_dir: RunDir, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.dir = run_dir
        self.path = run_dir.path / METRICS
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():  # drop what came after the checkpoint
            run_dir.write_text(METRICS, "".join(line + "\n" for line in _rows_until(self.path, resume_step)))
        run_dir.claim(METRICS, "file")
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(str(run_dir.mkdir(TENSORBOARD)))
        run_dir.claim_new_files(TENSORBOARD)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.dir.claim_new_files(TENSORBOARD)


def _rows_until(path: Path, step: int) -> list[str]:
    """The lines of a metrics file up to ``step``; a line cut short (the run was killed
    while writing it) is dropped, with a warning."""
    keep, cut = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            cut += bool(line.strip())
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    if cut:
        log.warning("%s: dropped %d unreadable line(s) (a run killed while writing them)", path, cut)
    return keep


class StopRequest:
    """SIGINT/SIGTERM ask the run to stop after the current step (and save a checkpoint);
    a second Ctrl-C stops at once (still saving the last completed step)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step; a checkpoint will be saved (Ctrl-C again to stop now)")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- the run


def evaluate(model: nn.Module, batches: Sequence[PackedBatch], d: Dist, amp_dtype: torch.dtype | None,
             loss_module: nn.Module | None = None, vision: nn.Module | None = None) -> dict[str, float]:
    """Weighted loss over every trained token of the eval set (sharded over processes), and
    its perplexity exp(loss). Under FSDP the forward goes through ``loss_module`` (the root
    gathers the embeddings and output) and every process runs the same number of forwards
    (each one all-gathers every block's weights): a process short of a batch runs its first
    one again and drops the result."""
    device = next(model.parameters()).device
    mine = list(batches[d.rank::d.world])
    if loss_module is not None and _is_sharded(model):
        sums = loss_sums(loss_module, mine, amp_dtype=amp_dtype, loss_fn=loss_module)
        short = -(-len(batches) // d.world) - len(mine)
        loss_sums(loss_module, batches[:1] * short, amp_dtype=amp_dtype, loss_fn=loss_module)  # the collectives only
    else:
        sums = loss_sums(model, mine, amp_dtype=amp_dtype,
                         loss_fn=None if vision is None else lambda b: batch_loss(model, b, vision=vision))
    total = torch.tensor(sums, dtype=torch.float64, device=device)
    d.all_reduce(total)
    r = eval_result(float(total[0]), float(total[1]))
    return {"eval_loss": r.loss, "eval_perplexity": r.perplexity}


def train(
    cfg: FinetuneConfig,
    *,
    resume: str | Path | bool | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    progress_bar: bool | None = None,
) -> TrainResult:
    """Run (or resume) the training ``cfg`` describes; see the module docstring.

    ``on_log`` receives each metrics row (every process); ``on_checkpoint`` (folder, step)
    each checkpoint once written (process 0). A KeyboardInterrupt (or SIGINT /
    SIGTERM) saves a checkpoint of the last completed step, then the result comes back with
    ``interrupted=True``. ``progress_bar``: None: a tqdm bar on a terminal only.
    """
    from tqdm import tqdm

    from galerne.tokenizer import Tokenizer
    from galerne.weights.loader import resolve_model_path

    cfg.require_paths()
    check_device(cfg.device)
    d = init_distributed(cfg.device)
    device = _device(cfg, d)
    run_dir = RunDir(cfg.run_dir)
    resume_from = find_checkpoint(run_dir.path, resume)
    if d.main:  # the only process that writes there
        run_dir.check(resuming=resume_from is not None, results=_RESULTS, strict=_OUTPUTS,
                      has_checkpoint=bool(checkpoint_dirs(run_dir.path)))
    base = resolve_model_path(cfg.model_id_or_path)
    tokenizer = Tokenizer.from_path(base)
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0  # padding has weight 0 anyway
    sources, eval_batches, skipped = load_data(cfg, tokenizer, pad_id)

    model, ckpt_info = build_model(cfg, base, device)
    _, train_dtype, amp_dtype = _precision(cfg, device)
    vision = build_vision(cfg, ckpt_info, sources, eval_batches, train_dtype, device, d)
    # Wrapped before the optimizer is made: FSDP2 replaces the parameters by their shards.
    loss_module, no_sync = _wrap(LossModule(model, vision), d, device, find_unused=model.args.moe is not None,
                                 shard=not cfg.lora.enable, amp_dtype=amp_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    if vision is not None:
        params += [p for p in vision.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps)
    run = Run(cfg, d, run_dir, base, model, ckpt_info, opt, sched, vision)
    run.on_checkpoint = on_checkpoint
    torch.manual_seed(cfg.seed + d.rank)  # dropout
    random.seed(cfg.seed)
    if resume_from is not None:
        run.load_checkpoint(resume_from)
    if d.main:
        run_dir.open()
        run_dir.write_text(CONFIG, config_yaml(cfg))

    p = run.progress
    result = TrainResult(run_dir.path, p.step, skipped_lines=skipped, checkpoint=run.last_checkpoint)
    metrics = Metrics(run_dir, d.main, p.step if resume_from is not None else None)
    stream = sequence_stream(sources, cfg, pad_id)
    for _ in range(p.sequences):  # data position: continue with exactly the next batch
        next(stream)
    per_step = cfg.batch_size * cfg.num_microbatches * d.world
    bar = tqdm(total=cfg.max_steps, initial=p.step, unit="step", desc="finetune", dynamic_ncols=True,
               disable=(None if progress_bar is None else not progress_bar) if d.main else True)

    def emit(row: dict[str, Any]) -> None:
        metrics.write(row)
        if on_log is not None:
            on_log(row)

    model.train()
    started = time.perf_counter() - p.elapsed
    try:
        with StopRequest() as stop:
            while p.step < cfg.max_steps:
                global_batch = [next(stream) for _ in range(per_step)]
                stats = optimizer_step(loss_module, local_microbatches(global_batch, cfg, d), params, opt, sched,
                                       grad_clip=cfg.grad_clip, amp_dtype=amp_dtype,
                                       all_reduce=d.all_reduce if d.on else None, no_sync=no_sync)
                p.advance(per_step, cfg.seq_len, time.perf_counter() - started)
                result.losses.append(stats.loss)
                tok_s = p.tokens / p.elapsed if p.elapsed > 0 else 0.0
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
                if _due(p.step, cfg.log_freq, cfg.max_steps):
                    emit({"step": p.step, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                          "tokens": p.tokens, "tokens_per_s": tok_s, "elapsed": p.elapsed})
                if eval_batches and _due(p.step, cfg.eval_freq, cfg.max_steps):
                    result.eval = evaluate(model, eval_batches, d, amp_dtype, loss_module, vision)
                    emit({"step": p.step, **result.eval})
                if cfg.ckpt_freq and _due(p.step, cfg.ckpt_freq, cfg.max_steps):
                    run.save_checkpoint()
                if bool(d.all_reduce(torch.tensor([float(stop.requested)], device=device), "max")[0]):
                    result.interrupted = True  # every process agrees: stop here
                    break
    except KeyboardInterrupt:  # raised anywhere, on this process only: no collective
        result.interrupted = True
        gather = False
    else:
        gather = True
    finally:
        bar.close()
        metrics.close()
    if result.interrupted:
        if run.last_checkpoint is None or run.last_checkpoint.name != f"{_CKPT_PREFIX}{p.step:06d}":
            run.save_checkpoint(gather=gather)
        log.warning("interrupted after step %d; checkpoint: %s", p.step, run.last_checkpoint)
    result.step = p.step
    result.checkpoint = run.last_checkpoint
    if not result.interrupted:
        if eval_batches and result.eval is None and p.step == cfg.max_steps and not result.losses:
            result.eval = evaluate(model, eval_batches, d, amp_dtype, loss_module, vision)  # resumed at the end: evaluate anyway
        result.output = run.save_outputs()
    return result


def _due(step: int, freq: int, max_steps: int) -> bool:
    """Every ``freq`` steps (0: never), and at the last step."""
    return step == max_steps or (freq > 0 and step % freq == 0)


def load_data(cfg: FinetuneConfig, tokenizer, pad_id: int) -> tuple[list[tuple[float, list[Sample]]], list[PackedBatch], int]:
    """(weighted training sources, packed eval sequences, count of skipped lines)."""
    sources, skipped = [], 0
    for key, spec in (("data.instruct_data", cfg.data.instruct_data), ("data.data", cfg.data.data)):
        if spec:
            found, bad = load_sources(spec, key, tokenizer, cfg.seq_len, skip_bad_lines=cfg.skip_bad_lines,
                                      max_line_bytes=cfg.data.max_line_bytes)
            sources += found
            skipped += bad
    eval_batches: list[PackedBatch] = []
    if cfg.data.eval_instruct_data:
        found, bad = load_sources(cfg.data.eval_instruct_data, "data.eval_instruct_data", tokenizer, cfg.seq_len,
                                  skip_bad_lines=cfg.skip_bad_lines, max_line_bytes=cfg.data.max_line_bytes)
        eval_batches = pack([s for _, group in found for s in group], cfg.seq_len, pad_id=pad_id)
        skipped += bad
    if skipped:
        log.warning("skipped %d invalid line(s) (skip_bad_lines)", skipped)
    if cfg.eval_freq and not eval_batches:
        log.warning("eval_freq is set but data.eval_instruct_data is empty: no evaluation")
    return sources, eval_batches, skipped


__all__ = ["TrainResult", "checkpoint_dirs", "evaluate", "find_checkpoint", "load_data", "train"]
