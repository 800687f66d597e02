"""The engine in a child process: the same answers as in-process, and its own failures kept to its requests."""

import asyncio
import os
import signal
import time

import pytest
from engine_helpers import GREEDY, QUESTIONS, abandon_then_serve, alone, chat, run, together

from shoal.engine import EngineConfig, EngineError, SamplingParams, StickyBusy
from shoal.engine.process import EngineProcess
from shoal.model import DEMO_PATH
from shoal.model.errors import ModelError


@pytest.fixture(scope="module")
def front():
    engine = EngineProcess(DEMO_PATH, EngineConfig(event_queue_size=4, stall_timeout_s=5.0), threads=1)
    yield engine
    engine.close()


def test_outputs_match_the_in_process_engine(front, make_engine):
    prompts = [chat(q) for q in QUESTIONS[:8]]
    seeded = [SamplingParams(temperature=1.1, seed=i, max_tokens=20, ignore_eos=True) for i in range(8)]
    local = make_engine()
    greedy = run(together(front, prompts, GREEDY))
    assert [r[:2] for r in greedy] == [r[:2] for r in run(alone(local, prompts, GREEDY))]
    ours = run(together(front, prompts, seeded))
    assert [ids for _, ids, _ in ours] == [ids for _, ids, _ in run(together(local, prompts, seeded))]
    stats = ours[0][2]
    assert (stats.finish_reason, stats.state, stats.completion_tokens) == ("length", "COMPLETED", 20)
    assert front.describe() == local.describe() and front.context_len == local.context_len


def test_bad_requests_fail_at_submit_and_the_engine_goes_on(front):
    async def go():
        for prompt, params, message in [([5, 99999], None, "outside the vocabulary"), ("", None, "empty"),
                                        ([1] * 5000, None, "context"),
                                        ([1, 2], SamplingParams(top_p=0), "top_p")]:
            with pytest.raises(EngineError, match=message):
                front.submit(prompt, params)
        with pytest.raises(EngineError, match="parent_key"):
            front.submit([1, 2, 3], parent_key="00")
        first = front.submit([1, 2], SamplingParams(max_tokens=30, ignore_eos=True), session_id="s")
        with pytest.raises(StickyBusy):
            front.submit([1, 2], session_id="s")
        _, ids, _ = await first.result()
        return await front.submit([1, 2, *ids, 7], SamplingParams(max_tokens=3), session_id="s").result()

    assert run(go())[2].cache_hit_kind == "sticky"
    front.end_session("s")


def test_cancel_frees_blocks(front):
    async def go():
        stream = front.submit(list(range(10, 90)), SamplingParams(max_tokens=400, ignore_eos=True))
        async for event in stream:
            if event.token_ids:
                stream.cancel()
                break
        return await stream.result()

    stats = run(go())[2]
    assert stats.finish_reason == "cancelled" and stats.completion_tokens < 400
    assert front.snapshot()["kv_blocks_used"] == 0 and front.snapshot()["phase"] == "idle"


def test_a_slow_reader_holds_only_its_own_request_and_gets_every_token(front):
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def go():
        slow = front.submit(list(range(10, 50)), params)
        _, ids, _ = await front.submit(list(range(60, 90)), params).result()
        assert len(ids) == 100
        assert 0 < slow.pending <= 4  # held in the child, not buffered here
        return await slow.result()

    _, ids, stats = run(go())
    assert stats.finish_reason == "length" and len(ids) == 100
    assert ids == run(alone(front, [list(range(10, 50))], params))[0][1]


def test_a_reader_that_never_reads_times_out(front):
    async def go():
        stalled = front.submit([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
        await asyncio.sleep(6)
        return await stalled.result()

    _, ids, stats = run(go())
    assert (stats.finish_reason, stats.state) == ("timeout", "FAILED") and len(ids) <= 4


def test_a_request_whose_event_loop_closed_is_cancelled_and_the_engine_goes_on(front):
    abandon_then_serve(front)


def test_closing_cancels_requests_in_flight():
    engine = EngineProcess(DEMO_PATH, threads=1)

    async def go():
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(engine.close)
        return await stream.result()

    assert run(go())[2].finish_reason == "cancelled"


def test_a_dead_engine_process_fails_its_requests_and_refuses_new_ones():
    engine = EngineProcess(DEMO_PATH, threads=1)

    async def go():
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
        async for event in stream:
            if event.token_ids:
                os.kill(engine._process.pid, signal.SIGKILL)
                break
        stats = (await stream.result())[2]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                engine.submit([1, 2])
            except EngineError as e:
                return stats, str(e)
            await asyncio.sleep(0.1)

    stats, refused = run(go())
    assert (stats.finish_reason, stats.error) == ("error", "the engine process has exited")
    assert refused == "the engine process has exited"
    engine.close()


def test_a_bad_model_directory_is_named(tmp_path):
    with pytest.raises(ModelError, match=str(tmp_path)):
        EngineProcess(tmp_path)
