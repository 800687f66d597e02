import asyncio
import hmac
import json
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from shoal.store.ledger import digest
from shoal.worker.channel import ChannelClosed, Message

router = APIRouter(tags=["workers"])
log = logging.getLogger("shoal.api.workers")


class WebSocketTransport:
    """The coordinator's end of a worker's WebSocket; a malformed frame becomes a `malformed` message."""

    def __init__(self, ws: WebSocket):
        self.ws = ws

    async def send(self, message: Message) -> None:
        try:
            await self.ws.send_text(json.dumps(message))
        except (WebSocketDisconnect, RuntimeError) as e:
            raise ChannelClosed(str(e)) from e

    async def recv(self) -> Message:
        try:
            data = await self.ws.receive_text()
        except (WebSocketDisconnect, RuntimeError) as e:
            raise ChannelClosed(str(e)) from e
        try:
            message = json.loads(data)
        except ValueError as e:
            return {"type": "malformed", "error": f"not JSON: {e}"}
        return message if isinstance(message, dict) else {"type": "malformed", "error": "not a JSON object"}

    def close(self) -> None:
        self._closing = asyncio.ensure_future(self.ws.close())


@router.websocket("/v1/workers/connect")
async def connect(ws: WebSocket) -> None:
    """A worker's one connection: bearer worker token, then the worker protocol until either side closes."""
    server = ws.app.state.server
    scheme, _, token = (ws.headers.get("authorization") or "").partition(" ")
    token = token if scheme.lower() == "bearer" else ""
    owner = server.ledger.worker_owner(token) if token else None
    if owner is None and not any(hmac.compare_digest(digest(token), known) for known in server.worker_tokens):
        await ws.close(code=1008, reason="unknown worker token")
        return
    await ws.accept()
    try:
        await server.coordinator.attach(WebSocketTransport(ws), None if owner is None else owner.id)
    except ValueError as e:
        log.warning("worker refused", extra={"reason": str(e)})
