"""The async DAG scheduler (seed 004): deps_remaining, a ready queue, an in-flight count, the first error.

All scheduler state lives on the event loop. I/O steps are coroutines on the loop; CPU steps run on
a thread pool, a chain of them in one trip. Fail-fast: after the first error nothing new spawns,
and a run ends only when in-flight work is down to zero. A step that overruns its deadline (the earlier of the request's
and start + node timeout) fails with "Node execution timeout"; its work is not cancelled but left to
finish, and its result is then discarded and counted as a late completion.
"""

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

NODE_TIMEOUT = "Node execution timeout"
REQUEST_DEADLINE = "Request deadline exceeded"


class NodeError(Exception):
    """A step failed; the message is what the request answers."""


@dataclass(frozen=True)
class Step:
    node_id: str
    deps: tuple[str, ...]
    io: bool
    fn: Callable[[list[Any]], Any]  # gets the deps' results in order; a coroutine function when io


def fuse(steps: list[Step], outputs: list[str], state: dict) -> list[Step]:
    """CPU steps in a chain (each the only user of the one before, and its only input) become one step, so
    the chain costs one trip to the pool, not one per node (concat → sort → take in most plans). Once the
    run has an error (a timeout) the chain stops before its next node, as the scheduler would."""
    users: dict[str, list[Step]] = {s.node_id: [] for s in steps}
    for s in steps:
        for d in s.deps:
            users[d].append(s)

    def follower(a: Step) -> Step | None:
        if a.io or a.node_id in outputs or len(users[a.node_id]) != 1:
            return None
        b = users[a.node_id][0]
        return b if not b.io and b.deps == (a.node_id,) else None

    inner = {b.node_id for a in steps if (b := follower(a)) is not None}
    fused = []
    for head in (s for s in steps if s.node_id not in inner):
        chain = [head]
        while (b := follower(chain[-1])) is not None:
            chain.append(b)
        fused.append(head if len(chain) == 1 else
                     Step(chain[-1].node_id, head.deps, False, partial(_run_chain, chain, state)))
    return fused


def _run_chain(chain: list[Step], state: dict, inputs: list[Any]) -> Any:
    for i, step in enumerate(chain):
        if i and state["error"] is not None:
            raise NodeError(state["error"])
        try:
            inputs = [step.fn(inputs)]
        except NodeError:
            raise
        except Exception as e:  # named after the node it happened in, not the chain's last
            raise NodeError(f"node {step.node_id}: {e}") from e
    return inputs[0]


class Executor:
    def __init__(self, cpu_threads: int = 4, on_late: Callable[[], None] | None = None):
        self.pool = ThreadPoolExecutor(cpu_threads, thread_name_prefix="shoal-plan")
        self.late = 0
        self.on_late = on_late
        self._stragglers: set[asyncio.Future] = set()

    async def run(self, steps: list[Step], outputs: list[str], deadline_ms: float | None = None,
                  node_timeout_ms: float | None = None) -> dict[str, Any]:
        """Run the steps in dependency order; the outputs' results, or NodeError with the first error."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + deadline_ms / 1000 if deadline_ms else None
        state: dict[str, Any] = {"inflight": 0, "error": None}
        steps = fuse(steps, outputs, state)
        by_id = {s.node_id: s for s in steps}
        successors: dict[str, list[str]] = {s.node_id: [] for s in steps}
        for s in steps:
            for d in s.deps:
                successors[d].append(s.node_id)
        deps_remaining = {s.node_id: len(s.deps) for s in steps}
        ready = deque(s.node_id for s in steps if not s.deps)
        results: dict[str, Any] = {}
        tasks: set[asyncio.Task] = set()
        finished = loop.create_future()

        def spawn() -> None:
            if deadline is not None and ready and state["error"] is None and time.monotonic() >= deadline:
                state["error"] = REQUEST_DEADLINE
            while ready and state["error"] is None:
                state["inflight"] += 1
                task = loop.create_task(run_node(by_id[ready.popleft()]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if state["inflight"] == 0 and not finished.done():
                finished.set_result(None)

        async def run_node(step: Step) -> None:
            try:
                results[step.node_id] = await self._call(step, [results[d] for d in step.deps], deadline,
                                                         node_timeout_ms)
                for succ in successors[step.node_id]:
                    deps_remaining[succ] -= 1
                    if deps_remaining[succ] == 0:
                        ready.append(succ)
            except Exception as e:  # the first error is the request's answer; later ones add nothing
                if state["error"] is None:
                    state["error"] = str(e) if isinstance(e, NodeError) else f"node {step.node_id}: {e}"
            finally:
                state["inflight"] -= 1
                spawn()

        spawn()
        try:
            await finished
        except asyncio.CancelledError:  # nobody waits for the answer now: start nothing more
            state["error"] = "cancelled"
            raise
        if state["error"] is not None:
            raise NodeError(state["error"])
        return {o: results[o] for o in outputs}

    async def _call(self, step: Step, inputs: list[Any], request_deadline: float | None,
                    node_timeout_ms: float | None) -> Any:
        now = time.monotonic()
        if request_deadline is not None and now >= request_deadline:
            raise NodeError(REQUEST_DEADLINE)
        ends = [d for d in (request_deadline, now + node_timeout_ms / 1000 if node_timeout_ms else None) if d]
        if not ends:  # nothing to race: the step runs in this task
            return await (step.fn(inputs) if step.io else asyncio.wrap_future(self.pool.submit(step.fn, inputs)))
        work = (asyncio.get_running_loop().create_task(step.fn(inputs)) if step.io
                else asyncio.wrap_future(self.pool.submit(step.fn, inputs)))
        done, _ = await asyncio.wait({work}, timeout=min(ends) - now)
        if work in done:
            return work.result()
        self._stragglers.add(work)  # first one wins: the work runs on, and its result is thrown away
        work.add_done_callback(self._late)
        raise NodeError(NODE_TIMEOUT)

    def _late(self, work: asyncio.Future) -> None:
        self._stragglers.discard(work)
        if not work.cancelled():
            work.exception()  # retrieved, so a late failure is not reported as never retrieved
        self.late += 1
        if self.on_late is not None:
            self.on_late()

    async def drain(self) -> None:
        """Wait for late work still running, so its completions land while the loop still runs."""
        while self._stragglers:
            await asyncio.wait(set(self._stragglers))
            await asyncio.sleep(0)  # let their done-callbacks run

    def close(self) -> None:
        self.pool.shutdown(wait=True)
