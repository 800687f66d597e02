import asyncio
import hmac
import logging
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect

from shoal.api.errors import APIError
from shoal.store.ledger import Account, digest
from shoal.worker.channel import ChannelClosed, Message, decode, encode

router = APIRouter(tags=["workers"])
log = logging.getLogger("shoal.api.workers")


class WebSocketTransport:
    """The coordinator's end of a worker's WebSocket; a malformed frame becomes a `malformed` message."""

    def __init__(self, ws: WebSocket):
        self.ws = ws

    async def send(self, message: Message) -> None:
        frame = encode(message)
        try:
            await (self.ws.send_text(frame) if isinstance(frame, str) else self.ws.send_bytes(frame))
        except (WebSocketDisconnect, RuntimeError) as e:
            raise ChannelClosed(str(e)) from e

    async def recv(self) -> Message:
        try:
            frame = await self.ws.receive()
        except (WebSocketDisconnect, RuntimeError) as e:
            raise ChannelClosed(str(e)) from e
        if frame["type"] == "websocket.disconnect":
            raise ChannelClosed(f"the worker closed its connection ({frame.get('code')})")
        try:
            return decode(frame["text"] if frame.get("text") is not None else frame["bytes"])
        except ValueError as e:
            return {"type": "malformed", "error": f"malformed frame: {e}"}

    def close(self) -> None:
        self._closing = asyncio.ensure_future(self.ws.close())


@router.get("/v1/workers")
async def workers(request: Request) -> dict:
    """The pool as the coordinator sees it: workers (state, layers held, engine snapshot, banned), running routes."""
    request.app.state.server.authorize(request)
    return request.app.state.server.coordinator.snapshot()


def worker_token(server: Any, authorization: str | None) -> tuple[bool, Account | None]:
    """Whether a bearer worker token is valid, and the ledger user owning it (None for a --worker-token one)."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token if scheme.lower() == "bearer" else ""
    owner = server.ledger.worker_owner(token) if token else None
    return owner is not None or any(hmac.compare_digest(digest(token), known) for known in server.worker_tokens), owner


@router.get("/v1/workers/ranges")
async def ranges(request: Request, model: str, fingerprint: str | None = None) -> dict:
    """For a joining worker that may pick its layers: the ranges stage workers of these weights hold now."""
    server = request.app.state.server
    if not worker_token(server, request.headers.get("authorization"))[0]:
        raise APIError(401, "unknown worker token", code="invalid_worker_token")
    workers = server.coordinator.pipeline.stage_workers(model).get(fingerprint or "", [])
    return {"offers": [{"worker": w.id, "start": w.models[model]["layers"][0], "end": w.models[model]["layers"][1],
                        "ms_per_layer": w.models[model]["ms_per_layer"]} for w in workers]}


@router.websocket("/v1/workers/connect")
async def connect(ws: WebSocket) -> None:
    """A worker's one connection: bearer worker token, then the worker protocol until either side closes."""
    server = ws.app.state.server
    valid, owner = worker_token(server, ws.headers.get("authorization"))
    if not valid:
        await ws.close(code=1008, reason="unknown worker token")
        return
    await ws.accept()
    try:
        await server.coordinator.attach(WebSocketTransport(ws), None if owner is None else owner.id)
    except ValueError as e:
        log.warning("worker refused", extra={"reason": str(e)})
