"""``tools/generate.py --check`` passes on the repo and fails, naming the file, on drift.

Generation needs betterproto2-compiler and ruff, which only the tox ``generate`` and
``generate-check`` envs install; elsewhere (the tox ``test`` env included) this module skips,
and ``tox -e generate-check`` is the gate.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_missing = [
    name
    for name in ("betterproto2_compiler", "ruff", "grpc_tools")
    if importlib.util.find_spec(name) is None
]
pytestmark = pytest.mark.skipif(
    bool(_missing),
    reason=f"generation needs {', '.join(_missing)} (run `tox -e generate-check` instead)",
)


def generate_py(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # betterproto2-compiler runs `ruff` by name, so this interpreter's scripts must be on PATH.
    scripts = sysconfig.get_path("scripts")
    env = dict(os.environ, PATH=os.pathsep.join([scripts, os.environ.get("PATH", "")]))
    return subprocess.run(
        [sys.executable, str(root / "tools" / "generate.py"), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return generate_py(root, "--check")


def _named(diff: str) -> set[str]:
    """Files the unified diff talks about (its ``---`` headers)."""
    return {line.split()[1] for line in diff.splitlines() if line.startswith("--- generated/")}


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The parts of the repo generate.py reads and compares, copied (ROOT follows the copy)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("spec", "tools", "generated"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_committed_generated_code_matches_the_proto() -> None:
    result = check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


def test_edited_generated_file_is_drift(repo_copy: Path) -> None:
    service = repo_copy / "generated" / "_service.py"
    service.write_text(service.read_text() + "HAND_EDIT = True\n")
    result = check(repo_copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert _named(result.stdout) == {"generated/_service.py"}
    assert "-HAND_EDIT = True" in result.stdout.splitlines()
    assert "drifted" in result.stderr


def test_missing_and_stray_generated_files_are_drift(repo_copy: Path) -> None:
    (repo_copy / "generated" / "message_pool.py").unlink()
    (repo_copy / "generated" / "dagger" / "stale.py").write_text("OLD = 1\n")
    result = check(repo_copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert _named(result.stdout) == {"generated/message_pool.py", "generated/dagger/stale.py"}


def test_hand_written_module_is_not_the_generators(repo_copy: Path) -> None:
    """generated/_strict.py is written by hand: editing it is no drift, and it is kept."""
    strict = repo_copy / "generated" / "_strict.py"
    strict.write_text(strict.read_text() + "HAND_EDIT = True\n")
    result = check(repo_copy)
    assert result.returncode == 0, result.stdout + result.stderr


def test_regenerating_keeps_the_hand_written_module(repo_copy: Path) -> None:
    strict = repo_copy / "generated" / "_strict.py"
    before = strict.read_text()
    result = generate_py(repo_copy)  # rewrite generated/
    assert result.returncode == 0, result.stdout + result.stderr
    assert strict.read_text() == before
    assert check(repo_copy).returncode == 0
