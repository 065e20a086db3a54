"""Fixtures of the chart tests: every ci/ scenario rendered once per session."""

from __future__ import annotations

import pytest

from tests.chart.chart import SCENARIOS, Rendered, render, scenario_file


@pytest.fixture(scope="session")
def rendered() -> dict[str, Rendered]:
    """Scenario name (default, external-services, kind, multi-gpu) -> its rendering."""
    return {name: render(scenario_file(name)) for name in SCENARIOS}


@pytest.fixture(params=SCENARIOS)
def scenario(request: pytest.FixtureRequest) -> str:
    return str(request.param)
