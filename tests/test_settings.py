"""Settings: production refuses unsafe configurations; local works with no environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAFE_PRODUCTION = {
    "DJANGO_SETTINGS_MODULE": "config.settings.production",
    "DJANGO_SECRET_KEY": "x" * 50,
    "DJANGO_ALLOWED_HOSTS": "md.example.com",
}


PROBE = "import django; django.setup(); from django.conf import settings; print(settings.DEBUG)"


def _load(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "STREAMING_"))}
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_production_starts_when_safe():
    result = _load(SAFE_PRODUCTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"DJANGO_SECRET_KEY": None}, "DJANGO_SECRET_KEY"),
        ({"DJANGO_DEBUG": "true"}, "DJANGO_DEBUG must be off"),
        ({"STREAMING_ALLOW_ANONYMOUS": "true"}, "STREAMING_ALLOW_ANONYMOUS must be off"),
    ],
)
def test_production_refuses_unsafe_settings(change, message):
    env = {k: v for k, v in {**SAFE_PRODUCTION, **change}.items() if v is not None}
    result = _load(env)
    assert result.returncode != 0
    assert message in result.stderr


def test_manage_py_defaults_to_local_settings():
    clean = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "manage.py", "diffsettings", "--all"],
        cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "STREAMING_ALLOW_ANONYMOUS = True" in result.stdout
    assert "local-INSECURE-placeholder" in result.stdout
