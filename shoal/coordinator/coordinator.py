import asyncio
import itertools
import logging
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from shoal.coordinator.jobs import Job
from shoal.coordinator.pipeline import Pipeline
from shoal.coordinator.queue import JobQueue
from shoal.coordinator.routes import Hop, NoRoute
from shoal.coordinator.workers import Catalog, WorkerConn
from shoal.worker.channel import ChannelClosed, Message, Transport

log = logging.getLogger("shoal.coordinator")
MAX_DROPS = 20  # jobs a worker may drop in an hour before it serves only its owner, as on the Horde
PULL_STALE_S = 300.0  # a polling worker is forgotten after this long without a pop, as the Horde does


def needed(prompt: Any, params: dict) -> int:
    """A low estimate of the context a job needs: exact for token ids, else six characters a token (real
    tokenizers give fewer), so that only jobs clearly too big for a worker are kept from it."""
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        length = len(prompt)
    else:
        text = prompt if isinstance(prompt, str) else "".join(str(m.get("content", "")) for m in prompt)
        length = len(text) // 6
    return length + (params.get("max_tokens") or 0)


class ModelNotFound(Exception):
    def __init__(self, model: str, available: list[str]):
        super().__init__(f"model {model!r} does not exist; available: {', '.join(available) or 'none'}")
        self.model, self.available = model, available


class NoCapacity(Exception):
    """No online worker can run the job now, or the queue is full."""


class TooLong(ValueError):
    """The job cannot fit the context of any worker serving its model."""


class Coordinator:
    """Admits jobs, queues them, hands them to workers that have credit, and relays what workers send.

    It knows workers only as transports speaking the worker protocol: hello, credit, heartbeat,
    drain, tokens and done arrive; assign, cancel, ack and error go out. A job whose worker is lost
    (disconnected, silent past `liveness_s`, or its lease of `lease_s` not renewed by progress) goes
    back to the queue, up to `max_retries` times.
    """

    def __init__(self, max_queue: int = 4096, lease_s: float = 30.0, liveness_s: float = 6.0, max_retries: int = 3,
                 on_done: Callable[[Job, list[tuple[WorkerConn, float]], Message], None] | None = None,
                 verify_rate: float = 0.0):
        self.on_done = on_done
        self.catalog = Catalog()
        self.pipeline = Pipeline(self.catalog, self._send, verify_rate)
        self._routes: set[asyncio.Task] = set()
        self.queue = JobQueue()
        self.jobs: dict[str, Job] = {}
        self.finished: dict[str, None] = {}  # recent finished job ids, oldest first
        self.drops: dict[str, list[float]] = {}  # worker name -> when its jobs had to be moved
        self.max_queue, self.lease_s, self.liveness_s, self.max_retries = max_queue, lease_s, liveness_s, max_retries
        self._worker_ids = itertools.count(1)

    async def attach(self, channel: Transport, owner_id: int | None = None) -> None:
        """Serve one worker connection until it closes; `owner_id` is the ledger user its token belongs to."""
        hello = await channel.recv()
        if hello.get("type") != "hello" or not isinstance(hello.get("models"), list):
            await channel.send({"type": "error", "error": "a worker must open with hello and its models"})
            channel.close()
            raise ValueError(f"a worker must open with hello, not {hello.get('type')!r}")
        worker = WorkerConn.from_hello(f"w{next(self._worker_ids)}", channel, hello, owner_id)
        self.catalog.add(worker)
        log.info("worker joined", extra={"worker": worker.id, "models": list(worker.models)})
        try:
            while True:
                msg = await channel.recv()
                try:
                    await self._on_message(worker, msg)
                except (KeyError, TypeError, ValueError) as e:
                    await self._send(worker, {"type": "error", "error": f"bad {msg.get('type')!r} message: {e!r}"})
        except ChannelClosed:
            pass
        finally:
            await self._lost(worker, "went away")

    async def _on_message(self, worker: WorkerConn, msg: Message) -> None:
        worker.last_seen = time.monotonic()
        kind = msg.get("type")
        if kind == "credit":
            worker.credit = max(0, worker.credit + int(msg["n"])) if worker.state != "DRAINING" else 0
            worker.credit_at = time.monotonic()
            worker.state = "ONLINE" if worker.state == "JOINING" else worker.state
            await self._dispatch()
        elif kind == "heartbeat":
            worker.snapshot = dict(msg["snapshot"])
        elif kind in ("stage_ready", "stage_out", "stage_error"):
            self.pipeline.on_message(worker, msg)
        elif kind == "drain":
            worker.state, worker.credit = "DRAINING", 0
        elif kind in ("tokens", "done"):
            job = self.jobs.get(msg["job"])
            if job is None or job.worker != worker.id:
                return  # late news about a job that ended or moved: never counted twice
            if kind == "done":
                if self.on_done is not None:
                    self.on_done(job, [(worker, 1.0)], msg)
                self._end(job, msg)
            elif job.deliver(msg):
                job.lease_until = time.monotonic() + self.lease_s
            else:
                await self._ack(job, 1)
        else:
            raise ValueError(msg.get("error") or "unknown message type")

    def _end(self, job: Job, msg: Message) -> None:
        self.jobs.pop(job.id, None)
        self.finished[job.id] = None
        while len(self.finished) > 100_000:
            self.finished.pop(next(iter(self.finished)))
        worker = self.catalog.workers.get(job.worker or "")
        if worker:
            worker.jobs.discard(job.id)
        job.deliver(msg)

    async def _lost(self, worker: WorkerConn, why: str) -> None:
        """A worker is gone: its jobs go back to the queue (or fail after too many tries)."""
        if worker.state == "OFFLINE":
            return
        worker.state = "OFFLINE"
        self.catalog.remove(worker.id)
        self.pipeline.lost(worker)
        jobs, worker.jobs = [self.jobs[j] for j in worker.jobs if j in self.jobs], set()
        for job in jobs:
            await self._reassign(job, f"worker {worker.name} {why}")

    def in_maintenance(self, worker: WorkerConn) -> bool:
        """A worker that dropped more than MAX_DROPS jobs in the last hour serves only its owner."""
        drops = self.drops.get(worker.name, [])
        drops[:] = [t for t in drops if time.monotonic() - t < 3600]
        return len(drops) > MAX_DROPS

    def _takes(self, worker: WorkerConn) -> Callable[[Job], bool]:
        """Which queued jobs this worker may take: those that fit its context, and only its owner's while it is
        in maintenance."""
        maintenance = self.in_maintenance(worker)

        def takes(job: Job) -> bool:
            fits = needed(job.prompt, job.params) <= worker.models.get(job.model, {}).get("context", 0)
            return fits and (not maintenance or job.user_id == worker.owner_id)

        return takes

    async def _reassign(self, job: Job, why: str) -> None:
        if job.worker_name:
            self.drops.setdefault(job.worker_name, []).append(time.monotonic())
        old = self.catalog.workers.get(job.worker or "")
        if old is not None:
            old.jobs.discard(job.id)
            await self._send(old, {"type": "cancel", "job": job.id})
        if job.retries >= self.max_retries:
            self._end(job, {"type": "done", "job": job.id, "finish_reason": "error",
                            "error": f"{why}; gave up after {job.retries} retries"})
            return
        log.info("job reassigned", extra={"job": job.id, "reason": why})
        job.restart()
        self.queue.push(job)
        await self._dispatch()

    async def watch(self, every_s: float = 0.5) -> None:
        """Forever: drop workers silent past liveness_s, move jobs whose lease ran out."""
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            for worker in list(self.catalog.workers.values()):
                silent = now - worker.last_seen
                if worker.channel is not None and silent > self.liveness_s:
                    worker.channel.close()
                    await self._lost(worker, f"sent nothing for {self.liveness_s} s")
                elif worker.channel is None and silent > PULL_STALE_S and not worker.jobs:
                    self.catalog.remove(worker.id)
            for job in list(self.jobs.values()):
                if job.worker and job.lease_until < now:
                    await self._reassign(job, f"lease of {self.lease_s} s ran out")

    async def submit(self, model: str, prompt: Any, params: dict, session_id: str | None = None,
                     priority: int = 0, user_id: int = 0, kudos: float = 0.0) -> Job:
        models = self.catalog.models()
        if model not in models:
            raise ModelNotFound(model, sorted(models))
        if not models[model]["workers"]:
            try:
                self.pipeline.route(model)
            except NoRoute as e:
                raise NoCapacity(f"no online worker serves all of {model!r} now: {e}") from e
        contexts = [w.models[model]["context"] for w in self.catalog.workers.values() if model in w.models]
        if (tokens := needed(prompt, params)) > max(contexts):
            raise TooLong(f"the prompt and max_tokens need at least {tokens} tokens; the largest "
                          f"context serving {model!r} is {max(contexts)} tokens")
        if len(self.queue) >= self.max_queue:
            raise NoCapacity(f"the queue is full ({self.max_queue} jobs)")
        # A fixed seed lets another worker regenerate the same tokens if this job has to move.
        params = {**params, "seed": params.get("seed") if params.get("seed") is not None else secrets.randbits(62)}
        job = Job(uuid.uuid4().hex, model, prompt, params, session_id, priority, user_id, kudos, ack=self._ack)
        self.jobs[job.id] = job
        self.queue.push(job)
        await self._dispatch()
        return job

    async def cancel(self, job: Job) -> None:
        if job.done:
            return
        if self.queue.remove(job):
            self._end(job, {"type": "done", "job": job.id, "finish_reason": "cancelled", "error": None})
        elif job.id in self.pipeline.runs:
            self.pipeline.runs[job.id].cancelled = True
        elif (worker := self.catalog.workers.get(job.worker or "")) is not None:
            await self._send(worker, {"type": "cancel", "job": job.id})

    async def _dispatch(self) -> None:
        for worker in self.catalog.with_credit():
            takes = self._takes(worker)
            while worker.credit > 0 and (job := self.queue.pop_for(set(worker.models), takes)) is not None:
                worker.credit -= 1
                self._hand(job, worker, self.lease_s)
                await self._send(worker, {"type": "assign", "job": job.id, "model": job.model, "prompt": job.prompt,
                                          "params": job.params, "session_id": job.session_id,
                                          "priority": job.priority, "lease_s": self.lease_s})
        if len(self.queue) and any("ms_per_layer" in info for w in self.catalog.workers.values()
                                   for info in w.models.values()):
            self._dispatch_routes()

    def _dispatch_routes(self) -> None:
        """Jobs no whole-model worker could start now go to a route of stage workers with room, if one exists."""
        for model in {job.model for job in self.queue.ordered()}:
            while True:
                try:
                    fingerprint, n_layers, hops = self.pipeline.route(model, room=True)
                except NoRoute:
                    break
                context = min(self.catalog.workers[h.worker].models[model]["context"] for h in hops)
                job = self.queue.pop_for({model}, lambda j, c=context: needed(j.prompt, j.params) <= c)
                if job is None:
                    break
                job.scheduling_s = time.monotonic() - job.times["RECEIVED"]
                job.worker_name = "route:" + ",".join(self.catalog.workers[h.worker].name for h in hops)
                job.mark("SCHEDULED")
                task = asyncio.create_task(self._run_route(job, fingerprint, n_layers, hops))
                self._routes.add(task)
                task.add_done_callback(self._routes.discard)

    async def _run_route(self, job: Job, fingerprint: str, n_layers: int, hops: list[Hop]) -> None:
        done = await self.pipeline.run(job, fingerprint, n_layers, hops)
        if self.on_done is not None and done["finish_reason"] != "error":
            by_name = {w.name: w for w in self.catalog.workers.values()}
            self.on_done(job, [(by_name[name], (end - start) / n_layers)
                               for name, start, end in done["stats"]["route"] if name in by_name], done)
        self._end(job, done)
        await self._dispatch()

    def _hand(self, job: Job, worker: WorkerConn, lease_s: float) -> None:
        job.scheduling_s = time.monotonic() - max(job.times["RECEIVED"], worker.credit_at)
        job.worker, job.worker_name = worker.id, worker.name
        job.lease_until = time.monotonic() + lease_s
        worker.jobs.add(job.id)
        job.mark("SCHEDULED")

    def pull_worker(self, name: str, models: list[str], owner_id: int, context: int) -> WorkerConn:
        """A Horde-style worker that polls over HTTP, registered (or refreshed) each time it pops."""
        worker = next((w for w in self.catalog.workers.values() if w.channel is None and w.name == name), None)
        if worker is None:
            worker = WorkerConn(f"h{next(self._worker_ids)}", name, None, {}, slots=1, state="ONLINE",
                                owner_id=owner_id)
            self.catalog.add(worker)
        worker.models = {m: {"name": m, "layers": [0, 1], "n_layers": 1, "context": context} for m in models}
        worker.last_seen = worker.credit_at = time.monotonic()
        return worker

    def pop(self, worker: WorkerConn, max_tokens: int, ttl_s: float) -> Job | None:
        """The next job a polling worker can take: a text prompt within its max_tokens."""
        takes = self._takes(worker)

        def fits(job: Job) -> bool:
            return isinstance(job.prompt, str) and (job.params.get("max_tokens") or 0) <= max_tokens and takes(job)

        job = self.queue.pop_for(set(worker.models), fits)
        if job is not None:
            self._hand(job, worker, ttl_s)
        return job

    async def complete(self, worker: WorkerConn | None, job_id: str, text: str, faulted: bool) -> Job:
        """A polling worker's result. KeyError: no such job; ValueError: it is done or not this worker's."""
        job = self.jobs.get(job_id)
        if job is None:
            raise (ValueError("DuplicateGen") if job_id in self.finished else KeyError(job_id))
        if worker is None or job.worker != worker.id:
            raise ValueError("AbortedGen")
        if faulted:
            await self._reassign(job, f"worker {worker.name} reported a fault")
            return job
        job.deliver({"type": "tokens", "job": job.id, "kind": "text", "text": text, "token_ids": [], "logprobs": None})
        stats = {"prompt_tokens": -(-len(job.prompt) // 4), "completion_tokens": -(-len(text) // 4),
                 "cache_delta": {"read": 0, "created": 0}}
        done = {"type": "done", "job": job.id, "finish_reason": "stop", "error": None, "stats": stats}
        if self.on_done is not None:
            self.on_done(job, [(worker, 1.0)], done)
        self._end(job, done)
        return job

    async def _ack(self, job: Job, n: int) -> None:
        worker = self.catalog.workers.get(job.worker or "")
        if worker is not None:
            await self._send(worker, {"type": "ack", "job": job.id, "n": n})

    async def _send(self, worker: WorkerConn, msg: Message) -> None:
        if worker.channel is None:
            return
        try:
            await worker.channel.send(msg)
        except ChannelClosed:
            log.warning("worker channel closed", extra={"worker": worker.id})

    def snapshot(self) -> dict:
        """Queue depth, jobs by state, and the workers' own engine snapshots."""
        states = Counter(job.state for job in self.jobs.values())
        return {"queued": len(self.queue), "jobs": dict(states),
                "workers": {w.id: {"name": w.name, "state": w.state, "credit": w.credit, "engine": w.snapshot,
                                   "layers": {m: info["layers"] for m, info in w.models.items()},
                                   "banned": self.pipeline.banned(w), "rtt_ms": round(w.rtt_ms, 3),
                                   "step_ms": round(w.step_ms, 3), "peer": w.peer}
                            for w in self.catalog.workers.values()},
                "route_hops": dict(self.pipeline.hops),
                "routes": {job: [[s.worker.name, s.start, s.end] for s in run.stages]
                           for job, run in self.pipeline.runs.items()}}
