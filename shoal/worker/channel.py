import asyncio
import json
from typing import Any, Protocol

Message = dict[str, Any]


class ChannelClosed(Exception):
    """The other end of a worker channel went away."""


class Transport(Protocol):
    """What both sides of the worker protocol need from a connection: JSON messages in order."""

    async def send(self, message: Message) -> None: ...

    async def recv(self) -> Message: ...

    def close(self) -> None: ...


class Channel:
    """One end of an in-process worker connection.

    Messages go through JSON exactly as they would over the network, so nothing but plain data
    crosses; the coordinator cannot tell this from a remote worker.
    """

    def __init__(self, inbox: asyncio.Queue[str | None], outbox: asyncio.Queue[str | None]):
        self._inbox, self._outbox = inbox, outbox
        self.closed = False

    async def send(self, message: Message) -> None:
        if self.closed:
            raise ChannelClosed("the channel is closed")
        await self._outbox.put(json.dumps(message))

    async def recv(self) -> Message:
        data = await self._inbox.get()
        if data is None:
            self.closed = True
            raise ChannelClosed("the other end closed the channel")
        return json.loads(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._outbox.put_nowait(None)


def channel_pair() -> tuple[Channel, Channel]:
    """(worker end, coordinator end) of one connection."""
    a: asyncio.Queue[str | None] = asyncio.Queue()
    b: asyncio.Queue[str | None] = asyncio.Queue()
    return Channel(a, b), Channel(b, a)
