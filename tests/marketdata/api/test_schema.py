"""The OpenAPI document is valid, the docs work offline, and the API keeps to its document."""

from __future__ import annotations

import re

import orjson
import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from drf_spectacular.validation import validate_schema
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.marketdata.api.conftest import minute_bars

ENDPOINTS = {"/v1/symbols", "/v1/ohlcv", "/v1/trades", "/v1/latest", "/v1/leaderboard"}
APP = get_wsgi_application()
SCHEMA = schemathesis.openapi.from_wsgi("/v1/schema?format=json", APP)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_the_openapi_document_is_valid_openapi_3(client, db):
    response = client.get("/v1/schema?format=json")
    assert response.status_code == 200
    document = orjson.loads(response.content)
    validate_schema(document)  # drf-spectacular's check against the OpenAPI 3.0 JSON schema
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == ENDPOINTS
    for path in ENDPOINTS:
        operation = document["paths"][path]["get"]
        assert {"200", "400", "401", "403", "429"} <= set(operation["responses"]), path
    assert {"tokenHeader", "tokenQuery", "cookieAuth"} <= set(document["components"]["securitySchemes"])
    assert client.get("/v1/schema").content.startswith(b"openapi: 3.")


def test_the_docs_page_loads_its_assets_from_this_server(client, db):
    response = client.get("/v1/docs")
    assert response.status_code == 200
    html = response.content.decode()
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css|png))"', html)
    assert assets, html
    assert all(a.startswith("/static/drf_spectacular_sidecar/") for a in assets), assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert "/v1/schema" in html


@pytest.fixture
def data(make_symbol, write_bars, settings):
    # No rate limit here: the run makes a few hundred requests from one address.
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {}}
    write_bars(minute_bars(make_symbol("AAPL"), 50, anomalies={3: 1}))
    # The WSGI app would close the test's connection (and its transaction) after each
    # request; Django's own test client unhooks the same signals.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.mark.django_db
@SCHEMA.parametrize()
@settings(
    max_examples=40,
    derandomize=True,  # CI runs the same examples each time; deeper fuzzing is a separate, longer run
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_schemathesis_finds_no_server_error_or_schema_violation(case, data):
    case.call_and_validate(checks=CHECKS)
    if isinstance(case.query, dict) and ("symbol" in case.query or "symbols" in case.query):
        # The same parameters for a symbol that exists, so the 200 answers are checked too.
        known = "symbols" if "symbols" in case.query else "symbol"
        case.query = {**case.query, known: "AAPL"}
        case.call_and_validate(checks=CHECKS)
