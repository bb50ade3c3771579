"""HTTP routes: admin, REST API, operations endpoints, the chart page."""

from django.contrib import admin
from django.urls import include, path

from ops import views as ops_views
from streaming import views as streaming_views

urlpatterns = [
    path("", streaming_views.chart_page, name="chart"),
    path("admin/", admin.site.urls),
    path("v1/", include("marketdata.api.urls")),
    path("healthz", ops_views.healthz, name="healthz"),
    path("readyz", ops_views.readyz, name="readyz"),
    path("metrics", ops_views.metrics_view, name="metrics"),
]
