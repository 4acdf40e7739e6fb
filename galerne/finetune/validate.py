"""``galerne data validate``: check JSONL training files before a run, line by line."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galerne.errors import InvalidParameter
from galerne.finetune.data import DataError, Sample, encode_sample
from galerne.finetune.files import atomic_write

# The longest line read (bytes, newline excluded): a longer one is a problem of its line,
# skipped without being read whole into memory. A 128k-token conversation is well under 1 MB.
MAX_LINE_BYTES = 8 * 1024 * 1024
_CHUNK = 1 << 20


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
        return self.tokens / check_speed(tokens_per_s)

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


def check_speed(tokens_per_s: float) -> float:
    """``tokens_per_s`` if it is a positive finite number, else an InvalidParameter."""
    if not (isinstance(tokens_per_s, (int, float)) and math.isfinite(tokens_per_s) and tokens_per_s > 0):
        raise InvalidParameter("--tokens-per-s", f"must be a positive number, got {tokens_per_s}")
    return tokens_per_s


def check_limits(seq_len: int, max_line_bytes: int) -> None:
    if seq_len < 1:
        raise InvalidParameter("--seq-len", f"must be a positive integer, got {seq_len}")
    if max_line_bytes < 1:
        raise InvalidParameter("--max-line-bytes", f"must be a positive integer, got {max_line_bytes}")


def validate_files(
    paths: Sequence[str | Path], tokenizer, seq_len: int, *, clean: str | Path | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Report:
    """Check every line of the JSONL ``paths``; with ``clean``, write the valid lines there
    (their bytes unchanged; a newline is added after a last line that lacks one).

    ``clean`` is checked before any input is read: it must not be a folder nor one of
    ``paths``. The lines go to a temporary file beside it, renamed to ``clean`` once every
    input has been read: until then (and if validation fails) ``clean`` is left as it was."""
    check_limits(seq_len, max_line_bytes)
    if clean is not None:
        _check_output(Path(clean), paths)
    report = Report()
    try:
        with atomic_write(clean) if clean is not None else contextlib.nullcontext() as out:
            for path in paths:
                for raw, sample in check_file(path, tokenizer, seq_len, max_line_bytes=max_line_bytes):
                    report.lines += 1
                    if isinstance(sample, Problem):
                        report.problems.append(sample)
                        continue
                    report.samples += 1
                    report.tokens += len(sample.tokens)
                    report.trained_tokens += sample.trained_tokens
                    if out is not None:
                        out.write(raw if raw.endswith(b"\n") else raw + b"\n")
    except OSError as e:  # reading errors are DataErrors of their file: this is the output's
        raise DataError(f"--clean {clean}: cannot write: {e.strerror or e}") from None
    return report


def _check_output(out: Path, inputs: Sequence[str | Path]) -> None:
    """Refuse, before anything is read or written, an output that cannot take the clean lines
    or that would replace an input."""
    where = f"--clean {out}"
    if out.is_dir():
        raise DataError(f"{where}: is a folder; give the path of the file to write")
    if out.exists() and not out.resolve().is_file():
        raise DataError(f"{where}: is not a regular file")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise DataError(f"{where}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"{where}: cannot write in the folder {parent} (permission denied)")
    for path in inputs:
        try:
            same = os.path.samefile(out, path)
        except OSError:  # either does not exist: not the same file
            same = False
        if same:
            raise DataError(f"{where}: is the input file {path}; write the clean lines to another file")


def check_file(path: str | Path, tokenizer, seq_len: int, *,
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[bytes, Sample | Problem]]:
    """(raw bytes, the encoded sample or its problem) for each line of the JSONL file
    ``path``: the checks of ``galerne data validate``, shared with training. An unreadable
    file is a ``DataError`` naming it. A line longer than ``max_line_bytes`` is a problem,
    read in chunks and dropped (its raw bytes come back empty)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", path=str(path)) from None
    with f:
        for n, (raw, size) in enumerate(_read(f, path, max_line_bytes), start=1):
            if raw is None:
                yield b"", Problem(str(path), n, f"line of {size} bytes, over the limit of {max_line_bytes} "
                                                 "(max_line_bytes): not read")
                continue
            try:
                yield raw, _check_line(raw, tokenizer, seq_len)
            except DataError as e:
                yield raw, Problem(str(path), n, e.reason)


def _read(f, path, limit: int) -> Iterator[tuple[bytes | None, int]]:
    try:
        yield from _lines(f, limit)
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path=str(path)) from None


def _lines(f, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """(the line, or None when it is longer than ``limit`` bytes; its length without the
    newline). A long line is read in chunks of at most ``limit + 1`` bytes, not kept."""
    chunk = min(_CHUNK, limit + 1)
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if raw.endswith(b"\n") or len(raw) <= limit:
            yield raw, len(raw) - raw.endswith(b"\n")
            continue
        size = len(raw)
        while True:
            raw = f.readline(chunk)
            if not raw:
                break
            size += len(raw)
            if raw.endswith(b"\n"):
                size -= 1
                break
        yield None, size


_TOO_DEEP = "JSON nested too deeply to read (past Python's recursion limit)"


def _check_unicode(obj: Any) -> None:
    """A string (or key) with a lone surrogate (``"\\ud800"`` without its pair) is valid JSON
    but not Unicode text: no tokenizer can encode it. Names the field."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, x = stack.pop()
        if isinstance(x, dict):
            for k, v in x.items():
                stack.append((where, k))
                stack.append((f"{where}.{k}" if where else str(k), v))
        elif isinstance(x, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(x))
        elif isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as e:
                field = f"{where}: " if where else ""
                raise DataError(f"{field}lone surrogate \\u{ord(x[e.start]):04x} in a string (half of a "
                                "UTF-16 pair: not valid Unicode)") from None


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
    except RecursionError:
        raise DataError(_TOO_DEEP) from None
    if "\\u" in text:  # only a \uXXXX escape can make half of a UTF-16 surrogate pair
        _check_unicode(obj)
    try:
        sample = encode_sample(tokenizer, obj)
    except RecursionError:
        raise DataError(_TOO_DEEP) from None
    if len(sample.tokens) > seq_len:
        raise DataError(f"{len(sample.tokens)} tokens > seq_len {seq_len}")
    if sample.trained_tokens == 0:
        raise DataError("no trained tokens (every assistant message has weight 0)")
    return sample
