"""Stage-to-stage pushes: a stage hands its output straight to the next hop of a route.

The coordinator still gets every hop's output (it keeps the history that failover replays), but the
next hop no longer waits for the coordinator to pass it on: one network transfer and one coordinator
wake-up less per hop on the path of every token. This is what Petals' server-to-server streaming set
out to do. A stage accepts a push only with the secret the coordinator gave it for that session, and
a push that cannot be delivered falls back to the coordinator's relay.
"""

import asyncio
import logging
import time
from collections.abc import Callable

import websockets

from shoal.worker.channel import Message, decode, encode

log = logging.getLogger("shoal.worker")


class PeerServer:
    """Listens for pushes from other stages and hands each decoded message to `accept`."""

    def __init__(self, accept: Callable[[Message], None]):
        self.accept = accept
        self._server: websockets.Server | None = None

    async def start(self, host: str, port: int = 0) -> str:
        """Listen on host:port (0: any free port); returns the address other stages reach this one at."""
        self._server = await websockets.serve(self._serve, host, port, max_size=None, compression=None)
        bound = next(iter(self._server.sockets)).getsockname()
        return f"[{host}]:{bound[1]}" if ":" in host else f"{host}:{bound[1]}"

    async def _serve(self, ws: websockets.ServerConnection) -> None:
        async for frame in ws:
            try:
                self.accept(decode(frame))
            except ValueError as e:
                log.warning("dropping a malformed push", extra={"error": str(e)})

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


class Peers:
    """Connections to other stages, opened on first use and kept. After a failure an address is not tried
    again for `backoff_s`, so a stage that cannot be reached costs one connect timeout, not one a step."""

    def __init__(self, connect_timeout_s: float = 2.0, backoff_s: float = 30.0):
        self.connect_timeout_s, self.backoff_s = connect_timeout_s, backoff_s
        self._conns: dict[str, asyncio.Future[websockets.ClientConnection]] = {}
        self._failed: dict[str, float] = {}  # address -> when to try it again

    async def push(self, address: str, msg: Message) -> bool:
        """Send `msg` to the stage at host:port; False (and the connection dropped) if that failed."""
        if self._failed.get(address, 0.0) > time.monotonic():
            return False
        if address not in self._conns:
            self._conns[address] = asyncio.ensure_future(asyncio.wait_for(websockets.connect(
                f"ws://{address}", max_size=None, compression=None), self.connect_timeout_s))
        try:
            ws = await asyncio.shield(self._conns[address])
            await ws.send(encode(msg))
            return True
        except (OSError, TimeoutError, websockets.WebSocketException) as e:
            self._conns.pop(address, None)
            self._failed[address] = time.monotonic() + self.backoff_s
            log.warning("push failed; the coordinator relays", extra={"peer": address, "error": str(e)})
            return False

    async def close(self) -> None:
        for conn in self._conns.values():
            if conn.done() and not conn.cancelled() and not conn.exception():
                await conn.result().close()
        self._conns.clear()
