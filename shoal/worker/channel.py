import asyncio
import json
from typing import Any, Protocol

import msgpack

Message = dict[str, Any]


def encode(message: Message) -> str | bytes:
    """A control message as JSON text; one carrying raw bytes in `data` (hidden states) as a binary frame:
    the length of a msgpack header of its other fields, the header, then the bytes as they are."""
    data = message.get("data")
    if data is None:
        return json.dumps(message)
    header = msgpack.packb({k: v for k, v in message.items() if k != "data"})
    return len(header).to_bytes(4, "big") + header + bytes(data)


def decode(frame: str | bytes) -> Message:
    """The message in a frame; ValueError names what is wrong with a malformed one."""
    if isinstance(frame, str):
        message = json.loads(frame)
    else:
        size = int.from_bytes(frame[:4], "big")
        if len(frame) < 4 + size:
            raise ValueError(f"a binary frame of {len(frame)} bytes cannot hold its {size}-byte header")
        try:
            message = msgpack.unpackb(frame[4:4 + size])
        except (msgpack.UnpackException, ValueError) as e:
            raise ValueError(f"bad msgpack header: {e}") from e
        if isinstance(message, dict):
            message["data"] = frame[4 + size:]
    if not isinstance(message, dict):
        raise ValueError("a message must be an object")
    return message


class ChannelClosed(Exception):
    """The other end of a worker channel went away."""


class Transport(Protocol):
    """What both sides of the worker protocol need from a connection: messages in order."""

    async def send(self, message: Message) -> None: ...

    async def recv(self) -> Message: ...

    def close(self) -> None: ...


class Channel:
    """One end of an in-process worker connection.

    Messages are encoded exactly as they would be over the network, so nothing but plain data
    crosses; the coordinator cannot tell this from a remote worker.
    """

    def __init__(self, inbox: asyncio.Queue[str | bytes | None], outbox: asyncio.Queue[str | bytes | None]):
        self._inbox, self._outbox = inbox, outbox
        self.closed = False

    async def send(self, message: Message) -> None:
        if self.closed:
            raise ChannelClosed("the channel is closed")
        await self._outbox.put(encode(message))

    async def recv(self) -> Message:
        data = await self._inbox.get()
        if data is None:
            self.closed = True
            raise ChannelClosed("the other end closed the channel")
        return decode(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._outbox.put_nowait(None)


def channel_pair() -> tuple[Channel, Channel]:
    """(worker end, coordinator end) of one connection."""
    a: asyncio.Queue[str | bytes | None] = asyncio.Queue()
    b: asyncio.Queue[str | bytes | None] = asyncio.Queue()
    return Channel(a, b), Channel(b, a)
