"""The public API is what README's embedding section lists, and names mean one thing.

ISSUE 15: an export that is not documented (or a documented name that is not exported) fails
here, and so does a name that both packages export with different meanings.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _documented(package: str) -> set[str]:
    """The backticked names of README's bullet ``- `package`: ...`` (up to the next bullet)."""
    text = README.read_text()
    match = re.search(rf"^- `{re.escape(package)}`:(.*?)(?=^- |^$)", text, re.M | re.S)
    assert match, f"README has no public-API bullet for {package}"
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", match.group(1)))


@pytest.mark.parametrize("package", ["execstream.server", "execstream.client"])
def test_exports_are_exactly_the_documented_names(package: str) -> None:
    module = importlib.import_module(package)
    exported = set(module.__all__)
    documented = _documented(package)
    assert exported - documented == set(), "exported but not documented in README"
    assert documented - exported == set(), "documented in README but not exported"
    for name in exported:
        assert getattr(module, name) is not None


def test_no_name_is_exported_by_both_packages() -> None:
    server = importlib.import_module("execstream.server")
    client = importlib.import_module("execstream.client")
    assert set(server.__all__) & set(client.__all__) == set()


def test_no_two_server_modules_define_a_public_class_of_the_same_name() -> None:
    """ISSUE 15: one name, one meaning, inside the server too (``ExecInput`` is the state
    machine's input, ``LifecycleRecord`` the registry's copy of a lifecycle event)."""
    root = Path(importlib.import_module("execstream.server").__file__ or "").parent
    seen: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        for name in re.findall(r"^class ([A-Z][A-Za-z0-9]*)\b", path.read_text(), re.M):
            assert name not in seen, f"class {name} in both {seen[name]} and {path}"
            seen[name] = path
