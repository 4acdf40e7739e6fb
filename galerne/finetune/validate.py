"""``galerne data validate``: check JSONL training files before a run, line by line."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from galerne.finetune.data import DataError, Sample, encode_sample


@dataclass
class Problem:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    lines: int = 0
    samples: int = 0  # valid lines
    tokens: int = 0  # in the valid samples
    trained_tokens: int = 0  # weight > 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def eta_seconds(self, tokens_per_s: float) -> float:
        """Time for one pass over the valid samples at ``tokens_per_s`` (padding not counted)."""
        return self.tokens / tokens_per_s

    def summary(self, tokens_per_s: float | None = None) -> str:
        out = [
            f"lines: {self.lines}",
            f"valid samples: {self.samples}",
            f"problems: {len(self.problems)}",
            f"tokens: {self.tokens}",
            f"trained tokens: {self.trained_tokens}",
        ]
        if tokens_per_s:
            s = self.eta_seconds(tokens_per_s)
            out.append(f"eta per epoch: {s:.0f} s ({s / 3600:.2f} h) at {tokens_per_s:g} tokens/s")
        return "\n".join(out)


def validate_files(
    paths: Sequence[str | Path], tokenizer, seq_len: int, *, clean: str | Path | None = None
) -> Report:
    """Check every line of the JSONL ``paths``; with ``clean``, write the valid lines there
    (their bytes unchanged; a newline is added after a last line that lacks one)."""
    report = Report()
    with open(clean, "wb") if clean is not None else contextlib.nullcontext() as out:
        for path in paths:
            for raw, sample in check_file(path, tokenizer, seq_len):
                report.lines += 1
                if isinstance(sample, Problem):
                    report.problems.append(sample)
                    continue
                report.samples += 1
                report.tokens += len(sample.tokens)
                report.trained_tokens += sample.trained_tokens
                if out is not None:
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
    return report


def check_file(path: str | Path, tokenizer, seq_len: int) -> Iterator[tuple[bytes, Sample | Problem]]:
    """(raw bytes, the encoded sample or its problem) for each line of the JSONL file
    ``path``: the checks of ``galerne data validate``, shared with training. An unreadable
    file is a ``DataError`` naming it."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", path=str(path)) from None
    with f:
        for n, raw in enumerate(f, start=1):
            try:
                yield raw, _check_line(raw, tokenizer, seq_len)
            except DataError as e:
                yield raw, Problem(str(path), n, e.reason)


def _check_line(raw: bytes, tokenizer, seq_len: int):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8: {e.reason} at byte {e.start}") from e
    if not text.strip():
        raise DataError("empty line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"bad JSON: {e.msg} (column {e.colno})") from e
    sample = encode_sample(tokenizer, obj)
    if len(sample.tokens) > seq_len:
        raise DataError(f"{len(sample.tokens)} tokens > seq_len {seq_len}")
    if sample.trained_tokens == 0:
        raise DataError("no trained tokens (every assistant message has weight 0)")
    return sample
