"""Exit 0 when the gateway in this container answers GET /healthz with 200 (Docker HEALTHCHECK).

Django rejects a Host header that is not in ALLOWED_HOSTS, so the request names the
first configured host rather than 127.0.0.1. Standard library only: the slim image
has no curl.
"""

from __future__ import annotations

import http.client
import os
import sys


def main() -> int:
    """Ask the local gateway for /healthz and report the outcome as an exit status."""
    hosts = [h.strip() for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(",") if h.strip()]
    host = next((h.lstrip(".") for h in hosts if h != "*"), "localhost")
    port = int(os.environ.get("PORT", "8000"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        # X-Forwarded-Proto: the check comes from inside, not through the TLS proxy.
        conn.request("GET", "/healthz", headers={"Host": host, "X-Forwarded-Proto": "https"})
        status = conn.getresponse().status
    except OSError as exc:
        print(f"healthz: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if status != 200:
        print(f"healthz: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
