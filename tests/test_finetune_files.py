"""galerne.finetune.files: atomic writes, and a run folder that removes only what runs wrote."""

from __future__ import annotations

import json
import logging
import os

import pytest

from galerne.errors import ConfigError
from galerne.finetune.files import RunDir, atomic_write


def tree(root):
    return sorted(p.relative_to(root).as_posix() + ("/" if p.is_dir() and not p.is_symlink() else "")
                  for p in root.rglob("*"))


def test_atomic_write_leaves_the_destination_alone_until_it_is_complete(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("before\n")
    with pytest.raises(RuntimeError):
        with atomic_write(out, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert out.read_text() == "before\n" and tree(tmp_path) == ["out.txt"]
    link = tmp_path / "link.txt"
    link.symlink_to(out)
    with atomic_write(link, "w") as f:
        f.write("after\n")
    assert link.is_symlink() and out.read_text() == "after\n"  # the link's target replaced, the link kept


def test_a_staging_folder_left_by_a_dead_run_is_removed_by_the_next(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.open()
    with pytest.raises(KeyboardInterrupt):
        with rd.staged("checkpoints/checkpoint_000002") as tmp:
            (tmp / "optimizer.pt").write_bytes(b"half written")
            raise KeyboardInterrupt
    assert tree(rd.path) == ["checkpoints/", "checkpoints/.tmp_checkpoint_000002/",
                             "checkpoints/.tmp_checkpoint_000002/optimizer.pt", "galerne_run.json"]
    again = RunDir(rd.path)
    again.open()
    assert tree(rd.path) == ["checkpoints/", "galerne_run.json"]
    with again.staged("checkpoints/checkpoint_000002") as tmp:
        (tmp / "optimizer.pt").write_bytes(b"whole")
    assert json.loads(again.manifest.read_text())["entries"] == {
        "checkpoints": "dir", "checkpoints/checkpoint_000002": "dir", "checkpoints/checkpoint_000002/optimizer.pt": "file"}


def test_remove_touches_only_what_the_run_listed(tmp_path, caplog):
    outside = tmp_path / "outside.txt"
    outside.write_text("not the run's\n")
    rd = RunDir(tmp_path / "run")
    rd.open()
    with rd.staged("adapter") as tmp:
        (tmp / "a.safetensors").write_bytes(b"a")
        (tmp / "b.json").write_text("{}")
    (rd.path / "adapter" / "README.md").write_text("the user's\n")  # added by the user
    (rd.path / "adapter" / "b.json").unlink()
    (rd.path / "adapter" / "b.json").symlink_to(outside)  # a listed file replaced by a link
    with caplog.at_level(logging.WARNING, logger="galerne"):
        rd.remove("adapter")
    assert tree(rd.path) == ["adapter/", "adapter/README.md", "adapter/b.json", "galerne_run.json"]
    assert outside.read_text() == "not the run's\n"
    assert f"kept {rd.path / 'adapter'}: it holds files no galerne run wrote" in caplog.text
    assert rd.entries == {}


def test_staged_output_never_replaces_what_is_not_the_runs(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.open()
    (rd.path / "model").mkdir()
    (rd.path / "model" / "weights.safetensors").write_bytes(b"the user's")
    with pytest.raises(ConfigError, match=r"model holds files no galerne run wrote: wrote .*model\.1 instead"):
        with rd.staged("model") as tmp:
            (tmp / "consolidated.safetensors").write_bytes(b"new")
    assert tree(rd.path) == ["galerne_run.json", "model.1/", "model.1/consolidated.safetensors", "model/",
                             "model/weights.safetensors"]
    assert (rd.path / "model" / "weights.safetensors").read_bytes() == b"the user's"


def test_check(tmp_path):
    kw = dict(results=("metrics.jsonl", "checkpoints"), strict=("metrics.jsonl", "checkpoints", "config.yaml"),
              has_checkpoint=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        RunDir(tmp_path / "file").check(resuming=False, **kw)
    RunDir(tmp_path / "new").check(resuming=False, **kw)  # absent: fine, and not created
    assert not (tmp_path / "new").exists()
    rd = RunDir(tmp_path / "run")
    rd.open()
    rd.write_text("config.yaml", "a: 1\n")
    rd.check(resuming=False, **kw)  # a run that produced nothing yet may start over
    rd.write_text("metrics.jsonl", "{}\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        rd.check(resuming=False, **kw)
    rd.check(resuming=True, **kw)
    (rd.path / "checkpoints").mkdir()  # not the run's
    with pytest.raises(ConfigError, match="holds checkpoints/, which no galerne run wrote"):
        rd.check(resuming=True, **kw)
    os.rmdir(rd.path / "checkpoints")
    rd.manifest.write_text("{not json")
    with pytest.raises(ConfigError, match="galerne_run.json: run_dir: cannot read the run's manifest"):
        rd.check(resuming=True, **kw)
