"""The gateway's server: daphne, plus what lets a consumer see its client's socket buffer.

daphne hands every ``websocket.send`` straight to Twisted, which buffers without limit
when a client stops reading: an ASGI application cannot tell a slow client from a fast
one. This server adds a scope extension, ``marketdata.transport``, whose ``buffered()``
returns the bytes the socket still holds for that client; streaming.consumers waits
while it is over WS_TRANSPORT_HIGH_BYTES, so the connection's own bounded queue fills
and the slow client is closed with 4008. Under another server (uvicorn awaits the
socket's drain in ``send``) the extension is absent and not needed.

Run it exactly like daphne: ``python -m streaming.server -b 0.0.0.0 -p 8000 config.asgi:application``.
"""

from __future__ import annotations

from typing import Any

TRANSPORT_EXTENSION = "marketdata.transport"


def transport_buffered(transport: Any) -> int:
    """Bytes a Twisted transport holds, not yet written to the socket (0 if unknown)."""
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except AttributeError:
        return 0


def main() -> None:
    from ops import multiprocess

    multiprocess.prepare()  # before the application (and so any metric) is loaded
    from daphne.cli import CommandLineInterface
    from daphne.server import Server

    class GatewayServer(Server):
        def create_application(self, protocol: Any, scope: dict[str, Any]) -> Any:
            if scope.get("type") == "websocket":
                extensions = scope.setdefault("extensions", {})
                extensions[TRANSPORT_EXTENSION] = {"buffered": lambda: transport_buffered(protocol.transport)}
            return super().create_application(protocol, scope)

    class GatewayCommandLine(CommandLineInterface):
        server_class = GatewayServer

    GatewayCommandLine.entrypoint()


if __name__ == "__main__":
    main()
