"""The rule for missing tools: skip on a developer machine, fail under CI."""

from __future__ import annotations

import pytest

from tests.deploy.conftest import missing


@pytest.mark.parametrize("value", ["true", "1", "TRUE", "yes"])
def test_a_missing_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="CI must run every deployment check"):
        missing("promtool", "make tools")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_a_missing_tool_skips_elsewhere(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match="promtool not found"):
        missing("promtool", "make tools")
