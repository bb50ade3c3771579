"""ASGI entry point: HTTP to Django, WebSocket to Channels consumers."""

import os
from typing import Any

from asgiref.sync import sync_to_async
from asgiref.wsgi import WsgiToAsgi, WsgiToAsgiInstance
from django.core.wsgi import get_wsgi_application

from marketdata.cache.redis_client import COUNTED_KEY
from ops import tracing
from ops.runtime import interpreter_tune, warm_up

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
# Before Django loads its middleware: the Django instrumentation adds its own (a no-op
# without OTEL_EXPORTER_OTLP_ENDPOINT).
tracing.setup(service_name="marketdata-gateway")


class _PooledWsgiInstance(WsgiToAsgiInstance):
    """asgiref's WSGI adapter, run in a pool of threads instead of the one thread-sensitive thread.

    asgiref runs every request of the process in a single thread (sync_to_async is
    thread-sensitive by default), so one request's database and Redis waits held up all
    the others. Django's WSGI handler is thread-safe (one database connection per thread,
    from the pool, returned when request_finished fires), so requests run concurrently in
    the event loop's default executor here. bench/history.py measured the same idea:
    cached p95 190 -> 110 ms at 200 users on 2 cores.

    A response that is not streamed is run whole in the thread (the body joined, the
    response closed there, which fires request_finished in the thread that holds the
    database connection), then sent from the event loop: one hop per request, where
    asgiref hops back to the loop for each of its three messages (~0.3 ms of CPU a
    request). Streamed responses (files, StreamingHttpResponse) go chunk by chunk as in
    asgiref.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.send_now = send
        await super().__call__(scope, receive, send)

    def build_environ(self, scope: Any, body: Any) -> dict[str, Any]:
        environ: dict[str, Any] = super().build_environ(scope, body)
        if COUNTED_KEY in scope:
            environ[COUNTED_KEY] = scope[COUNTED_KEY]
        return environ

    async def run_wsgi_app(self, body: Any) -> None:
        whole = await sync_to_async(self._run_whole, thread_sensitive=False)(body)
        if whole is not None:
            start, content = whole
            await self.send_now(start)
            await self.send_now({"type": "http.response.body", "body": content})

    def _run_whole(self, body: Any) -> tuple[dict[str, Any], bytes] | None:
        try:
            environ = self.build_environ(self.scope, body)
        except ValueError:
            _RUN_WSGI_APP(self, body)  # asgiref's own 400 for too many duplicate headers
            return None
        result = self.wsgi_application(environ, self.start_response)
        try:
            if getattr(result, "streaming", True):
                self._stream(result)
                return None
            content = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if self.response_content_length is not None:
            content = content[: self.response_content_length]
        self.response_started = True
        return self.response_start, content

    def _stream(self, result: Any) -> None:
        """asgiref's loop: each chunk sent from this thread as it comes."""
        sent = 0
        for output in result:
            if not self.response_started:
                self.response_started = True
                self.sync_send(self.response_start)
            if self.response_content_length is not None:
                output = output[: self.response_content_length - sent]
            self.sync_send({"type": "http.response.body", "body": output, "more_body": True})
            sent += len(output)
            if sent == self.response_content_length:
                break
        if not self.response_started:
            self.response_started = True
            self.sync_send(self.response_start)
        self.sync_send({"type": "http.response.body"})


_RUN_WSGI_APP = WsgiToAsgiInstance.__dict__["run_wsgi_app"].func


class PooledWsgiToAsgi(WsgiToAsgi):
    """WsgiToAsgi whose requests run in a pool of threads (see _PooledWsgiInstance)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await _PooledWsgiInstance(self.wsgi_application, self.duplicate_header_limit)(scope, receive, send)


# HTTP goes through Django's WSGI handler: a request runs its whole (sync) middleware chain
# and view in one worker thread, where Django's ASGI handler hops between the event loop
# and a thread for each middleware hook. Measured with bench/history.py on 2 cores:
# 128 -> 183 cached req/s, p50 480 -> 32 ms at 200 users (WsgiToAsgi against Django's ASGI
# handler). It also sets Django up, which must happen before anything imports models.
django_http_app = PooledWsgiToAsgi(get_wsgi_application())

from marketdata.api.hot import OhlcvFastPath  # noqa: E402

# GET /v1/ohlcv with an API token this process knows: answered in the event loop (see
# marketdata.api.hot); every other request, and any that path declines, goes to Django.
http_app = OhlcvFastPath(django_http_app)

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from ops.admission import Admission  # noqa: E402
from streaming.auth import SessionUserMiddleware  # noqa: E402
from streaming.routing import websocket_urlpatterns  # noqa: E402

warm_up()
interpreter_tune()  # everything long-lived is loaded by now

# Per client address, a bounded number of requests and handshakes served at once; the rest
# wait their turn (ops/admission.py), so one flooding client queues behind itself.
application = Admission(
    ProtocolTypeRouter(
        {
            "http": http_app,
            # The session and user, read once per connection (not Channels' AuthMiddlewareStack,
            # which checks the session on every frame sent: see streaming/auth.py).
            "websocket": SessionUserMiddleware(URLRouter(websocket_urlpatterns)),
        }
    )
)
