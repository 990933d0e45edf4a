"""Controller settings read from outside: every governor limit and the scrub mode are settable from the environment;
bad values are one clear error."""

from __future__ import annotations

import pytest

from ferryman.controller.settings import ControllerSettings, governor_from_env
from ferryman.core.errors import InvalidInput
from ferryman.scheduler.governor import GovernorSettings


def test_governor_defaults_without_environment():
    """No variable set: the documented defaults."""
    assert governor_from_env({}) == GovernorSettings()


def test_every_governor_field_has_a_variable_and_short_names_still_work():
    """FERRYMAN_GOVERNOR_<FIELD> sets a field (typed as the default); the two short legacy names still apply."""
    got = governor_from_env(
        {
            "FERRYMAN_GOVERNOR_BREAKER_THRESHOLD": "7",
            "FERRYMAN_GOVERNOR_BREAKER_WINDOW_S": "90.5",
            "FERRYMAN_GOVERNOR_BANDWIDTH_CAP_BYTES_PER_S": "none",
            "FERRYMAN_VM_COOLDOWN_S": "12",
            "FERRYMAN_PRINCIPAL_RATE": "3",
        }
    )
    assert (got.breaker_threshold, got.breaker_window_s, got.bandwidth_cap_bytes_per_s) == (7, 90.5, None)
    assert (got.vm_cooldown_s, got.principal_rate) == (12.0, 3)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"FERRYMAN_GOVERNOR_MAX_PARALLEL": "many"}, "FERRYMAN_GOVERNOR_MAX_PARALLEL='many' is not a number"),
        ({"FERRYMAN_GOVERNOR_MAX_PARALLEL": "0"}, "max_parallel must be at least 1"),
    ],
)
def test_bad_governor_values_are_invalid_input(env, match):
    """A value that is not a number, or out of range, is refused with the variable or field named."""
    with pytest.raises(InvalidInput, match=match):
        governor_from_env(env)


def test_scrub_mode_is_zero_by_default_and_only_zero_or_random(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """FERRYMAN_SCRUB_MODE picks the overwrite for plain VMs; crypto is not a choice (it needs an encrypted VM)."""
    monkeypatch.delenv("FERRYMAN_SCRUB_MODE", raising=False)
    assert ControllerSettings.load(data_dir=tmp_path).scrub_mode == "zero"
    monkeypatch.setenv("FERRYMAN_SCRUB_MODE", "random")
    assert ControllerSettings.load(data_dir=tmp_path).scrub_mode == "random"
    for bad in ("crypto", "shred", ""):
        monkeypatch.setenv("FERRYMAN_SCRUB_MODE", bad)
        with pytest.raises(InvalidInput, match="FERRYMAN_SCRUB_MODE"):
            ControllerSettings.load(data_dir=tmp_path)
