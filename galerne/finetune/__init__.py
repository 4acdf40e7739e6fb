"""LoRA fine-tuning. ``data``: mistral-finetune's JSONL formats, encoded to weighted samples
and packed; ``validate``: the checks ``galerne data validate`` runs before training;
``train``: the loss and the optimizer step; ``config`` and ``trainer``: ``galerne finetune``
(YAML config, checkpoints, resume, evaluation, DDP)."""

from galerne.finetune.data import DataError, PackedBatch, Sample, encode_sample, pack

__all__ = ["DataError", "PackedBatch", "Sample", "encode_sample", "pack"]
