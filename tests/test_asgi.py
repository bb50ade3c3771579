"""config.asgi's HTTP adapter: whole responses in one hop, streamed ones chunk by chunk."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.signals import request_finished
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.test import override_settings
from django.urls import path

from config.asgi import PooledWsgiToAsgi


def _scope(path_: str) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path_, "raw_path": path_.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
    }  # fmt: skip


def _call(app: Any, path_: str) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(_scope(path_), receive, send))
    return sent


views_threads: list[int] = []


def whole(request: HttpRequest) -> HttpResponse:
    views_threads.append(threading.get_ident())
    return HttpResponse(b"x" * 100_000, content_type="application/json")


def streamed(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter([b"one,", b"two,", b"three"]), content_type="text/plain")


urlpatterns = [path("whole", whole), path("streamed", streamed)]


@pytest.fixture
def app() -> Iterator[PooledWsgiToAsgi]:
    from django.core.wsgi import get_wsgi_application

    with override_settings(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["testserver"]):
        yield PooledWsgiToAsgi(get_wsgi_application())


@pytest.mark.django_db
def test_a_whole_response_is_one_start_and_one_body_and_finishes_in_its_thread(app):
    finished: list[int] = []

    def note(**kwargs: Any) -> None:
        finished.append(threading.get_ident())

    request_finished.connect(note)
    try:
        sent = _call(app, "/whole")
    finally:
        request_finished.disconnect(note)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200
    assert (b"content-length", b"100000") in sent[0]["headers"]
    assert sent[1]["body"] == b"x" * 100_000
    assert not sent[1].get("more_body")
    # The response was closed (request_finished: the database connection goes back) in the view's thread.
    assert finished == [views_threads[-1]]
    assert finished[0] != threading.get_ident()


@pytest.mark.django_db
def test_a_streamed_response_goes_chunk_by_chunk(app):
    sent = _call(app, "/streamed")
    assert sent[0]["type"] == "http.response.start"
    bodies = [m["body"] for m in sent[1:] if m.get("body")]
    assert bodies == [b"one,", b"two,", b"three"]
    assert sent[-1] == {"type": "http.response.body"}
