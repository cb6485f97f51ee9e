"""What the installed package carries (tox installs the wheel): the licence, project URLs and
classifiers, the pytest extra, and the spec as package data that ``conformance --help``
points to."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from importlib.resources import files
from pathlib import Path

from execstream.conformance._cli import spec_file

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_apache_2_and_shipped() -> None:
    meta = metadata.metadata("execstream")
    assert meta["License-Expression"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    shipped = [f for f in metadata.files("execstream") or [] if f.name == "LICENSE"]
    assert shipped, "LICENSE is not in the installed distribution"


def test_urls_classifiers_and_the_pytest_extra() -> None:
    meta = metadata.metadata("execstream")
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Source", "Issues"} <= set(urls)
    classifiers = meta.get_all("Classifier") or []
    assert "Framework :: Pytest" in classifiers and "Typing :: Typed" in classifiers
    assert "pytest" in (meta.get_all("Provides-Extra") or [])
    requires = metadata.requires("execstream") or []
    assert any(r.startswith("pytest") and 'extra == "pytest"' in r for r in requires)


def test_the_spec_is_package_data_and_conformance_help_points_to_it() -> None:
    import execstream

    if Path(execstream.__file__).parent.name != "impl":  # the wheel, as tox installs it
        for name in ("PROTOCOL.md", "exec.proto"):
            installed = files("execstream.spec").joinpath(name)
            assert installed.read_text() == (ROOT / "spec" / name).read_text()
    done = subprocess.run(
        [sys.executable, "-m", "execstream", "conformance", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    help_text = "".join(done.stdout.split())
    for name in ("PROTOCOL.md", "exec.proto"):
        shown = spec_file(name)
        assert Path(shown).read_text() == (ROOT / "spec" / name).read_text()
        assert "".join(shown.split()) in help_text
