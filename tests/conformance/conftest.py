"""Markers of the conformance-suite tests."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "suite_repeat: runs the whole conformance suite against the reference server "
        "repeatedly, to show that no case is flaky (the slowest test of the directory)",
    )
