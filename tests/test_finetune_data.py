"""Fine-tuning data: mistral-finetune's JSONL formats, weights, validation, packing."""

from __future__ import annotations

import json
import os

import pytest
from conftest import TOKENIZERS, V3_TOKENIZER

from galerne.cli import main
from galerne.finetune.data import (
    DataError,
    Sample,
    decode_weighted,
    encode_sample,
    pack,
)
from galerne.finetune.validate import validate_files
from galerne.tokenizer import Tokenizer

V7_TOKENIZER = TOKENIZERS / "mistral_instruct_tokenizer_241114.model.v7"

CONV = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add numbers",
          "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
FC = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "add 2"},
        {"role": "assistant", "tool_calls": [
            {"id": "abcDEF123", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
    ],
}


@pytest.fixture(scope="module")
def v3():
    return Tokenizer.from_path(V3_TOKENIZER)


@pytest.fixture(scope="module")
def v7():
    return Tokenizer.from_path(V7_TOKENIZER)


def test_weights_cover_exactly_the_assistant_tokens(v3):
    s = encode_sample(v3, CONV)
    assert len(s.tokens) == len(s.weights)
    assert s.weights[0] == 0 and s.tokens[0] == v3.bos_id
    assert decode_weighted(v3, s, keep_special=True) == "Hello there</s>It is 4.</s>"
    # Trained runs are exactly the assistant contents + EOS; everything else weighs 0.
    runs, cur = [], []
    for t, w in zip(s.tokens, s.weights):
        if w > 0:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur)
    assert [r[-1] for r in runs] == [v3.eos_id, v3.eos_id]
    assert [v3.decode(r) for r in runs] == ["Hello there", "It is 4."]
    untrained = v3.decode([t for t, w in zip(s.tokens, s.weights) if w == 0])
    assert "Be brief." in untrained and "Hi" in untrained and "What is 2+2?" in untrained
    assert "Hello there" not in untrained


def test_message_weight_zero(v3):
    conv = json.loads(json.dumps(CONV))
    conv["messages"][2]["weight"] = 0
    s = encode_sample(v3, conv)
    assert decode_weighted(v3, s, keep_special=True) == "It is 4.</s>"
    assert s.tokens == encode_sample(v3, CONV).tokens


def test_pretraining(v3):
    s = encode_sample(v3, {"text": "Hello world"})
    assert s.tokens == v3.encode("Hello world", bos=True, eos=True)
    assert s.weights == [0.0] + [1.0] * (len(s.tokens) - 1)


@pytest.mark.parametrize("which", ["v3", "v7"])
def test_function_calling(which, request):
    tok = request.getfixturevalue(which)
    s = encode_sample(tok, FC)
    trained = decode_weighted(tok, s, keep_special=True)
    assert trained.startswith("[TOOL_CALLS]") and '"abcDEF123"' in trained
    assert trained.endswith("</s>It is 4.</s>")
    untrained = tok.decode([t for t, w in zip(s.tokens, s.weights) if w == 0], keep_special=True)
    assert "[AVAILABLE_TOOLS]" in untrained and "[TOOL_RESULTS]" in untrained
    assert "It is 4." not in untrained


def _msgs(*messages, **extra):
    return json.dumps({"messages": list(messages), **extra})


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
BAD_LINES = [
    ("{not json", "bad JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"foo": 1}', 'neither "text"'),
    (_msgs(U, {"role": "robot", "content": "x"}, A), "unknown role 'robot'"),
    (_msgs(U, A, U), "last message is from the user"),
    (_msgs(U, {"role": "assistant"}), "neither content nor tool_calls"),
    (_msgs(U, {"role": "assistant", "tool_calls": [{"id": "call_1", "function": {"name": "f", "arguments": "{}"}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "1"}, A, tools=TOOLS),
     "is not 9 alphanumeric characters"),
    (_msgs(U, {"role": "tool", "tool_call_id": "abcDEF123", "content": "1"}, A), "answers no call made before it"),
    ('{"text": "  "}', "empty text"),
    (json.dumps({"text": "word " * 300}), "tokens > seq_len 128"),
]
GOOD_LINES = [json.dumps(CONV), json.dumps({"text": "Just some text."}), json.dumps(FC)]


def _write(tmp_path):
    # good, bad, good, bad, ... so that each reason has its own line number.
    lines = []
    for i, (bad, _) in enumerate(BAD_LINES):
        lines += [GOOD_LINES[i % len(GOOD_LINES)], bad]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path, lines


def test_validate_files_reports_each_reason_with_its_line(tmp_path, v3):
    path, lines = _write(tmp_path)
    clean = tmp_path / "clean.jsonl"
    report = validate_files([path], v3, 128, clean=clean)
    assert report.lines == len(lines)
    assert report.samples == len(BAD_LINES)
    assert len(report.problems) == len(BAD_LINES)
    for i, (problem, (_, reason)) in enumerate(zip(report.problems, BAD_LINES)):
        assert problem.path == str(path) and problem.line == 2 * i + 2
        assert reason in problem.reason, (problem, reason)
    # The counts are the valid lines' samples' (the odd lines), encoded one by one.
    valid = [encode_sample(v3, json.loads(lines[i])) for i in range(0, len(lines), 2)]
    tokens = sum(len(s.tokens) for s in valid)
    assert (report.tokens, report.trained_tokens) == (tokens, sum(s.trained_tokens for s in valid))
    assert report.eta_seconds(100.0) == pytest.approx(tokens / 100.0)  # an epoch at 100 tokens/s
    # --clean keeps exactly the valid lines, bytes unchanged.
    assert clean.read_bytes() == "".join(lines[i] + "\n" for i in range(0, len(lines), 2)).encode()


def test_cli_data_validate(tmp_path, capsys):
    path, _ = _write(tmp_path)
    clean = tmp_path / "clean.jsonl"
    args = ["data", "validate", str(path), "--tokenizer", str(V3_TOKENIZER), "--seq-len", "128"]
    assert main(args + ["--clean", str(clean), "--tokens-per-s", "1000"]) == 1
    out = capsys.readouterr().out
    for i, (_, reason) in enumerate(BAD_LINES):
        assert f"{path}:{2 * i + 2}: " in out and reason in out
    assert "valid samples: 10" in out and "eta per epoch" in out
    assert main(["data", "validate", str(clean), "--tokenizer", str(V3_TOKENIZER), "--seq-len", "128"]) == 0
    assert "problems: 0" in capsys.readouterr().out


def test_pack():
    samples = [Sample(list(range(1, n + 1)), [0.0] + [1.0] * (n - 1)) for n in (5, 3, 7, 2, 8, 1)]
    batches = pack(samples, 8)
    flat = []
    for b in batches:
        assert len(b.tokens) == len(b.weights) == 8
        assert sum(b.seqlens) == 8
        start = 0
        for n in b.seqlens:
            doc = b.tokens[start : start + n]
            if doc != list(range(1, n + 1)):  # padding: the trailing document, weight 0
                assert start + n == 8 and all(w == 0 for w in b.weights[start:])
            else:
                flat.append(n)
            start += n
    assert flat == [5, 3, 7, 2, 8, 1]  # in order, none split
    assert [b.seqlens for b in batches] == [[5, 3], [7, 1], [2, 6], [8], [1, 7]]
    with pytest.raises(DataError, match="9 tokens > seq_len 8"):
        pack([Sample([1] * 9, [1.0] * 9)], 8)


def test_first_fit_packing_keeps_every_sample_and_pads_less():
    from galerne.finetune.data import Sample, pack, pack_first_fit

    import random

    rng = random.Random(0)
    samples = [Sample(list(range(1, n + 1)), [0.0] + [1.0] * (n - 1)) for n in (rng.randint(20, 300) for _ in range(200))]
    ff = pack_first_fit(samples, 512)
    seq = pack(samples, 512)
    assert all(len(b.tokens) == 512 == sum(b.seqlens) == len(b.weights) for b in ff)
    assert len(ff) < len(seq)
    # every sample once, intact: compare the multisets of (tokens, weights) documents
    docs = []
    for b in ff:
        start = 0
        for n in b.seqlens:
            if any(b.weights[start:start + n]) or b.tokens[start] != 0:
                docs.append((tuple(b.tokens[start:start + n]), tuple(b.weights[start:start + n])))
            start += n
    assert sorted(docs) == sorted((tuple(s.tokens), tuple(s.weights)) for s in samples)
    assert pack_first_fit([], 512) == []
    with pytest.raises(DataError):
        pack_first_fit([Sample([1] * 600, [1.0] * 600)], 512)


# --------------------------------------------------------------------------- data validate: files and odd lines

GOOD = json.dumps(CONV)


def _validate(capsys, *args):
    code = main(["data", "validate", *map(str, args), "--tokenizer", str(V3_TOKENIZER)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clean_output_that_is_an_input_or_a_folder_is_refused(tmp_path, capsys):
    src = tmp_path / "train.jsonl"
    src.write_text(GOOD + "\n{oops\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    for out in (src, link):  # the input itself, or a link to it: refused, nothing read nor written
        code, stdout, err = _validate(capsys, src, "--clean", out)
        assert code == 1 and stdout == ""
        assert err == f"galerne: error: --clean {out}: is the input file {src}; write the clean lines to another file\n"
        assert src.read_text() == GOOD + "\n{oops\n"
    code, stdout, err = _validate(capsys, src, "--clean", tmp_path)
    assert code == 1 and err == f"galerne: error: --clean {tmp_path}: is a folder; give the path of the file to write\n"
    code, _, err = _validate(capsys, src, "--clean", tmp_path / "missing" / "clean.jsonl")
    assert code == 1 and "does not exist" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "train.jsonl"]


def test_clean_output_is_replaced_only_once_every_input_is_read(tmp_path, v3):
    src = tmp_path / "train.jsonl"
    src.write_text(GOOD + "\n")
    out = tmp_path / "clean.jsonl"
    out.write_text("the user's file\n")
    out.chmod(0o640)
    with pytest.raises(DataError, match="cannot read"):  # the second input is missing: the run fails midway
        validate_files([src, tmp_path / "missing.jsonl"], v3, 128, clean=out)
    assert out.read_text() == "the user's file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl", "train.jsonl"]  # no temporary file left
    report = validate_files([src, src], v3, 128, clean=out)
    assert report.samples == 2 and out.read_text() == 2 * (GOOD + "\n")
    assert out.stat().st_mode & 0o777 == 0o640  # replaced, with its permissions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl", "train.jsonl"]


def test_deep_nesting_and_lone_surrogates_are_problems_of_their_line(tmp_path, capsys):
    lines = [
        GOOD,
        "[" * 100_000 + "]" * 100_000,  # json.loads: RecursionError
        json.dumps({"text": "fine"}),
        '{"text": "a\\ud800b"}',  # valid JSON, but half of a UTF-16 pair
        '{"messages": [{"role": "user", "content": "x\\udfffy"}, {"role": "assistant", "content": "ok"}]}',
        '{"text": "\\ud83d\\ude00 a real pair is fine"}',
        '{"a": ' * 5000 + "1" + "}" * 5000,
    ]
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    code, out, err = _validate(capsys, path, "--seq-len", "256", "--clean", tmp_path / "clean.jsonl")
    assert code == 1 and err == "" and "Traceback" not in out
    problems = [line for line in out.splitlines() if line.startswith(f"{path}:")]
    assert problems == [
        f"{path}:2: JSON nested too deeply to read (past Python's recursion limit)",
        f"{path}:4: text: lone surrogate \\ud800 in a string (half of a UTF-16 pair: not valid Unicode)",
        f"{path}:5: messages[0].content: lone surrogate \\udfff in a string (half of a UTF-16 pair: not valid Unicode)",
        f"{path}:7: JSON nested too deeply to read (past Python's recursion limit)",
    ]
    assert "lines: 7" in out and "valid samples: 3" in out  # validation went on after each
    assert (tmp_path / "clean.jsonl").read_text(encoding="utf-8") == "".join(lines[i] + "\n" for i in (0, 2, 5))


class _Reads:
    """A binary file that records the size of each read asked of it."""

    def __init__(self, data: bytes):
        import io

        self.f, self.sizes = io.BytesIO(data), []

    def readline(self, size=-1):
        self.sizes.append(size)
        return self.f.readline(size)


def test_a_line_over_the_limit_is_reported_without_being_read_whole(tmp_path, v3, capsys):
    from galerne.finetune import validate

    long = json.dumps({"text": "x" * 5000})
    exact = json.dumps({"text": "y" * (1000 - 12)})
    assert len(exact) == 1000
    data = (GOOD + "\n" + long + "\n" + exact + "\n" + long).encode()  # the last line without a newline
    f = _Reads(data)
    got = list(validate._lines(f, 1000))
    assert [(raw is None, size) for raw, size in got] == [(False, len(GOOD)), (True, len(long)), (False, 1000),
                                                          (True, len(long))]
    assert all(0 < s <= 1001 for s in f.sizes), f.sizes  # never an unbounded read, never more than the limit

    path = tmp_path / "long.jsonl"
    path.write_bytes(data)
    report = validate_files([path], v3, 2048, max_line_bytes=1000)
    assert [(p.line, p.reason) for p in report.problems] == [
        (2, f"line of {len(long)} bytes, over the limit of 1000 (max_line_bytes): not read"),
        (4, f"line of {len(long)} bytes, over the limit of 1000 (max_line_bytes): not read")]
    assert report.lines == 4 and report.samples == 2
    code, out, _ = _validate(capsys, path, "--max-line-bytes", "100000", "--seq-len", "100000")
    assert code == 0 and "valid samples: 4" in out
    assert validate.MAX_LINE_BYTES == 8 * 1024 * 1024  # the default


@pytest.mark.parametrize("flag, value", [("--seq-len", "0"), ("--seq-len", "-3"), ("--tokens-per-s", "0"),
                                         ("--tokens-per-s", "-1"), ("--tokens-per-s", "nan"),
                                         ("--tokens-per-s", "inf"), ("--max-line-bytes", "0")])
def test_sizes_and_speeds_must_be_positive(tmp_path, capsys, flag, value):
    src = tmp_path / "train.jsonl"
    src.write_text(GOOD + "\n")
    code, out, err = _validate(capsys, src, flag, value, "--clean", tmp_path / "clean.jsonl")
    assert code == 1 and out == ""
    kind = "number" if flag == "--tokens-per-s" else "integer"
    assert err == f"galerne: error: {flag}: must be a positive {kind}, got {float(value) if kind == 'number' else value}\n"
    assert not (tmp_path / "clean.jsonl").exists()


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    import tempfile

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full to fill")
    src = tmp_path / "train.jsonl"
    src.write_text(GOOD + "\n")
    full = tmp_path / "full"
    full.mkdir()
    real = tempfile.mkstemp

    def on_a_full_disk(*a, **kw):  # every write fails with ENOSPC, as on a full disk
        fd, name = real(*a, **kw)
        device = os.open("/dev/full", os.O_WRONLY)
        os.dup2(device, fd)
        os.close(device)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", on_a_full_disk)
    code, _, err = _validate(capsys, src, "--clean", full / "clean.jsonl")
    assert code == 1 and err == f"galerne: error: --clean {full / 'clean.jsonl'}: cannot write: No space left on device\n"
    assert list(full.iterdir()) == []
