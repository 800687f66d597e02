"""The engine's prefix cache and sessions on the demo model: hit kinds, sticky sessions, memory pressure."""

import time

import pytest
from engine_helpers import GREEDY, QUESTIONS, chat, run, together

from shoal.engine import EngineError, SamplingParams, StickyBusy


def test_cache_hit_kinds(make_engine):
    engine = make_engine()
    prompt = list(range(40, 80))
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def go():
        first = await engine.submit(prompt, params).result()
        again = await engine.submit(prompt, params).result()
        longer = await engine.submit(prompt[:35] + list(range(300, 320)), params).result()
        other = await engine.submit(list(range(500, 530)), params).result()
        return first, again, longer, other

    first, again, longer, other = (s for _, _, s in run(go()))
    assert (first.cache_hit_kind, first.cache_delta) == ("cold", {"read": 0, "created": 32})
    assert (again.cache_hit_kind, again.cache_delta["read"]) == ("exact", 39)
    assert (longer.cache_hit_kind, longer.cache_delta["read"]) == ("partial", 35)
    assert other.cache_hit_kind == "cold"
    assert first.finish_key == again.finish_key != longer.finish_key
    assert engine.snapshot()["last_cache_hit"] == {"kind": "cold", "prefix_len": 0}


def test_parent_key_must_name_a_context_the_prompt_extends(make_engine):
    engine = make_engine()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def go():
        _, ids, first = await engine.submit(list(range(40, 80)), params).result()
        context = [*range(40, 80), *ids]
        _, _, follow = await engine.submit([*context, 1, 2], params, parent_key=first.finish_key).result()
        with pytest.raises(EngineError, match="parent_key"):
            engine.submit([*range(41, 80), 1, 2], params, parent_key=first.finish_key)
        return follow

    follow = run(go())
    assert follow.cache_hit_kind == "partial" and follow.cache_delta["read"] >= 32


def test_session_continues_in_place_then_diverges(make_engine):
    engine = make_engine()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def go():
        one = await engine.submit(list(range(10, 30)), params, session_id="s").result()
        context = list(range(10, 30)) + one[1]
        two = await engine.submit([*context, 7, 8, 9], params, session_id="s").result()
        three = await engine.submit([5, *context], params, session_id="s").result()
        return one[2], two[2], three[2]

    one, two, three = run(go())
    assert one.cache_hit_kind == "cold"
    assert (two.cache_hit_kind, two.cache_delta["read"]) == ("sticky", 25)
    assert three.cache_hit_kind == "cold"
    assert engine.snapshot()["sessions_pinned"] == 1
    engine.end_session("s")
    time.sleep(0.05)
    assert engine.snapshot()["sessions_pinned"] == 0 and engine.snapshot()["kv_blocks_used"] == 0


def test_a_chat_session_continues_its_conversation_in_place(make_engine):
    engine = make_engine()
    turn = chat("What is 12 + 30?")

    async def go():
        first = await engine.submit(turn, GREEDY, session_id="c").result()
        follow = [*turn, {"role": "assistant", "content": first[0]}, *chat("Capital of Peru?")]
        return first, await engine.submit(follow, GREEDY, session_id="c").result()

    first, second = run(go())
    assert (second[0], second[2].cache_hit_kind) == ("The capital of Peru is Lima.", "sticky")
    assert second[2].cache_delta["read"] == first[2].prompt_tokens + first[2].completion_tokens - 1


def test_ending_a_session_in_flight_releases_it_when_the_request_ends(make_engine):
    engine = make_engine()

    async def go():
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True), session_id="s")
        engine.end_session("s")
        await stream.result()

    run(go())
    assert engine.snapshot()["sessions_pinned"] == 0 and engine.snapshot()["kv_blocks_used"] == 0


def test_sticky_busy(make_engine):
    engine = make_engine()

    async def go():
        first = engine.submit([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), session_id="s")
        with pytest.raises(StickyBusy, match="sticky_busy"):
            engine.submit([1, 2, 3, 4], session_id="s")
        await first.result()
        return await engine.submit([1, 2, 3, 4], SamplingParams(max_tokens=2), session_id="s").result()

    assert run(go())[2].finish_reason in ("stop", "length")


def test_tiny_kv_pool_preempts_and_every_request_still_completes(make_engine):
    prompts = [chat(q) for q in QUESTIONS[:6]]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    roomy = run(together(make_engine(), prompts, params))
    tight = run(together(make_engine(kv_cache_mb=0.75), prompts, params))  # 12 blocks of 16 tokens
    assert [ids for _, ids, _ in tight] == [ids for _, ids, _ in roomy]
    assert sum(s.preemptions for _, _, s in tight) > 0
    assert all(s.completion_tokens == 60 for _, _, s in tight)


def test_idle_session_pins_are_reclaimed_under_memory_pressure(make_engine):
    engine = make_engine(kv_cache_mb=0.75, dtype="float32")  # 12 blocks of 16 tokens, on a GPU too
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)

    async def go():
        await engine.submit(list(range(100, 180)), params, session_id="idle").result()
        return await engine.submit(list(range(200, 300)), params).result()

    assert run(go())[2].completion_tokens == 60
    assert engine.snapshot()["sessions_pinned"] == 0


