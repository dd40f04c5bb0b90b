"""Settings fail fast, naming the variable."""

from __future__ import annotations

import pytest

from app.settings import SettingsError, get_settings


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("GPUFLEET_FAKE_GPUS", "A100=80", "GPUFLEET_FAKE_GPUS: expected TYPE:GB"),
        ("GPUFLEET_LEASE_TTL", "5", "GPUFLEET_LEASE_TTL (5s) must be at least four times"),
        # exactly three heartbeats leave the watchdog one interval: the first late renewal
        # would stop a healthy worker
        ("GPUFLEET_LEASE_TTL", "30", "GPUFLEET_HEARTBEAT_INTERVAL (10s)"),
        ("GPUFLEET_LEASE_TTL", "soon", "GPUFLEET_LEASE_TTL"),
        ("GPUFLEET_API_TOKENS", "alice", "GPUFLEET_API_TOKENS: expected tenant:token"),
        ("GPUFLEET_HEARTBEAT_INTERVAL", "-1", "GPUFLEET_HEARTBEAT_INTERVAL"),
    ],
)
def test_a_bad_value_stops_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(variable, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError) as info:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert needle in str(info.value)
    assert "Value error" not in str(info.value)


def test_good_values_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_FAKE_GPUS", "A100:80, t4:16,L4:22.5")
    monkeypatch.setenv("GPUFLEET_API_TOKENS", "alice:a1,bob:b2")
    get_settings.cache_clear()
    try:
        settings = get_settings()
    finally:
        get_settings.cache_clear()
    assert settings.tokens == {"a1": "alice", "b2": "bob"}
