"""The Content-Security-Policy header: django-csp's middleware with two per-request additions.

- ``connect-src`` also names the page's own WebSocket origin (``ws://`` or ``wss://`` and
  the request's host, already checked against ALLOWED_HOSTS): CSP Level 3 lets ``'self'``
  match it, but browsers that predate that rule (Safari before 15.4) do not.
- The Swagger UI page (``/v1/docs``, drf-spectacular's template) starts Swagger UI with an
  inline script and styles itself with an inline ``<style>``: that page alone may run
  inline script and style. It renders the API schema, never market data or user input.
"""

from __future__ import annotations

from csp.constants import UNSAFE_INLINE
from csp.middleware import CSPMiddleware as BaseCSPMiddleware
from csp.middleware import PolicyParts
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest
from django.http.response import HttpResponseBase

# URL names (namespace:name) whose pages get these directives added to the policy.
RELAXED_VIEWS = {
    "api:docs": {"script-src": [UNSAFE_INLINE], "style-src": [UNSAFE_INLINE]},
}


class CSPMiddleware(BaseCSPMiddleware):
    """Send the policy of CONTENT_SECURITY_POLICY, plus the page's WebSocket origin and per-view relaxations."""

    def get_policy_parts(
        self,
        request: HttpRequest,
        response: HttpResponseBase,
        report_only: bool = False,
    ) -> PolicyParts:
        parts = super().get_policy_parts(request, response, report_only)
        if report_only:
            return parts
        update: dict[str, list[str]] = {k: list(v) for k, v in (parts.update or {}).items()}
        try:
            host = request.get_host()
        except DisallowedHost:  # answered 400 already; 'self' still stands
            host = ""
        if host:
            scheme = "wss" if request.is_secure() else "ws"
            update.setdefault("connect-src", []).append(f"{scheme}://{host}")
        match = request.resolver_match
        for directive, sources in RELAXED_VIEWS.get(match.view_name if match else "", {}).items():
            update.setdefault(directive, []).extend(sources)
        parts.update = update
        return parts
