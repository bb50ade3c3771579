"""Production security settings and the Content-Security-Policy.

- ``manage.py check --deploy`` with the production settings reports nothing (and does
  report a weakened setting: the test can fail);
- the Kubernetes probes' endpoints answer over plain HTTP while everything else redirects
  to HTTPS;
- every page sends the policy; Swagger UI alone may run inline script, and in a real
  browser it renders with no policy violation, like the admin and the chart page.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings

from tests.browser.chromium import headless_chromium
from tests.chaos.stack import GatewayFailed, Proc, gateway_start, http_ok

ROOT = Path(__file__).resolve().parent.parent


# What an operator must choose besides the secret key and hosts (README "Configuration").
METRICS_TOKEN = "metrics-" + secrets.token_urlsafe(24)
_STATIC: list[Path] = []


def static_root() -> Path:
    """A STATIC_ROOT holding a manifest, as collectstatic leaves it (empty: no page is rendered here).

    The real collectstatic takes ~40 s of CPU (whitenoise compresses every file); these
    tests need the manifest to exist, not the files.
    """
    if not _STATIC:
        root = Path(tempfile.mkdtemp(prefix="static-"))
        (root / "staticfiles.json").write_text(json.dumps({"paths": {}, "version": "1.1", "hash": "0"}))
        _STATIC.append(root)
    return _STATIC[0]


def production_env(**extra: str) -> dict[str, str]:
    """The environment of a process under the production settings: only what they require, on the test database."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "STREAMING_", "DATABASE_REPLICA", "METRICS_", "WS_", "PROMETHEUS_MULTIPROC"))
    }
    db = settings.DATABASES["default"]
    return {
        **clean,
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": "md.example.com,localhost",
        "DJANGO_STATIC_ROOT": str(static_root()),
        "METRICS_TOKEN": METRICS_TOKEN,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "DATABASE_POOL_MIN": "0",
        "REDIS_URL": settings.REDIS_URL,
        "CHANNELS_PREFIX": settings.CHANNELS_PREFIX,
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def _production(argv: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` under the production settings with only the required environment."""
    env = {k: v for k, v in production_env(**extra).items() if v is not None}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


@dataclass
class Server(Proc):
    """A gateway subprocess (``python -m streaming.server``) on a loopback port; its output in a file."""

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None else ""

    def request(self, path: str, headers: dict[str, str] | None = None, port: int | None = None) -> tuple[int, bytes]:
        """GET ``path``: (status, body), error statuses included."""
        url = f"http://127.0.0.1:{port or self.port}{path}"
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as error:
            return int(error.code), bytes(error.read())


def start_server(env: dict[str, str], log: Path, args: tuple[str, ...] = (), ready: str = "/healthz") -> Server:
    """Start the gateway as the image does (``python -m streaming.server``) and wait until ``ready`` answers."""
    return gateway_start(env, log, args=args, ready=http_ok(ready, {"Host": "localhost"}), timeout=60, kind=Server)


CHECK_DEPLOY = [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"]


def test_production_settings_pass_check_deploy_with_no_warning():
    result = _production(CHECK_DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout


def test_check_deploy_reports_a_weakened_setting():
    result = _production(CHECK_DEPLOY, DJANGO_SECURE_HSTS_SECONDS="0", DJANGO_SECURE_SSL_REDIRECT="false")
    assert result.returncode != 0
    assert "security.W004" in result.stderr  # HSTS off
    assert "security.W008" in result.stderr  # no HTTPS redirect


def test_production_refuses_to_start_without_the_static_manifest(tmp_path):
    """Without collectstatic, /login/, /admin/login/ and /v1/docs would answer 500: the server refuses to start."""
    from ops.checks import E_STATIC_MANIFEST, STATIC_MANIFEST_HINT

    empty = tmp_path / "static"
    empty.mkdir()
    plain = {"DJANGO_ALLOWED_HOSTS": "localhost", "DJANGO_SECURE_SSL_REDIRECT": "false"}
    env = production_env(**plain, DJANGO_STATIC_ROOT=str(empty))
    with pytest.raises(GatewayFailed, match="did not start") as refused:
        start_server(env, tmp_path / "gateway.log", ready="/login/")
    assert E_STATIC_MANIFEST in str(refused.value)
    assert STATIC_MANIFEST_HINT in str(refused.value)

    result = _production(CHECK_DEPLOY, DJANGO_STATIC_ROOT=str(empty))
    assert result.returncode != 0
    assert f"({E_STATIC_MANIFEST}) The static files manifest {empty / 'staticfiles.json'} is missing" in result.stderr
    # The command that makes the manifest is not refused by its absence.
    collect = _production([sys.executable, "manage.py", "collectstatic", "--noinput", "--dry-run"],
                          DJANGO_STATIC_ROOT=str(empty), METRICS_TOKEN="")  # fmt: skip
    assert collect.returncode == 0, collect.stderr[-3000:]


PROBES = """
import os
import django
django.setup()
from django.test import Client
client = Client()
for path in ("/healthz", "/readyz", "/metrics", "/", "/v1/symbols"):
    response = client.get(path, HTTP_HOST="localhost", HTTP_AUTHORIZATION="Bearer " + os.environ["METRICS_TOKEN"])
    print(path, response.status_code, response.get("Location", "-"))
secure = client.get("/healthz", HTTP_HOST="md.example.com", HTTP_X_FORWARDED_PROTO="https")
print("hsts", secure.get("Strict-Transport-Security"))
"""


@pytest.mark.django_db
def test_probes_answer_plain_http_and_the_rest_redirects_to_https():
    result = _production([sys.executable, "-c", PROBES])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["/healthz"] == "200 -"
    assert lines["/readyz"].split()[0] in {"200", "503"}  # an answer, never a redirect a probe would follow
    assert lines["/metrics"].startswith("200 ")
    assert lines["/"] == "301 https://localhost/"
    assert lines["/v1/symbols"] == "301 https://localhost/v1/symbols"
    assert lines["hsts"] == "max-age=31536000; includeSubDomains; preload"


def _policy(response) -> dict[str, list[str]]:
    header = response["Content-Security-Policy"]
    return {part.split()[0]: part.split()[1:] for part in header.split("; ")}


@pytest.mark.django_db
def test_the_page_sends_a_strict_policy(client):
    response = client.get("/")
    assert response.status_code == 200
    policy = _policy(response)
    assert policy["default-src"] == ["'self'"]
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["img-src"] == ["'self'", "data:"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["object-src"] == ["'none'"]
    assert policy["connect-src"] == ["'self'", "ws://testserver"]
    assert _policy(client.get("/", secure=True))["connect-src"] == ["'self'", "wss://testserver"]


@pytest.mark.django_db
def test_only_the_swagger_page_may_run_inline_script(client):
    docs = _policy(client.get("/v1/docs"))
    assert docs["script-src"] == ["'self'", "'unsafe-inline'"]
    assert docs["style-src"] == ["'self'", "'unsafe-inline'"]
    assert docs["frame-ancestors"] == ["'none'"]
    for path in ("/v1/symbols", "/v1/schema", "/admin/login/", "/healthz"):
        assert _policy(client.get(path))["script-src"] == ["'self'"], path


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[object]:
    """Headless Chromium that keeps the console log; skipped with the reason where it is not installed."""
    with headless_chromium(tmp_path) as driver:
        yield driver


def _violations(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


@pytest.mark.browser
def test_pages_run_under_the_policy_in_a_browser(transactional_db, live_server, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium
    driver.get(f"{live_server.url}/v1/docs")
    # Swagger UI started (its inline script ran) and drew the operations of the schema it fetched.
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"))
    assert "Market-data gateway" in driver.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
    assert _violations(driver) == []

    for path in ("/admin/login/", "/"):
        driver.get(f"{live_server.url}{path}")
        WebDriverWait(driver, 10).until(lambda d: d.execute_script("return document.readyState") == "complete")
        assert _violations(driver) == [], path
