import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    """The final report of one request."""

    id: str
    finish_reason: str
    state: str
    prompt_tokens: int
    completion_tokens: int
    cache_hit_kind: str
    cache_delta: dict[str, int]
    queue_ms: float
    prefill_ms: float
    decode_ms: float
    finish_key: str | None
    times: dict[str, float]
    preemptions: int = 0
    error: str | None = None
    stop_sequence: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Event:
    """One streamed piece of a request: kind is text, thinking, tool_call or final."""

    kind: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    stats: Stats | None = None


class RequestStream:
    """The asyncio side of one request: an async iterator of its events, ending with the final one.

    The engine thread appends events; the consumer's pace is visible to the engine as `pending`,
    which is how a slow reader stalls only its own request.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], loop: asyncio.AbstractEventLoop,
                 cancel: Callable[[str], None]):
        self.id, self.prompt_ids = request_id, prompt_ids
        self.loop, self._cancel = loop, cancel
        self._events: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._done = False
        self.stats: Stats | None = None

    @property
    def pending(self) -> int:
        return len(self._events)

    def append(self, event: Event) -> None:
        """Called from the engine thread, which then wakes the consumer through `wake_all` on its loop."""
        self._events.append(event)

    @staticmethod
    def wake_all(streams: set["RequestStream"]) -> None:
        for stream in streams:
            stream._wake.set()

    def cancel(self) -> None:
        self._cancel(self.id)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Event:
        while not self._events:
            if self._done:
                raise StopAsyncIteration
            self._wake.clear()
            if not self._events:
                await self._wake.wait()
        event = self._events.popleft()
        if event.kind == "final":
            self._done, self.stats = True, event.stats
        return event

    async def result(self) -> tuple[str, list[int], Stats]:
        """Read the whole stream: (plain text, completion token ids, final stats)."""
        text, ids = [], []
        async for event in self:
            ids += event.token_ids
            if event.kind == "text":
                text.append(event.text)
        assert self.stats is not None
        return "".join(text), ids, self.stats


def deliver(events: Iterable[tuple[RequestStream, Event]]) -> None:
    """Hand events to their streams from another thread, waking each event loop once rather than once per event."""
    woken: dict[asyncio.AbstractEventLoop, set[RequestStream]] = {}
    for stream, event in events:
        stream.append(event)
        woken.setdefault(stream.loop, set()).add(stream)
    for loop, streams in woken.items():
        try:
            loop.call_soon_threadsafe(RequestStream.wake_all, streams)
        except RuntimeError:  # the loop has closed, so nobody will read these requests
            for stream in streams:
                stream.cancel()
