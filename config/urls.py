"""HTTP routes: admin, REST API, operations endpoints, the chart page."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from ops import views as ops_views
from streaming import views as streaming_views

urlpatterns = [
    path("", streaming_views.chart_page, name="chart"),
    # Traders log in here (the admin's login admits staff only); the WebSocket then streams
    # over the same session where anonymous streaming is off.
    path(
        "login/",
        auth_views.LoginView.as_view(template_name="login.html", redirect_authenticated_user=True),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(next_page="login"), name="logout"),
    path("admin/", admin.site.urls),
    path("v1/", include("marketdata.api.urls")),
    path("healthz", ops_views.healthz, name="healthz"),
    path("readyz", ops_views.readyz, name="readyz"),
    path("metrics", ops_views.metrics_view, name="metrics"),
]

# Under /v1 Django's error pages answer in the API's JSON envelope (SPEC 9: never HTML).
handler400 = "marketdata.api.exceptions.bad_request"
handler403 = "marketdata.api.exceptions.permission_denied"
handler404 = "marketdata.api.exceptions.page_not_found"
handler500 = "marketdata.api.exceptions.server_error"
