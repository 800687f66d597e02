"""The coordinator against scripted workers speaking the worker protocol over in-process channels."""

import asyncio

import pytest

from shoal.coordinator.coordinator import Coordinator, ModelNotFound, NoCapacity
from shoal.worker.channel import channel_pair

HELLO = {"type": "hello", "name": "fake", "version": "0", "slots": 2,
         "models": [{"name": "m", "layers": [0, 4], "n_layers": 4, "context": 512}]}


async def connect(coordinator: Coordinator, credit: int = 1):
    worker, end = channel_pair()
    task = asyncio.create_task(coordinator.attach(end))
    await worker.send(HELLO)
    await worker.send({"type": "credit", "n": credit})
    await asyncio.sleep(0)
    return worker, task


def run(coro):
    return asyncio.run(coro)


def test_jobs_go_to_workers_with_credit_in_priority_order():
    async def go():
        c = Coordinator()
        worker, _ = await connect(c, credit=0)
        low = await c.submit("m", "a", {}, priority=5)
        high = await c.submit("m", "b", {}, priority=0)
        await worker.send({"type": "credit", "n": 1})
        first = await worker.recv()
        await worker.send({"type": "tokens", "job": first["job"], "kind": "text", "text": "hi", "token_ids": [1],
                           "logprobs": None})
        await worker.send({"type": "done", "job": first["job"], "finish_reason": "stop", "error": None})
        got = [msg async for msg in high]
        ack = await worker.recv()
        return first, got, ack, low, high

    first, got, ack, low, high = run(go())
    assert first["type"] == "assign" and first["job"] == high.id and first["prompt"] == "b"
    assert [m["type"] for m in got] == ["tokens", "done"] and high.state == "COMPLETED"
    assert ack == {"type": "ack", "job": high.id, "n": 1}
    assert low.state == "QUEUED"


def test_unknown_model_and_no_capacity():
    async def go():
        c = Coordinator()
        with pytest.raises(ModelNotFound, match="available: none"):
            await c.submit("m", "a", {})
        await connect(c)
        with pytest.raises(ModelNotFound, match="'x' does not exist; available: m"):
            await c.submit("x", "a", {})
        c.max_queue = 0
        with pytest.raises(NoCapacity, match="queue is full"):
            await c.submit("m", "a", {})

    run(go())


def test_a_late_message_about_a_finished_job_is_ignored():
    async def go():
        c = Coordinator()
        worker, _ = await connect(c)
        job = await c.submit("m", "a", {})
        assign = await worker.recv()
        done = {"type": "done", "job": assign["job"], "finish_reason": "stop", "error": None}
        await worker.send(done)
        await worker.send(done)
        await worker.send({"type": "tokens", "job": assign["job"], "kind": "text", "text": "late", "token_ids": [2],
                           "logprobs": None})
        await asyncio.sleep(0.01)
        return job, [m async for m in job]

    job, messages = run(go())
    assert [m["type"] for m in messages] == ["done"] and job.state == "COMPLETED"


def test_a_worker_that_goes_away_fails_its_jobs_and_a_queued_job_can_be_cancelled():
    async def go():
        c = Coordinator()
        worker, task = await connect(c)
        running = await c.submit("m", "a", {})
        queued = await c.submit("m", "b", {})
        await worker.recv()
        await c.cancel(queued)
        worker.close()
        await task
        return running, queued, c

    running, queued, c = run(go())
    assert running.state == "FAILED" and "went away" in running.result["error"]
    assert queued.result["finish_reason"] == "cancelled"
    assert c.catalog.models() == {}
