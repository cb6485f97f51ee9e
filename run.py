#!/usr/bin/env python3
"""The main job from a fresh clone: ``python3 run.py`` (the demo), or ``python3 run.py ARGS``.

Creates ``.venv`` beside this file on first use, installs execstream into it (editable, so
later changes of the checkout are picked up), then runs ``execstream ARGS`` (default:
``demo``).  Needs only Python 3.11+ and access to the package index.
"""

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def main() -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - run.py is what checks it
        print("execstream needs Python 3.11 or newer", file=sys.stderr)
        return 2
    command = VENV / "bin" / "execstream"
    if not command.exists():
        print(f"setting up {VENV} (first run only) ...", file=sys.stderr, flush=True)
        venv.create(VENV, with_pip=True)
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--editable", str(ROOT)], check=True)
    args = sys.argv[1:] or ["demo"]
    os.execv(command, [str(command), *args])
    return 0


if __name__ == "__main__":
    sys.exit(main())
