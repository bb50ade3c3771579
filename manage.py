#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    """Run administrative tasks."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    from ops import tracing

    command = sys.argv[1] if len(sys.argv) > 1 else ""
    tracing.setup(service_name=f"marketdata-{command}" if command else "marketdata")  # no-op unless configured
    if command == "ingest" and os.environ.get("INGEST_METRICS_PORT"):
        from ops import metrics

        metrics.serve(int(os.environ["INGEST_METRICS_PORT"]))  # the ingester has no HTTP server of its own
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
