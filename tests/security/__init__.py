"""Security tests, one module per surface (issue 17): WebSocket access, limits, REST extremes, logs, ingester exits."""
