"""`shoal worker`: an engine serving a coordinator over one outgoing WebSocket, reconnecting with backoff."""

import asyncio
import logging
import signal

import websockets

from shoal.engine.process import EngineProcess
from shoal.engine.stage import StageEngine
from shoal.worker.agent import WorkerAgent
from shoal.worker.channel import ChannelClosed, Message, decode, encode

log = logging.getLogger("shoal.worker")


class ClientTransport:
    def __init__(self, ws: websockets.ClientConnection):
        self.ws = ws

    async def send(self, message: Message) -> None:
        try:
            await self.ws.send(encode(message))
        except websockets.ConnectionClosed as e:
            raise ChannelClosed(str(e)) from e

    async def recv(self) -> Message:
        try:
            return decode(await self.ws.recv())
        except websockets.ConnectionClosed as e:
            raise ChannelClosed(str(e)) from e

    def close(self) -> None:
        self._closing = asyncio.ensure_future(self.ws.close())


def ws_url(coordinator: str) -> str:
    base = coordinator.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return f"{base}/v1/workers/connect"


async def run_worker(coordinator: str, token: str, engine: EngineProcess | StageEngine, model_name: str, name: str,
                     fingerprint: str | None = None, max_backoff: float = 30.0, peer_host: str | None = None,
                     peer_port: int | None = 0) -> None:
    """Serve until SIGTERM or SIGINT, which drains: in-flight jobs finish, no new ones are taken. A stage listens
    for pushes from other stages on peer_host:peer_port (None: it does not; host default: the address it reaches
    the coordinator from; port 0: any free one)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    backoff, speed = 0.5, None
    while not stop.is_set():
        try:
            async with websockets.connect(ws_url(coordinator), additional_headers={"Authorization": f"Bearer {token}"},
                                          max_size=None, compression=None) as ws:
                backoff = 0.5
                peer = None if peer_port is None else (peer_host or ws.local_address[0], peer_port)
                agent = WorkerAgent(engine, model_name, ClientTransport(ws), name, fingerprint=fingerprint, peer=peer)
                agent.speed = speed  # measured on the first connection only
                log.info("connected", extra={"coordinator": coordinator, "worker": name})
                serving = asyncio.create_task(agent.run())
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
                speed = agent.speed
                if stop.is_set():
                    await agent.drain()
                    return
        except (OSError, websockets.InvalidHandshake, websockets.ConnectionClosed) as e:
            log.warning("connection failed", extra={"error": str(e), "retry_in_s": backoff})
        try:
            await asyncio.wait_for(stop.wait(), backoff)
        except TimeoutError:
            backoff = min(max_backoff, backoff * 2)
