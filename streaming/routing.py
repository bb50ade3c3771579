"""WebSocket routes."""

from django.urls import URLPattern, path

from .consumers import StreamConsumer

websocket_urlpatterns: list[URLPattern] = [
    path("ws/v1/stream", StreamConsumer.as_asgi()),
]
