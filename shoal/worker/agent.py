import asyncio
import contextlib
import logging
import os
from pathlib import Path

from shoal import __version__
from shoal.engine import Engine, EngineError, RequestStream, SamplingParams, StickyBusy
from shoal.engine.process import EngineProcess
from shoal.engine.sampler import logprob_entries
from shoal.engine.stage import StageEngine
from shoal.worker.channel import ChannelClosed, Message, Transport
from shoal.worker.peers import PeerServer
from shoal.worker.stages import StageServer

log = logging.getLogger("shoal.worker")


def headroom() -> float:
    """How much this machine has left, 0..1: the share of its cores not busy (1-minute load), cut further as its
    hottest thermal zone nears 95 °C, where CPUs throttle."""
    spare = 1.0 - min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    temps = []
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        with contextlib.suppress(OSError, ValueError):
            temps.append(int(zone.read_text()) / 1000)
    hot = min(1.0, max(0.0, (95.0 - max(temps)) / 25.0)) if temps else 1.0
    return round(spare * hot, 3)


class WorkerAgent:
    """Serves one engine over one channel to the coordinator: pulls jobs by credit, streams tokens back.

    Each job may have at most `window` token messages the coordinator has not acknowledged; a job
    whose reader is slow therefore stops pulling from its engine stream, and the engine pauses
    that request alone. A worker holding a layer range runs a StageEngine instead and serves route
    steps (stage_open, stage_in, stage_close); it takes no whole jobs. Given `peer` (host, port), it
    also listens there for steps the previous hop of a route pushes to it, and says where in its hello.
    """

    def __init__(self, engine: Engine | EngineProcess | StageEngine, model_name: str, channel: Transport,
                 name: str = "local", window: int = 32, heartbeat_s: float = 2.0, fingerprint: str | None = None,
                 peer: tuple[str, int] | None = None):
        self.engine, self.model_name, self.channel, self.name = engine, model_name, channel, name
        self.window, self.heartbeat_s, self.fingerprint = window, heartbeat_s, fingerprint
        self.stages = StageServer(engine, self._send) if isinstance(engine, StageEngine) else None
        self.peer, self.peer_address = peer, None
        self._windows: dict[str, asyncio.Semaphore] = {}
        self._tasks: set[asyncio.Task] = set()
        self.speed: float | None = None

    def hello(self) -> Message:
        info = {"name": self.model_name, **self.engine.describe(), "fingerprint": self.fingerprint}
        if self.stages is not None:
            info["ms_per_layer"] = self.speed
        return {"type": "hello", "name": self.name, "version": __version__, "slots": self.engine.config.n_seq_max,
                "tokens_per_s": None if self.stages else self.speed, "models": [info], "peer": self.peer_address}

    async def measure(self, tokens: int = 16) -> float:
        """One sequence's decode speed in tokens/s, from a short greedy run, for the coordinator's estimates."""
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        stream = self.engine.submit(list(range(1, 9)), params, request_id=f"measure-{self.name}")
        async for _ in stream:
            pass
        stats = stream.stats
        return round((stats.completion_tokens - 1) / max(stats.decode_ms / 1000, 1e-6), 1)

    async def run(self) -> None:
        self.speed = self.speed or await (self.stages.measure() if self.stages else self.measure())
        listener = PeerServer(self.stages.accept_push) if self.stages is not None and self.peer else None
        if listener is not None:
            try:
                self.peer_address = await listener.start(*self.peer)
            except OSError as e:
                log.warning("cannot listen for pushes; the coordinator relays every hop", extra={"error": str(e)})
                listener = None
        await self.channel.send(self.hello())
        await self.channel.send({"type": "credit", "n": 0 if self.stages else self.engine.config.n_seq_max})
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
            if listener is not None:
                listener.close()
            if self.stages is not None:
                self.stages.cancel()
                await self.stages.peers.close()

    async def drain(self) -> None:
        """Take no new jobs, let the ones in flight finish, then close the connection."""
        await self._send({"type": "drain"})
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        self.channel.close()

    def _handle(self, msg: Message) -> None:
        kind = msg.get("type")
        if kind in ("stage_open", "stage_in", "stage_close") and self.stages is not None:
            self.stages.handle(msg)
        elif kind == "assign":
            task = asyncio.create_task(self._run_job(msg["job"], self._start(msg)))
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

    def _start(self, msg: Message) -> RequestStream | EngineError:
        """Submit an assigned job now rather than when its task first runs: after a tick that ended many jobs, the
        event loop has all their HTTP responses to finish first, and the engine would run that long short of work."""
        try:
            params = SamplingParams.from_wire(msg.get("params", {}))
            return self.engine.submit(msg["prompt"], params, session_id=msg.get("session_id"),
                                      priority=msg.get("priority", 0), request_id=msg["job"])
        except EngineError as e:
            return e
        except TypeError as e:
            return EngineError(str(e))

    async def _run_job(self, job: str, stream: RequestStream | EngineError) -> None:
        if isinstance(stream, EngineError):
            code = "sticky_busy" if isinstance(stream, StickyBusy) else "invalid_request"
            await self._send({"type": "done", "job": job, "finish_reason": "error", "code": code, "error": str(stream)})
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
                                  "token_ids": event.token_ids,
                                  "logprobs": logprob_entries(self.engine.tokenizer, event.logprobs)})
        finally:
            self._windows.pop(job, None)
        await self._send({"type": "credit", "n": 1})

    async def _heartbeat(self) -> None:
        while True:
            await self._send({"type": "heartbeat", "snapshot": {**self.engine.snapshot(), "headroom": headroom()}})
            await asyncio.sleep(self.heartbeat_s)

    async def _send(self, msg: Message) -> None:
        with contextlib.suppress(ChannelClosed):
            await self.channel.send(msg)
