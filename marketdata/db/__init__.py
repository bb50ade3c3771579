"""PostgreSQL backend that takes the TimescaleDB path only where the extension exists."""
