"""The chart page: a live candlestick chart over the WebSocket stream (static JS and CSS)."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

WS_PATH = "/ws/v1/stream"


@require_safe
def chart_page(request: HttpRequest) -> HttpResponse:
    """Render the chart page; without anonymous streaming, send visitors to log in first."""
    # The WebSocket authenticates by this same session cookie, so logging in here is what
    # lets the page stream where anonymous access is off.
    if not settings.STREAMING_ALLOW_ANONYMOUS and not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path(), settings.LOGIN_URL)
    return render(request, "chart.html", {"ws_path": WS_PATH, "login_url": settings.LOGIN_URL})
