"""Running a job through a route of stage workers, as the Petals client does, but with working failover.

The coordinator sends the first hop its input; each hop answers with its output and, where the next
hop takes pushes, hands it straight on (worker/peers.py), else the coordinator passes it on. The
first hop embeds token ids, the last samples with the job's seeded generator. Every hop's inputs
reach the coordinator and are kept, so a hop that fails
or stalls is replaced by re-planning only its layer range and replaying that history to the
replacement, which rebuilds its KV (and, on the last hop, its generator) and carries on: the output
is token for token what an undisturbed run gives. With `verify_rate`, that share of steps is
recomputed by another replica of the hop's range and compared; the worker the majority disagrees
with is banned and replaced.
"""

import array
import asyncio
import itertools
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from shoal.coordinator.jobs import Job
from shoal.coordinator.routes import Hop, NoRoute, Offer, plan
from shoal.coordinator.verify import agree
from shoal.coordinator.workers import Catalog, WorkerConn
from shoal.worker.channel import Message

log = logging.getLogger("shoal.coordinator")
CHUNK = 256  # prefill tokens per step
PUSH_BACKOFF_S = 300.0  # how long routes relay to a worker that a push failed to reach


class HopFailed(Exception):
    def __init__(self, worker: WorkerConn, why: str):
        super().__init__(f"worker {worker.name} {why}")
        self.worker = worker


@dataclass(eq=False)
class Stage:
    """One hop of a running job: a session on a worker, and every input it was sent (for replay)."""

    worker: WorkerConn
    start: int
    end: int
    session: str
    history: list[Message] = field(default_factory=list)
    secret: str = field(default_factory=lambda: secrets.token_hex(16))  # what a push to this hop must carry


@dataclass(eq=False)
class Run:
    job: Job
    fingerprint: str
    n_layers: int
    stages: list[Stage]
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False


class Pipeline:
    """Routes of stage workers for the coordinator: planning, driving, failover, verification."""

    def __init__(self, catalog: Catalog, send: Callable[[WorkerConn, Message], Awaitable[None]],
                 verify_rate: float = 0.0, step_timeout_s: float = 10.0, max_retries: int = 3):
        self.catalog, self.send = catalog, send
        self.verify_rate, self.step_timeout_s, self.max_retries = verify_rate, step_timeout_s, max_retries
        self.bans: dict[str, tuple[float, int]] = {}  # worker name -> (banned until, times banned)
        self.runs: dict[str, Run] = {}
        self._waiting: dict[tuple[str, object], tuple[WorkerConn, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._random = random.Random(0)
        self._closing: set[asyncio.Task] = set()
        self.unpushable: dict[str, float] = {}  # worker name -> until when no route pushes to it (a push failed)
        self.hops: Counter[str] = Counter()  # hops of route steps by how each got its input: sent, pushed, relayed

    # planning ---------------------------------------------------------------------------------

    def stage_workers(self, model: str) -> dict[str, list[WorkerConn]]:
        """fingerprint -> online workers holding a layer range of `model` (only the same weights share a route)."""
        groups: dict[str, list[WorkerConn]] = {}
        for w in self.catalog.workers.values():
            info = w.models.get(model)
            if info and info.get("ms_per_layer") is not None and w.state == "ONLINE" and not self.banned(w):
                groups.setdefault(info.get("fingerprint") or "", []).append(w)
        return groups

    def pushable(self, worker: WorkerConn) -> bool:
        """Whether a route may push to this worker: it takes pushes, and none to it failed lately."""
        return worker.peer is not None and self.unpushable.get(worker.name, 0.0) <= time.monotonic()

    def banned(self, worker: WorkerConn) -> bool:
        return self.bans.get(worker.name, (0.0, 0))[0] > time.monotonic()

    def ban(self, worker: WorkerConn, base_s: float, why: str) -> None:
        """Keep routes off a worker for base_s, doubling each time it earns a ban again; one in force stands."""
        if self.banned(worker):
            return
        _, times = self.bans.get(worker.name, (0.0, 0))
        self.bans[worker.name] = (time.monotonic() + base_s * 2**times, times + 1)
        log.warning("worker banned", extra={"worker": worker.name, "reason": why, "for_s": base_s * 2**times})

    def offers(self, workers: list[WorkerConn], model: str, room: bool = False) -> list[Offer]:
        out, open_sessions = [], Counter(s.worker.id for run in self.runs.values() for s in run.stages)
        for w in workers:
            info, snap, sessions = w.models[model], w.snapshot, open_sessions[w.id]
            if room and sessions >= w.slots:
                continue
            free = snap.get("kv_blocks_free", 1) / max(1, snap.get("kv_blocks", 1))
            out.append(Offer(w.id, *info["layers"], rtt_ms=w.rtt_ms, ms_per_layer=info["ms_per_layer"],
                             load=sessions / max(1, w.slots), headroom=snap.get("headroom", 1.0), kv_free=free))
        return out

    def route(self, model: str, start: int = 0, end: int | None = None, exclude: tuple[str, ...] = (),
              room: bool = False) -> tuple[str, int, list[Hop]]:
        """(fingerprint, layer count, hops) of the cheapest route over one set of weights; NoRoute names the
        layers nobody serves."""
        best, failure = None, NoRoute([(start, end or 0)])
        for fingerprint, workers in self.stage_workers(model).items():
            n_layers = workers[0].models[model]["n_layers"]
            try:
                hops = plan(self.offers(workers, model, room), n_layers, start, end, exclude)
            except NoRoute as e:
                failure = e
                continue
            if best is None or len(hops) < len(best[2]):
                best = (fingerprint, n_layers, hops)
        if best is None:
            raise failure
        return best

    # messages ---------------------------------------------------------------------------------

    def on_message(self, worker: WorkerConn, msg: Message) -> None:
        key = (msg["session"], msg.get("step")) if msg["type"] != "stage_ready" else (msg["session"], "open")
        waiting = self._waiting.pop(key, None)
        if waiting is None or waiting[0] is not worker or waiting[1].done():
            return  # an answer nobody waits for any more (a replaced or timed-out hop)
        if msg["type"] == "stage_error":
            waiting[1].set_exception(HopFailed(worker, f"failed a step: {msg.get('error')}"))
        else:
            waiting[1].set_result(msg)

    def lost(self, worker: WorkerConn) -> None:
        for key, (w, future) in list(self._waiting.items()):
            if w is worker and not future.done():
                del self._waiting[key]
                future.set_exception(HopFailed(worker, "went away"))

    def _expect(self, worker: WorkerConn, session: str, key: object) -> asyncio.Future:
        """A future for the worker's answer to step `key` of a session, sent or pushed."""
        future = asyncio.get_running_loop().create_future()
        self._waiting[(session, key)] = (worker, future)
        return future

    async def _call(self, worker: WorkerConn, msg: Message, key: object, future: asyncio.Future | None = None,
                    relay: bool = True) -> Message:
        """Send a step and wait for its answer. With the `future` of a step pushed to the worker, only wait; with
        `relay` as well (the push may have failed), send it too unless answered already: the worker takes it once."""
        future = future or self._expect(worker, msg["session"], key)
        began = time.monotonic() if relay and not future.done() else None
        if began is not None:
            await self.send(worker, msg)
        try:
            async with asyncio.timeout(self.step_timeout_s):
                reply = await future
        except TimeoutError as e:
            self._waiting.pop((msg["session"], key), None)
            raise HopFailed(worker, f"stalled for {self.step_timeout_s} s") from e
        if began is not None:  # the hop's latency: the round trip less the time the worker says it spent
            rtt = 1000 * (time.monotonic() - began) - reply.get("busy_ms", 0.0)
            worker.rtt_ms = 0.9 * worker.rtt_ms + 0.1 * rtt
        worker.step_ms = 0.9 * worker.step_ms + 0.1 * reply.get("busy_ms", 0.0)
        return reply

    async def _open(self, run: Run, stage: Stage, prompt: object, generated: list[int]) -> list[int]:
        last = stage.end == run.n_layers
        msg = {"type": "stage_open", "session": stage.session, "layers": [stage.start, stage.end],
               "prompt": prompt, "params": run.job.params if last else None, "generated": generated if last else None,
               "push_secret": stage.secret}
        return (await self._call(stage.worker, msg, "open"))["prompt_ids"]

    def close(self, stage: Stage) -> None:
        task = asyncio.ensure_future(self.send(stage.worker, {"type": "stage_close", "session": stage.session}))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # driving ----------------------------------------------------------------------------------

    def stage(self, job: Job, hop: Hop) -> Stage:
        return Stage(self.catalog.workers[hop.worker], hop.start, hop.end, f"{job.id}/{next(self._ids)}")

    async def run(self, job: Job, fingerprint: str, n_layers: int, hops: list[Hop]) -> dict:
        """Generate the job through the route; returns the done message (finish_reason, stats)."""
        run = Run(job, fingerprint, n_layers, [self.stage(job, hop) for hop in hops])
        self.runs[job.id] = run
        try:
            opened = await asyncio.gather(*[self._open(run, s, job.prompt, []) for s in run.stages])
            ids = opened[0]
            position = 0
            for i in range(0, len(ids), CHUNK):
                out = await self._forward(run, position, ints(ids[i:i + CHUNK]), i + CHUNK >= len(ids))
                position += len(ids[i:i + CHUNK])
            while True:
                finish = self._deliver(run, out)
                if finish is not None or run.cancelled:
                    break
                out = await self._forward(run, position, ints([out["token"]]), True)
                position += 1
            stats = {"prompt_tokens": len(ids), "completion_tokens": len(run.generated),
                     "cache_delta": {"read": 0, "created": 0}, "stop_sequence": out.get("stop_sequence"),
                     "route": [[s.worker.name, s.start, s.end] for s in run.stages]}
            return {"type": "done", "job": job.id, "finish_reason": finish or "cancelled", "error": None,
                    "stats": stats}
        except (HopFailed, NoRoute) as e:
            return {"type": "done", "job": job.id, "finish_reason": "error", "error": str(e)}
        finally:
            for s in run.stages:
                self.close(s)
            self.runs.pop(job.id, None)

    def _deliver(self, run: Run, out: Message) -> str | None:
        """Pass a sampled token's text to the job's reader, as a whole-model worker would."""
        token, eos = out["token"], out.get("stop_token", False)
        pieces = [list(p) for p in out.get("pieces") or []]
        if not eos:
            run.generated.append(token)
            pieces = pieces or [["text", ""]]
        for n, (kind, text) in enumerate(pieces):
            ids = [token] if n == 0 and not eos else []
            run.job.deliver({"type": "tokens", "job": run.job.id, "kind": kind, "text": text, "token_ids": ids,
                             "logprobs": out.get("logprobs") if ids else None})
        return out["finish_reason"]

    async def _forward(self, run: Run, position: int, inputs: Message, sample: bool) -> Message:
        """One step through every hop; a failing hop is replaced (its range re-planned, history replayed). The
        hops after the first get their input pushed by the one before where all of them take pushes, except on
        a step some hop's output is verified on: that output must not go on before it is checked."""
        checks = {s for s in run.stages if self.verify_rate and self._random.random() < self.verify_rate}
        pushes = not checks and len(run.stages) > 1 and all(self.pushable(s.worker) for s in run.stages[1:])
        pushed: dict[Stage, asyncio.Future] = {}
        x, i, delivered = inputs, 0, False
        try:
            while i < len(run.stages):
                stage = run.stages[i]
                stage.history.append({**x, "position": position})
                is_last = i == len(run.stages) - 1
                step = {"type": "stage_in", "session": stage.session, "step": position, "position": position,
                        "sample": sample and is_last, **x}
                if pushes and i == 0:
                    pushed = {s: self._expect(s.worker, s.session, position) for s in run.stages[1:]}
                future = pushed.pop(stage, None)
                if pushes and not delivered and not is_last:  # sent or relayed: the hops after it still push
                    step["route"] = [{"peer": s.worker.peer, "session": s.session, "secret": s.secret,
                                      "sample": sample and s is run.stages[-1]} for s in run.stages[i + 1:]]
                self.hops["sent" if future is None else "pushed" if delivered else "relayed"] += 1
                try:
                    out = await self._call(stage.worker, step, position, future, not delivered)
                    if stage in checks:
                        await self._verify(run, stage, out, sample and is_last)
                    i += 1
                except HopFailed as e:
                    out, replaced_by = await self._replace(run, i, e, sample and is_last)
                    i += replaced_by
                delivered = out.get("pushed", False)  # else the coordinator relays the output to the next hop
                if out.get("pushed") is False and i < len(run.stages):
                    self.unpushable[run.stages[i].worker.name] = time.monotonic() + PUSH_BACKOFF_S
                    log.warning("a push failed; routes relay to the worker", extra={
                        "worker": run.stages[i].worker.name, "for_s": PUSH_BACKOFF_S})
                x = {k: out[k] for k in ("dtype", "shape", "data") if k in out}
            return out
        finally:
            for s, future in pushed.items():  # a step cut short: nobody waits for these answers now
                if self._waiting.get((s.session, position), (None, None))[1] is future:
                    del self._waiting[(s.session, position)]

    async def _replace(self, run: Run, i: int, failure: HopFailed, sample: bool) -> tuple[Message, int]:
        """Re-plan the failed hop's range without its worker and replay its history; returns the current step's
        output and how many hops now stand in its place."""
        old = run.stages[i]
        self.ban(failure.worker, 5.0, str(failure))
        for attempt in range(self.max_retries):
            log.info("replacing a hop", extra={"job": run.job.id, "layers": f"{old.start}:{old.end}",
                                               "reason": str(failure), "attempt": attempt + 1})
            _, _, hops = self.route(run.job.model, old.start, old.end, exclude=(failure.worker.id,))
            fresh = [self.stage(run.job, hop) for hop in hops]
            try:
                out = tail(await self._replay(run, fresh, old.history, sample), old.history[-1]["shape"][0])
            except HopFailed as e:
                self.ban(e.worker, 5.0, str(e))
                failure = e
                for stage in fresh:
                    self.close(stage)
                continue
            self.close(old)
            run.stages[i:i + 1] = fresh
            return out, len(fresh)
        raise HopFailed(failure.worker, f"{failure}; gave up after {self.max_retries} replacements")

    async def _replay(self, run: Run, stages: list[Stage], history: list[Message], sample: bool) -> Message:
        """Open `stages` and send them the whole input history as one step; returns the last stage's output."""
        await asyncio.gather(*[self._open(run, s, run.job.prompt, run.generated) for s in stages])
        x = concat(history)
        for n, stage in enumerate(stages):
            stage.history = [x]
            last = n == len(stages) - 1
            step = {"type": "stage_in", "session": stage.session, "step": "replay", "position": 0,
                    "sample": sample and last, **x}
            out = await self._call(stage.worker, step, "replay")
            x = {k: out[k] for k in ("dtype", "shape", "data") if k in out}
        return out

    async def _verify(self, run: Run, stage: Stage, out: Message, sample: bool) -> None:
        """Recompute this step on another replica; on disagreement a third decides, and the odd one is banned
        (HopFailed when it is this hop's worker, so the step is redone on a replacement)."""
        second = await self._recompute(run, stage, sample, [stage.worker])
        if second is None or agree(out, second[1]):
            return
        third = await self._recompute(run, stage, sample, [stage.worker, second[0]])
        if third is not None and agree(out, third[1]):
            self.ban(second[0], 600.0, "disagreed with the majority of its replicas")
        elif third is not None and agree(second[1], third[1]):
            self.ban(stage.worker, 600.0, "disagreed with the majority of its replicas")
            raise HopFailed(stage.worker, "disagreed with the majority of its replicas")
        else:
            log.warning("verification inconclusive", extra={"job": run.job.id, "layers": f"{stage.start}:{stage.end}"})

    async def _recompute(self, run: Run, stage: Stage, sample: bool,
                         exclude: list[WorkerConn]) -> tuple[WorkerConn, Message] | None:
        """The current step of `stage` recomputed by another worker holding its whole range, picked at random so
        every replica gets checked, if there is one."""
        holders = [w for w in self.stage_workers(run.job.model).get(run.fingerprint, []) if w not in exclude
                   and covers(w.models[run.job.model]["layers"], stage.start, stage.end)]
        if not holders:
            return None
        check = self.stage(run.job, Hop(self._random.choice(holders).id, stage.start, stage.end))
        try:
            out = await self._replay(run, [check], stage.history, sample)
            return check.worker, tail(out, stage.history[-1]["shape"][0])
        except HopFailed:
            return None
        finally:
            self.close(check)


def covers(layers: list[int], start: int, end: int) -> bool:
    return layers[0] <= start and end <= layers[1]


def ints(ids: list[int]) -> Message:
    return {"dtype": "int32", "shape": [len(ids)], "data": array.array("i", ids).tobytes()}


def concat(history: list[Message]) -> Message:
    """The inputs of many steps as one: rows concatenated along the first dimension."""
    rows = sum(m["shape"][0] for m in history)
    return {"dtype": history[0]["dtype"], "shape": [rows, *history[0]["shape"][1:]],
            "data": b"".join(bytes(m["data"]) for m in history)}


def tail(result: Message, rows: int) -> Message:
    """The last `rows` rows of a replayed output: what the step being redone or checked produces."""
    if "data" not in result:
        return result
    data = bytes(result["data"])
    size = len(data) // max(1, result["shape"][0]) * rows
    return {**result, "shape": [rows, *result["shape"][1:]], "data": data[len(data) - size:]}
