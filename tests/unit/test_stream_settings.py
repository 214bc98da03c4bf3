"""The event streams' caps (issue 23): CALLFLOW_STREAMS_PER_USER (the contract's, default 10) and
CALLFLOW_STREAMS_PER_PROCESS (default 2000); a bad value stops a process at start with one line
naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import ConfigurationError, Settings, build_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def test_defaults(clean_env):
    s = build_settings()
    assert s.callflow_streams_per_user == 10
    assert s.callflow_streams_per_process == 2000


def test_values_are_read(clean_env):
    clean_env.setenv("CALLFLOW_STREAMS_PER_USER", "3")
    clean_env.setenv("CALLFLOW_STREAMS_PER_PROCESS", "50")
    s = build_settings()
    assert (s.callflow_streams_per_user, s.callflow_streams_per_process) == (3, 50)


@pytest.mark.parametrize("variable", ["CALLFLOW_STREAMS_PER_USER", "CALLFLOW_STREAMS_PER_PROCESS"])
@pytest.mark.parametrize("value", ["0", "-1", "ten", "2.5", "1000001"])
def test_malformed_values_are_named(clean_env, variable, value):
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        build_settings()
    assert variable in str(info.value) and "\n" not in str(info.value)


def test_a_process_refuses_to_start_with_one_line():
    base = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    code = "from config.settings import load_settings_or_exit; load_settings_or_exit(); print('started')"
    result = subprocess.run([sys.executable, "-c", code], env={**base, "CALLFLOW_STREAMS_PER_USER": "none"},
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "CALLFLOW_STREAMS_PER_USER" in lines[0], result.stderr
