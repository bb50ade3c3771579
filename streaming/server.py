"""The gateway's server: daphne, plus what lets a consumer see its client's socket buffer.

daphne hands every ``websocket.send`` straight to Twisted, which buffers without limit
when a client stops reading: an ASGI application cannot tell a slow client from a fast
one. This server adds a scope extension, ``marketdata.transport``, whose ``buffered()``
returns the bytes the socket still holds for that client; streaming.consumers waits
while it is over WS_TRANSPORT_HIGH_BYTES, so the connection's own bounded queue fills
and the slow client is closed with 4008. Under another server (uvicorn awaits the
socket's drain in ``send``) the extension is absent and not needed.

It also sets two of daphne's defaults for bursts of connections (CONNECT_TIMEOUT_S,
LISTEN_BACKLOG); arguments given on the command line win; and it drops Twisted's own
access line (``quiet_twisted_access_log``); and it sends the reason of a close in the
close frame (``close_reasons_sent``), which daphne drops. Run it exactly like daphne:
``python -m streaming.server -b 0.0.0.0 -p 8000 config.asgi:application``.
"""

from __future__ import annotations

import sys
from typing import Any

TRANSPORT_EXTENSION = "marketdata.transport"
# daphne's defaults are made for a quiet server: a WebSocket handshake that the
# application has not accepted within 5 s is refused, and Twisted listens with a backlog
# of 50. During a reconnect storm (a gateway restarted, 10x users in 10 s) both refuse
# clients that would have been served a moment later; these let them wait instead.
CONNECT_TIMEOUT_S = 30
LISTEN_BACKLOG = 2048


def transport_buffered(transport: Any) -> int:
    """Bytes a Twisted transport holds, not yet written to the socket (0 if unknown)."""
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except AttributeError:
        return 0


def quiet_twisted_access_log() -> None:
    """Stop Twisted's HTTP factory formatting a combined-log line for every request.

    daphne keeps its own access log (``--access-log``, through its action logger); Twisted's
    line goes to its legacy log, which nothing here reads (the gateway logs through
    structlog), and formatting it cost 3.5% of the gateway's interpreter time on cached
    history pages (bench/history.py).
    """
    from daphne.http_protocol import HTTPFactory

    HTTPFactory.log = _no_access_line


def _no_access_line(self: Any, request: Any) -> None:
    """Twisted's HTTPFactory.log, writing nothing."""


def close_reasons_sent() -> None:
    """Send the reason of a ``websocket.close`` in the close frame (daphne drops it; ASGI allows it).

    A client closed 4029 or 4003 learns why (which limit, which refusal) instead of a bare code.
    """
    from daphne.ws_protocol import WebSocketProtocol

    handle_reply = WebSocketProtocol.handle_reply

    def with_reason(self: Any, message: dict[str, Any]) -> None:
        reason = message.get("reason")
        if message.get("type") == "websocket.close" and reason and self.state != self.STATE_CONNECTING:
            # A close frame's payload is at most 125 bytes: the code's 2, then the reason.
            self.sendClose(code=message.get("code") or 1000, reason=reason.encode()[:123].decode("utf-8", "ignore"))
            return
        handle_reply(self, message)

    WebSocketProtocol.handle_reply = with_reason


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

    import daphne.cli

    def endpoints(*args: Any, **kwargs: Any) -> list[str]:
        built = build_endpoints(*args, **kwargs)
        return [f"{e}:backlog={LISTEN_BACKLOG}" if e.startswith("tcp:") and "backlog=" not in e else e for e in built]

    build_endpoints = daphne.cli.build_endpoint_description_strings
    daphne.cli.build_endpoint_description_strings = endpoints
    quiet_twisted_access_log()
    close_reasons_sent()
    sys.argv[1:] = with_defaults(sys.argv[1:])
    GatewayCommandLine.entrypoint()


def with_defaults(argv: list[str]) -> list[str]:
    """daphne's arguments with the gateway's defaults where they are not given."""
    given = {a.split("=", 1)[0] for a in argv}
    extra = [] if "--websocket_connect_timeout" in given else ["--websocket_connect_timeout", str(CONNECT_TIMEOUT_S)]
    return extra + argv


if __name__ == "__main__":
    main()
