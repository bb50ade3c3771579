"""The chart page at /: served where anonymous streaming is on, behind a login where it is off."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import User
from django.contrib.staticfiles import finders
from django.test import Client, override_settings

pytestmark = pytest.mark.django_db

STATIC_REF = re.compile(r'(?:src|href)="/static/([^"]+)"')


@override_settings(STREAMING_ALLOW_ANONYMOUS=True)
def test_page_is_served_to_anonymous_visitors_where_allowed():
    response = Client().get("/")

    assert response.status_code == 200
    html = response.content.decode()
    assert '<div id="chart"' in html
    assert 'data-ws-path="/ws/v1/stream"' in html
    assert 'data-symbols-url="/v1/symbols"' in html


@override_settings(STREAMING_ALLOW_ANONYMOUS=False)
def test_page_sends_anonymous_visitors_to_log_in_where_not_allowed():
    response = Client().get("/")

    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/"


@override_settings(STREAMING_ALLOW_ANONYMOUS=False)
def test_page_is_served_to_a_logged_in_user_where_anonymous_is_off():
    client = Client()
    client.force_login(User.objects.create_user("trader", password="pw-for-tests-only"))

    assert client.get("/").status_code == 200


def test_every_static_file_the_page_references_exists():
    html = Client().get("/").content.decode()
    refs = STATIC_REF.findall(html)

    # The page's own JS and CSS, and lightweight-charts as `make assets` copies it from npm.
    assert {"chart/chart.js", "chart/feed.js", "chart/chart.css"} <= set(refs)
    assert "vendor/lightweight-charts.standalone.production.js" in refs
    missing = [ref for ref in refs if not finders.find(ref)]
    assert not missing, f"static files not found (run `make assets` for vendor/): {missing}"


def test_page_has_no_inline_script_or_style():
    """A strict Content-Security-Policy (no 'unsafe-inline') must be able to serve the page."""
    html = Client().get("/").content.decode()

    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script>"
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html), "inline style attribute"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"


def test_page_answers_only_safe_methods():
    assert Client().post("/").status_code == 405


@override_settings(STREAMING_ALLOW_ANONYMOUS=False)
def test_a_trader_who_is_not_staff_logs_in_and_gets_the_page():
    User.objects.create_user("trader", password="pw-for-tests-only")
    client = Client()
    form = client.get("/login/?next=/")
    assert form.status_code == 200
    assert 'name="password"' in form.content.decode()

    refused = client.post("/login/", {"username": "trader", "password": "wrong", "next": "/"})
    assert refused.status_code == 200
    assert "Wrong username or password" in refused.content.decode()

    response = client.post("/login/", {"username": "trader", "password": "pw-for-tests-only", "next": "/"})
    assert (response.status_code, response["Location"]) == (302, "/")
    assert client.get("/").status_code == 200
    client.post("/logout/")
    assert client.get("/")["Location"] == "/login/?next=/"
