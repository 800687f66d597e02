import itertools
import logging
import time
import uuid
from collections import Counter
from typing import Any

from shoal.coordinator.jobs import Job
from shoal.coordinator.queue import JobQueue
from shoal.coordinator.workers import Catalog, WorkerConn
from shoal.worker.channel import Channel, ChannelClosed, Message

log = logging.getLogger("shoal.coordinator")


class ModelNotFound(Exception):
    def __init__(self, model: str, available: list[str]):
        super().__init__(f"model {model!r} does not exist; available: {', '.join(available) or 'none'}")
        self.model, self.available = model, available


class NoCapacity(Exception):
    """No online worker can run the job now, or the queue is full."""


class Coordinator:
    """Admits jobs, queues them, hands them to workers that have credit, and relays what workers send.

    It knows workers only as channels speaking the worker protocol: hello, credit, heartbeat,
    tokens and done arrive; assign, cancel and ack go out.
    """

    def __init__(self, max_queue: int = 4096):
        self.catalog = Catalog()
        self.queue = JobQueue()
        self.jobs: dict[str, Job] = {}
        self.max_queue = max_queue
        self._worker_ids = itertools.count(1)

    async def attach(self, channel: Channel) -> None:
        """Serve one worker connection until it closes."""
        hello = await channel.recv()
        if hello.get("type") != "hello":
            channel.close()
            raise ValueError(f"a worker must open with hello, not {hello.get('type')!r}")
        worker = WorkerConn.from_hello(f"w{next(self._worker_ids)}", channel, hello)
        self.catalog.add(worker)
        log.info("worker joined", extra={"worker": worker.id, "models": list(worker.models)})
        try:
            while True:
                await self._on_message(worker, await channel.recv())
        except ChannelClosed:
            pass
        finally:
            self.catalog.remove(worker.id)
            for job_id in list(worker.jobs):
                self._end(self.jobs[job_id], {"type": "done", "job": job_id, "finish_reason": "error",
                                              "error": f"worker {worker.name} went away"})

    async def _on_message(self, worker: WorkerConn, msg: Message) -> None:
        worker.last_seen = time.monotonic()
        kind = msg.get("type")
        if kind == "credit":
            worker.credit += msg["n"]
            await self._dispatch()
        elif kind == "heartbeat":
            worker.snapshot = msg["snapshot"]
        elif kind in ("tokens", "done"):
            job = self.jobs.get(msg["job"])
            if job is None or job.worker != worker.id:
                return  # late news about a job that ended or moved: never counted twice
            if kind == "tokens":
                job.deliver(msg)
            else:
                self._end(job, msg)

    def _end(self, job: Job, msg: Message) -> None:
        self.jobs.pop(job.id, None)
        worker = self.catalog.workers.get(job.worker or "")
        if worker:
            worker.jobs.discard(job.id)
        job.deliver(msg)

    async def submit(self, model: str, prompt: Any, params: dict, session_id: str | None = None,
                     priority: int = 0) -> Job:
        models = self.catalog.models()
        if model not in models:
            raise ModelNotFound(model, sorted(models))
        if not models[model]["workers"]:
            raise NoCapacity(f"no online worker serves {model!r} now")
        if len(self.queue) >= self.max_queue:
            raise NoCapacity(f"the queue is full ({self.max_queue} jobs)")
        job = Job(uuid.uuid4().hex, model, prompt, params, session_id, priority, ack=self._ack)
        self.jobs[job.id] = job
        self.queue.push(job)
        await self._dispatch()
        return job

    async def cancel(self, job: Job) -> None:
        if job.done:
            return
        if self.queue.remove(job):
            self._end(job, {"type": "done", "job": job.id, "finish_reason": "cancelled", "error": None})
        elif (worker := self.catalog.workers.get(job.worker or "")) is not None:
            await self._send(worker, {"type": "cancel", "job": job.id})

    async def _dispatch(self) -> None:
        for worker in self.catalog.with_credit():
            while worker.credit > 0 and (job := self.queue.pop_for(set(worker.models))) is not None:
                worker.credit -= 1
                job.worker = worker.id
                worker.jobs.add(job.id)
                job.mark("SCHEDULED")
                await self._send(worker, {"type": "assign", "job": job.id, "model": job.model, "prompt": job.prompt,
                                          "params": job.params, "session_id": job.session_id,
                                          "priority": job.priority})

    async def _ack(self, job: Job, n: int) -> None:
        worker = self.catalog.workers.get(job.worker or "")
        if worker is not None:
            await self._send(worker, {"type": "ack", "job": job.id, "n": n})

    async def _send(self, worker: WorkerConn, msg: Message) -> None:
        try:
            await worker.channel.send(msg)
        except ChannelClosed:
            log.warning("worker channel closed", extra={"worker": worker.id})

    def snapshot(self) -> dict:
        """Queue depth, jobs by state, and the workers' own engine snapshots."""
        states = Counter(job.state for job in self.jobs.values())
        return {"queued": len(self.queue), "jobs": dict(states),
                "workers": {w.id: {"name": w.name, "state": w.state, "credit": w.credit, "engine": w.snapshot}
                            for w in self.catalog.workers.values()}}
