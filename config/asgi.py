"""ASGI entry point: HTTP to Django, WebSocket to Channels consumers."""

import os
from typing import Any

from asgiref.sync import sync_to_async
from asgiref.wsgi import WsgiToAsgi, WsgiToAsgiInstance
from django.core.wsgi import get_wsgi_application

from ops import tracing

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
    """

    async def run_wsgi_app(self, body: Any) -> None:
        await sync_to_async(_RUN_WSGI_APP, thread_sensitive=False)(self, body)


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
http_app = PooledWsgiToAsgi(get_wsgi_application())

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from streaming.auth import SessionUserMiddleware  # noqa: E402
from streaming.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": http_app,
        # The session and user, read once per connection (not Channels' AuthMiddlewareStack,
        # which checks the session on every frame sent: see streaming/auth.py).
        "websocket": SessionUserMiddleware(URLRouter(websocket_urlpatterns)),
    }
)
