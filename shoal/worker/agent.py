import asyncio
import contextlib
import logging
from dataclasses import fields

from shoal import __version__
from shoal.engine import Engine, EngineError, SamplingParams, StickyBusy
from shoal.worker.channel import ChannelClosed, Message, Transport

log = logging.getLogger("shoal.worker")
PARAMS = {f.name for f in fields(SamplingParams)}


class WorkerAgent:
    """Serves one engine over one channel to the coordinator: pulls jobs by credit, streams tokens back.

    Each job may have at most `window` token messages the coordinator has not acknowledged; a job
    whose reader is slow therefore stops pulling from its engine stream, and the engine pauses
    that request alone.
    """

    def __init__(self, engine: Engine, model_name: str, channel: Transport, name: str = "local", window: int = 32,
                 heartbeat_s: float = 2.0):
        self.engine, self.model_name, self.channel, self.name = engine, model_name, channel, name
        self.window, self.heartbeat_s = window, heartbeat_s
        self._windows: dict[str, asyncio.Semaphore] = {}
        self._tasks: set[asyncio.Task] = set()

    def hello(self) -> Message:
        model = self.engine.model
        return {"type": "hello", "name": self.name, "version": __version__, "slots": self.engine.config.n_seq_max,
                "models": [{"name": self.model_name, "layers": [model.start, model.end],
                            "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
                            "n_layers": model.config.num_hidden_layers, "context": self.engine.context_len}]}

    async def run(self) -> None:
        await self.channel.send(self.hello())
        await self.channel.send({"type": "credit", "n": self.engine.config.n_seq_max})
        beat = asyncio.create_task(self._heartbeat())
        try:
            while True:
                self._handle(await self.channel.recv())
        except ChannelClosed:
            pass
        finally:
            beat.cancel()
            for task in self._tasks:
                task.cancel()

    async def drain(self) -> None:
        """Take no new jobs, let the ones in flight finish, then close the connection."""
        await self._send({"type": "drain"})
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        self.channel.close()

    def _handle(self, msg: Message) -> None:
        kind = msg.get("type")
        if kind == "assign":
            task = asyncio.create_task(self._run_job(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "cancel":
            self.engine.cancel(msg["job"])
            for _ in range(self.window if msg["job"] in self._windows else 0):
                self._windows[msg["job"]].release()  # nobody will ack now: let the job run to its end
        elif kind == "ack" and msg["job"] in self._windows:
            for _ in range(msg["n"]):
                self._windows[msg["job"]].release()
        elif kind == "error":
            log.warning("the coordinator reports an error", extra={"error": msg.get("error")})
        else:
            log.warning("ignoring message of type %r", kind)

    async def _run_job(self, msg: Message) -> None:
        job = msg["job"]
        try:
            params = SamplingParams(**{k: v for k, v in msg.get("params", {}).items() if k in PARAMS})
            params.logit_bias = {int(k): v for k, v in params.logit_bias.items()}
            stream = self.engine.submit(msg["prompt"], params, session_id=msg.get("session_id"),
                                        priority=msg.get("priority", 0), request_id=job)
        except (EngineError, TypeError) as e:
            code = "sticky_busy" if isinstance(e, StickyBusy) else "invalid_request"
            await self._send({"type": "done", "job": job, "finish_reason": "error", "code": code, "error": str(e)})
            await self._send({"type": "credit", "n": 1})
            return
        self._windows[job] = window = asyncio.Semaphore(self.window)
        try:
            async for event in stream:
                if event.kind == "final":
                    stats = event.stats.to_dict()
                    await self._send({"type": "done", "job": job, "finish_reason": stats["finish_reason"],
                                      "error": stats["error"], "stats": stats})
                    continue
                await window.acquire()
                await self._send({"type": "tokens", "job": job, "kind": event.kind, "text": event.text,
                                  "token_ids": event.token_ids, "logprobs": self._logprobs(event.logprobs)})
        finally:
            self._windows.pop(job, None)
        await self._send({"type": "credit", "n": 1})

    def _logprobs(self, entries: list[dict] | None) -> list[dict] | None:
        if entries is None:
            return None
        text = self.engine.tokenizer.decode
        return [{"token": text([e["token"]]), "logprob": e["logprob"],
                 "top": [{"token": text([t]), "logprob": lp} for t, lp in e["top"]]} for e in entries]

    async def _heartbeat(self) -> None:
        while True:
            await self._send({"type": "heartbeat", "snapshot": self.engine.snapshot()})
            await asyncio.sleep(self.heartbeat_s)

    async def _send(self, msg: Message) -> None:
        with contextlib.suppress(ChannelClosed):
            await self.channel.send(msg)
