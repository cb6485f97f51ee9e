"""The process runtime stays split by responsibility (issue 14): small modules, one job each."""

from __future__ import annotations

import ast
from pathlib import Path

import execstream.server.runtime.process as process_package

PACKAGE = Path(process_package.__file__).parent


def test_no_module_of_the_process_runtime_is_over_500_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert sizes, PACKAGE
    assert {name: n for name, n in sizes.items() if n > 500} == {}


def test_no_module_reads_private_attributes_of_other_objects() -> None:
    """``x._field`` only on ``self`` (or ``cls``): another object's internals stay its own."""
    offenders = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and not (isinstance(node.value, ast.Name) and node.value.id == "os")  # os._exit
            ):
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert offenders == []
