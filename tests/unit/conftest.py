"""Unit-test fixtures: the Helm chart, loaded once per module by Helm's Go SDK (helm-python-sdk)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    pytest.importorskip("helm_python")
    from tests.unit.helm_render import loaded_chart

    with loaded_chart() as loaded:
        yield loaded
