"""CALLFLOW_RETENTION_DAYS (issue 26; the contract's, default 90): at least a day, so retention can
never prune a row that deduplication still needs; a bad value stops a process at start with one
line naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from config.settings import ConfigurationError, Settings, build_settings
from orchestration import names
from orchestration.lifecycle import sweep
from orchestration.retention import MIN_DAYS, horizon

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def test_default_and_value(clean_env):
    assert build_settings().callflow_retention_days == 90
    clean_env.setenv("CALLFLOW_RETENTION_DAYS", "1")
    assert build_settings().callflow_retention_days == 1


@pytest.mark.parametrize("value", ["0", "-3", "ninety", "1.5", "36501"])
def test_malformed_values_are_named(clean_env, value):
    clean_env.setenv("CALLFLOW_RETENTION_DAYS", value)
    with pytest.raises(ConfigurationError) as info:
        build_settings()
    assert "CALLFLOW_RETENTION_DAYS" in str(info.value) and "\n" not in str(info.value)


def test_a_process_refuses_to_start_with_one_line():
    base = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    code = "from config.settings import load_settings_or_exit; load_settings_or_exit(); print('started')"
    result = subprocess.run([sys.executable, "-c", code], env={**base, "CALLFLOW_RETENTION_DAYS": "0"},
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "CALLFLOW_RETENTION_DAYS" in lines[0], result.stderr


def test_the_horizon_is_never_less_than_the_minimum():
    now = datetime(2026, 12, 7, tzinfo=timezone.utc)
    assert horizon(now, MIN_DAYS) == now - timedelta(days=1)
    with pytest.raises(ValueError):
        horizon(now, MIN_DAYS - 1)
    assert Settings.model_fields["callflow_retention_days"].metadata[0].ge == MIN_DAYS


def test_every_window_that_deduplicates_on_call_events_is_shorter_than_the_minimum():
    """What can bring an event back without a Redis mark to stop it, and how long after: LiveKit's
    retries (seconds; its token lasts 5 minutes), a backlog's taken list, the sweep's look back for
    lost transitions. (A failed task retried by hand keeps its event's row: test_retention.)"""
    minimum = MIN_DAYS * 86400
    assert names.WEBHOOK_SEEN_TTL_SECONDS < minimum
    assert names.TAKEN_TTL_SECONDS < minimum
    assert sweep.UNRECORDED_WITHIN < minimum
