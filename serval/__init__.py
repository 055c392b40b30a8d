"""The bundled Serval stack: sans-IO core, host daemon, socket library and tools.

The library surface lives here::

    import serval

    with serval.socket(serval.SOCK_STREAM) as sock:
        sock.connect("web.example")          # or a serval.ServiceID
        sock.sendall(b"hello")

`serval.socket` is the socket class (as `socket.socket` is in the stdlib); the module that
defines it is imported as `from serval.socket import ...` (the package attribute is the class).
asyncio helpers: `serval.asyncio.open_connection` and `serval.asyncio.start_server`.
"""

from __future__ import annotations

from serval.core.ids import ServiceID
from serval.errors import (
    ControlProtocolError,
    ServalError,
    ServalOSError,
    ServiceIDError,
)
from serval.socket import (
    MAX_DATAGRAM_BYTES,
    SOCK_DGRAM,
    SOCK_STREAM,
    ConnectionInfo,
    ServalAddress,
    create_connection,
)

# Bound last, on purpose: `serval.socket` is the class, not the submodule of the same name.
from serval.socket import socket as socket

__all__ = [
    "MAX_DATAGRAM_BYTES",
    "SOCK_DGRAM",
    "SOCK_STREAM",
    "ConnectionInfo",
    "ControlProtocolError",
    "ServalAddress",
    "ServalError",
    "ServalOSError",
    "ServiceID",
    "ServiceIDError",
    "create_connection",
    "socket",
]
