"""LoRA fine-tuning. ``data``: mistral-finetune's JSONL formats, encoded to weighted samples
and packed; ``validate``: the checks ``galerne data validate`` runs before training."""

from galerne.finetune.data import DataError, PackedBatch, Sample, encode_sample, pack

__all__ = ["DataError", "PackedBatch", "Sample", "encode_sample", "pack"]
