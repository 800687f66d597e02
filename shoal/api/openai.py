import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from shoal.api import best_of
from shoal.api.errors import APIError
from shoal.api.schemas import FINISH, ChatCompletionRequest, CompletionRequest, SamplingFields
from shoal.coordinator.admission import Ticket
from shoal.coordinator.coordinator import ModelNotFound, NoCapacity, TooLong
from shoal.coordinator.jobs import Job
from shoal.worker.channel import Message

router = APIRouter(tags=["openai"])
log = logging.getLogger("shoal.api")


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    request.app.state.server.authorize(request)
    models = request.app.state.server.coordinator.catalog.models()
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "shoal",
                                        "context_length": info["context"], "workers": info["workers"],
                                        "stages": info["stages"]}
                                       for name, info in sorted(models.items())]}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict | StreamingResponse:
    return await _complete(request, body, body.chat(), chat=True)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> dict | StreamingResponse:
    return await _complete(request, body, body.prompt, chat=False)


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    last_token_at: float | None = None
    done: Message | None = None


async def _complete(request: Request, body: SamplingFields, prompt: object, chat: bool) -> dict | StreamingResponse:
    if body.best_of is not None and body.best_of > 1:
        return await best_of.complete(request, body, prompt, chat)
    server = request.app.state.server
    started = time.monotonic()
    if body.n > 1 and body.session_id:
        raise APIError(400, "a session continues one conversation: n must be 1 with session_id", "n")
    ticket = server.admit(request, body.n * (len(json.dumps(prompt)) // 3 + (body.limit() or 256)))
    user = server.account(request)
    run = Run(server, body, chat, started, ticket)
    try:
        for i in range(body.n):
            run.jobs.append(await server.coordinator.submit(body.model, prompt, body.engine_params(body.limit(), i),
                                                            body.session_id, body.priority, user.id, user.kudos))
        await run.open()
    except ModelNotFound as e:
        await run.close()
        raise APIError(404, str(e), "model", "model_not_found") from e
    except NoCapacity as e:
        await run.close()
        raise APIError(503, str(e), code="no_capacity") from e
    except TooLong as e:
        await run.close()
        raise APIError(400, str(e), "max_tokens", "context_length_exceeded") from e
    except BaseException:
        await run.close()
        raise
    if body.stream:
        return StreamingResponse(run.sse(), media_type="text/event-stream")
    return await run.collect()


class Run:
    """The jobs of one API request (one per choice), turned into an OpenAI response or SSE chunks."""

    def __init__(self, server, body: SamplingFields, chat: bool, started: float, ticket: Ticket):
        self.server, self.body, self.chat, self.started, self.ticket = server, body, chat, started, ticket
        self.admitted = time.monotonic()
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.jobs: list[Job] = []
        self.choices = [Choice() for _ in range(body.n)]
        self.first: list[Message] = []
        self.first_token_at: float | None = None
        self.closed = False

    async def open(self) -> None:
        """Wait for each job's first message, so that a refused job becomes an HTTP error, not a broken stream."""
        self.first = [await anext(job) for job in self.jobs]
        for msg in self.first:
            if msg["type"] == "done" and msg.get("code") in ("invalid_request", "sticky_busy"):
                status = 409 if msg["code"] == "sticky_busy" else 400
                raise APIError(status, msg["error"], code=msg["code"])

    async def messages(self) -> AsyncIterator[tuple[int, Message]]:
        if len(self.jobs) == 1:  # the common case needs no merging task
            self._apply(0, self.first[0])
            yield 0, self.first[0]
            async for msg in self.jobs[0]:
                self._apply(0, msg)
                yield 0, msg
            return
        queue: asyncio.Queue[tuple[int, Message | None]] = asyncio.Queue()

        async def pump(i: int, job: Job) -> None:
            await queue.put((i, self.first[i]))
            async for msg in job:
                await queue.put((i, msg))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(self.jobs)]
        try:
            for _ in range(len(self.jobs)):
                while (item := await queue.get())[1] is not None:
                    self._apply(*item)
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    def _apply(self, i: int, msg: Message) -> None:
        choice, now = self.choices[i], time.monotonic()
        metrics = self.server.metrics
        if msg["type"] == "done":
            choice.done = msg
            return
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.ttft.observe(now - self.started)
        if choice.last_token_at is not None:
            metrics.itl.observe(now - choice.last_token_at)
        choice.last_token_at = now
        if msg["kind"] in ("text", "thinking"):
            (choice.thinking if msg["kind"] == "thinking" else choice.text).append(msg["text"])
        choice.logprobs += msg.get("logprobs") or []

    async def collect(self) -> dict:
        try:
            async for _ in self.messages():
                pass
        finally:
            await self.close()
        self._raise_if_failed()
        out = [self._choice(i, c) for i, c in enumerate(self.choices)]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.body.model, "choices": out, "usage": self.usage()}

    def _raise_if_failed(self) -> None:
        for c in self.choices:
            if c.done and c.done["finish_reason"] == "error":
                raise APIError(500 if c.done.get("code") is None else 400, c.done.get("error") or "generation failed",
                               code=c.done.get("code") or "generation_failed")

    def _choice(self, i: int, c: Choice) -> dict:
        reason = FINISH.get((c.done or {}).get("finish_reason", "stop"), "stop")
        if self.chat:
            message = {"role": "assistant", "content": "".join(c.text)}
            if c.thinking:
                message["reasoning_content"] = "".join(c.thinking)
            logprobs = {"content": [chat_logprob(e) for e in c.logprobs]} if self.body.logprobs_k() is not None \
                else None
            return {"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason}
        logprobs = completion_logprobs(c.logprobs) if self.body.logprobs_k() is not None else None
        return {"index": i, "text": "".join(c.text), "logprobs": logprobs, "finish_reason": reason}

    def usage(self) -> dict:
        stats = [(c.done or {}).get("stats") or {} for c in self.choices]
        prompt = stats[0].get("prompt_tokens", 0) if stats else 0
        completion = sum(s.get("completion_tokens", 0) for s in stats)
        cached = stats[0].get("cache_delta", {}).get("read", 0) if stats else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def sse(self) -> AsyncIterator[str]:
        """The SSE stream; events already waiting when one is written go out with it, in one send, so a busy
        server makes fewer, larger writes instead of falling further behind."""
        pending: list[str] = []
        try:
            async with contextlib.aclosing(self._events()) as events:
                async for event in events:
                    pending.append(event)
                    if not (len(self.jobs) == 1 and self.jobs[0].ready):
                        yield "".join(pending)
                        pending.clear()
        finally:
            await self.close()

    async def _events(self) -> AsyncIterator[str]:
        sent_role = set()
        async for i, msg in self.messages():
            if msg["type"] == "done":
                if msg["finish_reason"] == "error":
                    yield _sse(APIError(500, msg.get("error") or "generation failed",
                                        code="generation_failed").body())
                    continue
                yield _sse(self._chunk(i, {}, FINISH.get(msg["finish_reason"], "stop")))
                continue
            delta = self._delta(msg, first=i not in sent_role)
            sent_role.add(i)
            if delta is not None:
                yield _sse(self._chunk(i, delta, None, msg.get("logprobs")))
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield _sse({**self._envelope(), "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"

    def _delta(self, msg: Message, first: bool) -> dict | None:
        if not self.chat:
            return {"text": msg["text"]} if msg["kind"] == "text" else None
        delta = {"role": "assistant"} if first else {}
        if msg["kind"] == "thinking":
            delta["reasoning_content"] = msg["text"]
        elif msg["kind"] == "text":
            delta["content"] = msg["text"]
        return delta

    def _envelope(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.body.model}

    def _chunk(self, i: int, delta: dict, reason: str | None, logprobs: list[dict] | None = None) -> dict:
        if self.chat:
            lp = {"content": [chat_logprob(e) for e in logprobs]} if logprobs else None
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
        else:
            lp = completion_logprobs(logprobs) if logprobs else None
            choice = {"index": i, "text": delta.get("text", ""), "logprobs": lp, "finish_reason": reason}
        return {**self._envelope(), "choices": [choice]}

    async def close(self) -> None:
        """Cancel unfinished jobs (the client may have gone), settle fair use, record the request."""
        if self.closed:
            return
        self.closed = True
        for job in self.jobs:
            await self.server.coordinator.cancel(job)
        used = sum(((c.done or {}).get("stats") or {}).get("completion_tokens", 0) for c in self.choices)
        self.ticket.release(self.usage()["prompt_tokens"] + used)
        budget = {"admission_ms": 1000 * (self.admitted - self.started)}
        for job, c in zip(self.jobs, self.choices, strict=False):
            budget |= job.budget()
            reason = (c.done or {}).get("finish_reason", "cancelled")
            self.server.metrics.observe_done((c.done or {}).get("stats"), reason, budget)
            log.info("request finished", extra={"request": self.id, "job": job.id, "model": self.body.model,
                                                "finish_reason": reason, **budget})
        self.server.metrics.e2e.observe(time.monotonic() - self.started)


def chat_logprob(entry: dict) -> dict:
    def one(e: dict) -> dict:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode())}

    return {**one(entry), "top_logprobs": [one(t) for t in entry["top"]]}


def completion_logprobs(entries: list[dict]) -> dict:
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top"]} for e in entries], "text_offset": offsets}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
