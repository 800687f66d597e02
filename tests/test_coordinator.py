"""The coordinator against scripted workers speaking the worker protocol over in-process channels."""

import asyncio
import time

import pytest

from shoal.coordinator.coordinator import Coordinator, ModelNotFound, NoCapacity, TooLong
from shoal.worker.channel import channel_pair

HELLO = {"type": "hello", "name": "fake", "version": "0", "slots": 2,
         "models": [{"name": "m", "layers": [0, 4], "n_layers": 4, "context": 512}]}


async def connect(coordinator: Coordinator, credit: int = 1):
    return await connect_with(coordinator, HELLO, credit)


async def connect_with(coordinator: Coordinator, hello: dict, credit: int = 0):
    worker, end = channel_pair()
    task = asyncio.create_task(coordinator.attach(end))
    await worker.send(hello)
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


def test_a_lost_workers_job_moves_to_another_and_the_stream_has_no_repeats():
    async def go():
        c = Coordinator()
        first, task = await connect(c)
        job = await c.submit("m", "a", {"temperature": 1.0})
        assign = await first.recv()
        for text in ("Hel", "lo"):
            await first.send({"type": "tokens", "job": job.id, "kind": "text", "text": text, "token_ids": [1],
                              "logprobs": None})
        await asyncio.sleep(0.01)
        first.close()
        await task
        requeued = (job.state, job.retries)
        second, _ = await connect(c)
        again = await second.recv()
        for text in ("Hel", "lo", " there"):
            await second.send({"type": "tokens", "job": job.id, "kind": "text", "text": text, "token_ids": [1],
                               "logprobs": None})
        await second.send({"type": "done", "job": job.id, "finish_reason": "stop", "error": None})
        return assign, again, requeued, "".join([m.get("text", "") async for m in job])

    assign, again, requeued, text = run(go())
    assert requeued == ("QUEUED", 1)
    assert again["job"] == assign["job"] and again["params"]["seed"] == assign["params"]["seed"] is not None
    assert text == "Hello there"


def test_a_queued_job_can_be_cancelled_and_malformed_messages_get_an_error():
    async def go():
        c = Coordinator()
        worker, _ = await connect(c, credit=0)
        queued = await c.submit("m", "b", {})
        await c.cancel(queued)
        await worker.send({"type": "tokens"})
        await worker.send({"type": "bogus"})
        errors = [await worker.recv(), await worker.recv()]
        await worker.send({"type": "credit", "n": 1})
        job = await c.submit("m", "c", {})
        return queued, errors, await worker.recv(), job

    queued, errors, assign, job = run(go())
    assert queued.result["finish_reason"] == "cancelled"
    assert [e["type"] for e in errors] == ["error", "error"] and "tokens" in errors[0]["error"]
    assert assign["job"] == job.id


def test_a_worker_that_drops_too_many_jobs_serves_only_its_owner():
    async def go():
        c = Coordinator()
        worker, end = channel_pair()
        serving = asyncio.create_task(c.attach(end, owner_id=7))
        await worker.send(HELLO)
        await worker.send({"type": "credit", "n": 0})
        await asyncio.sleep(0)
        c.drops["fake"] = [time.monotonic()] * 21
        stranger = await c.submit("m", "a", {}, user_id=3)
        owners = await c.submit("m", "b", {}, user_id=7)
        await worker.send({"type": "credit", "n": 2})
        assign = await worker.recv()
        await asyncio.sleep(0.01)
        serving.cancel()
        return assign, stranger, owners

    assign, stranger, owners = run(go())
    assert assign["job"] == owners.id and stranger.state == "QUEUED"


def test_a_job_goes_only_to_a_worker_whose_context_fits_it():
    async def go():
        c = Coordinator()
        worker, _ = await connect(c, credit=0)
        with pytest.raises(TooLong, match="context"):
            await c.submit("m", "x" * 4000, {"max_tokens": 100})
        big_hello = {**HELLO, "name": "wide", "models": [{**HELLO["models"][0], "context": 4096}]}
        wide_worker, wide_task = await connect_with(c, big_hello)
        big = await c.submit("m", "x" * 4000, {"max_tokens": 100})
        small = await c.submit("m", "hi", {"max_tokens": 100})
        await worker.send({"type": "credit", "n": 2})
        assign = await worker.recv()
        await wide_worker.send({"type": "credit", "n": 1})
        wide_assign = await wide_worker.recv()
        wide_task.cancel()
        return assign, wide_assign, big, small

    assign, wide_assign, big, small = run(go())
    assert assign["job"] == small.id and wide_assign["job"] == big.id
