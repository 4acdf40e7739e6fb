"""Regenerate the console's screenshots of docs/console.md (docs/console/*.png).

They are taken by the console's browser tests (tests/test_console.py), slow ones included
(the bakery fine-tune, a few minutes on a CPU), when GALERNE_CONSOLE_SCREENSHOTS names a
folder. Needs what those tests need: the playwright package and Debian's chromium (or
GALERNE_CHROMIUM=/path/to/chrome). Run from anywhere:

    python scripts/console_screenshots.py            # into docs/console/
    python scripts/console_screenshots.py /tmp/shots
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    out = Path(argv[0]).resolve() if argv else ROOT / "docs" / "console"
    env = {**os.environ, "GALERNE_CONSOLE_SCREENSHOTS": str(out)}
    # -m "" runs the slow test too; -rs says why a test skipped (no browser: no screenshot)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "", "-p", "no:cacheprovider", "tests/test_console.py"]
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    shots = sorted(p.name for p in out.glob("*.png")) if out.is_dir() else []
    print(f"screenshots in {out}: {', '.join(shots) or 'none'}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
