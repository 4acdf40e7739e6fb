"""The wheel ships every file of the package: the modules, and the data they read at run
time (the CPU kernel's C++ source, compiled on the user's machine; the built-in model; the
console's page). CI also installs the wheel in a fresh virtualenv and decodes through the kernel (.ci/run)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _package_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "galerne"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the package's files are unknown")
    return [f for f in out.stdout.splitlines() if "__pycache__" not in f]


@pytest.mark.slow  # builds a wheel (about 10 s)
def test_the_wheel_ships_every_file_of_the_package(tmp_path):
    files = _package_files()
    assert "galerne/kernels/cpu_decode.cpp" in files
    assert {"galerne/server/console/static/index.html", "galerne/server/console/static/app.js"} <= set(files)
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE", *files):  # a copy: the build leaves build/ beside it
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("galerne-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert [f for f in files if f not in shipped] == []
