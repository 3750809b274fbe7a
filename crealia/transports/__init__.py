"""Client transports: how clients reach the session core (the contract: crealia._transport).

- ``_trio_ws.py``: the fast path, trio-websocket on its own port (a ``Transport``);
- ``_asgi.py``: the ``/ws`` route of the HTTP app, served by hypercorn;
- ``_deflate.py``: bounded permessage-deflate for both.

The subprotocol is ``crealia._wire.SUBPROTOCOL`` (the client offers the same constant); the
handshake policy (allowed hosts and origins) is ``Acceptor.check_handshake``.
"""
