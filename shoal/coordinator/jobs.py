import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.worker.channel import Message

TERMINAL = ("COMPLETED", "FAILED")
ACK_EVERY = 8  # well under the worker's window of unacknowledged messages


@dataclass(eq=False)
class Job:
    """One generation as the coordinator tracks it: RECEIVED, QUEUED, SCHEDULED (assigned to a worker),
    ACTIVE (tokens flowing), then COMPLETED or FAILED. Its worker's messages queue up for the reader."""

    id: str
    model: str
    prompt: Any
    params: dict
    session_id: str | None = None
    priority: int = 0
    user_id: int = 0
    kudos: float = 0.0
    arrival: int = 0
    state: str = "RECEIVED"
    worker: str | None = None
    worker_name: str | None = None
    reward: float = 0.0
    scheduling_s: float = 0.0
    unacked: int = 0
    times: dict[str, float] = field(default_factory=dict)
    result: Message | None = None
    retries: int = 0
    lease_until: float = 0.0
    sent_chars: int = 0
    sent_tokens: int = 0
    skip_chars: int = 0
    skip_tokens: int = 0
    messages: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    ack: Callable[["Job", int], Awaitable[None]] | None = None

    def __post_init__(self) -> None:
        self.mark("RECEIVED")

    def mark(self, state: str) -> None:
        self.state = state
        self.times.setdefault(state, time.monotonic())

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def restart(self) -> None:
        """Back to the queue after its worker was lost: a new worker regenerates it with the same seed, and
        what the reader already has is skipped, so the stream goes on with nothing repeated or missing."""
        self.worker, self.retries = None, self.retries + 1
        self.skip_chars, self.skip_tokens = self.sent_chars, self.sent_tokens

    def _trim(self, msg: Message) -> Message | None:
        if not (self.skip_chars or self.skip_tokens):
            return msg
        text, ids, lps = msg["text"], msg["token_ids"], msg.get("logprobs")
        chars, tokens = min(self.skip_chars, len(text)), min(self.skip_tokens, len(ids))
        self.skip_chars -= chars
        self.skip_tokens -= tokens
        if chars == len(text) and tokens == len(ids):
            return None
        return {**msg, "text": text[chars:], "token_ids": ids[tokens:], "logprobs": lps[tokens:] if lps else lps}

    def deliver(self, msg: Message) -> bool:
        """Queue a worker message for the reader; False if it only repeated what the reader already has."""
        if msg["type"] == "tokens":
            msg = self._trim(msg)
            if msg is None:
                return False
            self.sent_chars += len(msg["text"])
            self.sent_tokens += len(msg["token_ids"])
            if self.state != "ACTIVE":
                self.mark("ACTIVE")
        if msg["type"] == "done":
            self.result = msg
            self.mark("FAILED" if msg["finish_reason"] in ("error", "timeout") else "COMPLETED")
        self.messages.put_nowait(msg)
        return True

    @property
    def ready(self) -> bool:
        """Messages are waiting to be read."""
        return not self.messages.empty()

    def __aiter__(self) -> "Job":
        return self

    async def __anext__(self) -> Message:
        """The worker's tokens messages, then its done message; reading one acknowledges it."""
        if self.result is not None and self.messages.empty():
            raise StopAsyncIteration
        msg = await self.messages.get()
        self.unacked += msg["type"] == "tokens"
        # Acknowledge in groups while the reader is behind, at once when it has caught up or at the end.
        if self.unacked and self.ack is not None and (self.unacked >= ACK_EVERY or self.messages.empty()
                                                      or msg["type"] == "done"):
            await self.ack(self, self.unacked)
            self.unacked = 0
        return msg

    def budget(self) -> dict[str, float]:
        """Milliseconds spent in each stage. Scheduling is the coordinator's own work; waiting for a worker
        to have room, in the coordinator and then in the engine, is queue."""
        t = self.times
        stats = (self.result or {}).get("stats") or {}
        waited = t.get("SCHEDULED", t["RECEIVED"]) - t["RECEIVED"]
        return {"scheduling_ms": 1000 * self.scheduling_s, "queue_ms": 1000 * (waited - self.scheduling_s)
                + stats.get("queue_ms", 0.0), "prefill_ms": stats.get("prefill_ms", 0.0),
                "decode_ms": stats.get("decode_ms", 0.0)}
