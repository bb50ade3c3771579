"""Routes of the REST API v1, mounted at /v1/ by config.urls."""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from . import views

app_name = "api"

urlpatterns = [
    path("symbols", views.SymbolsView.as_view(), name="symbols"),
    path("ohlcv", views.OhlcvView.as_view(), name="ohlcv"),
    path("trades", views.TradesView.as_view(), name="trades"),
    path("latest", views.LatestView.as_view(), name="latest"),
    path("leaderboard", views.LeaderboardView.as_view(), name="leaderboard"),
    path("schema", SpectacularAPIView.as_view(), name="schema"),
    path("docs", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
]
