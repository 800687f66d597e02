"""The engine end to end on the demo model and tiny random models: batching, caching, sessions, streaming."""

import asyncio
import time

import pytest

from shoal.engine import Engine, EngineConfig, EngineError, SamplingParams, StickyBusy
from shoal.model import DEMO_PATH

QUESTIONS = ["What is 12 + 30?", "Capital of Peru?", "Spell apple.", "Hello!", "What is 91 - 45?",
             "Reverse the word garden.", "How many letters are in planet?", "Name the capital of Japan.",
             "Add 7 and 8.", "Who are you?", "What is 305 + 12?", "Spell the word tiger letter by letter.",
             "Capital of France?", "Write mango backwards.", "Calculate 66-9", "What can you do?"]
GREEDY = SamplingParams(temperature=0, max_tokens=40)


@pytest.fixture
def make_engine():
    engines = []

    def make(path=DEMO_PATH, **config) -> Engine:
        engines.append(Engine.from_dir(path, EngineConfig(**config)))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def run(coro):
    return asyncio.run(coro)


async def alone(engine: Engine, prompts: list, params: SamplingParams) -> list:
    return [await engine.submit(p, params).result() for p in prompts]


async def together(engine: Engine, prompts: list, params: SamplingParams | list[SamplingParams]) -> list:
    params = params if isinstance(params, list) else [params] * len(prompts)
    streams = [engine.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    return await asyncio.gather(*(s.result() for s in streams))


def test_concurrent_greedy_requests_match_each_alone(make_engine):
    engine = make_engine(n_seq_max=16)
    prompts = [chat(q) for q in QUESTIONS]
    solo = run(alone(engine, prompts, GREEDY))
    batched = run(together(engine, prompts, GREEDY))
    assert [ids for _, ids, _ in batched] == [ids for _, ids, _ in solo]
    assert solo[0][0] == "12 + 30 = 42" and solo[1][0] == "The capital of Peru is Lima."
    assert all(stats.finish_reason == "stop" and stats.state == "COMPLETED" for _, _, stats in batched)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(make_engine):
    engine = make_engine()
    prompts = [chat(q) for q in QUESTIONS[:8]]
    params = [SamplingParams(temperature=1.2, top_p=0.95, seed=i, max_tokens=24, ignore_eos=True)
              for i in range(8)]
    solo = [run(alone(engine, [p], sp))[0] for p, sp in zip(prompts, params, strict=True)]
    batched = run(together(engine, prompts, params))
    assert [ids for _, ids, _ in batched] == [ids for _, ids, _ in solo]
    assert len({tuple(ids) for _, ids, _ in solo}) > 1


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


def test_thinking_and_tool_calls_stream_as_their_own_events(tiny_model_dir):
    from tokenizers import AddedToken

    from shoal.model import load_model
    from shoal.model.tokenizer import Tokenizer

    path = tiny_model_dir("qwen2", vocab_size=1040)
    tok = Tokenizer.from_dir(path)
    tok.backend.add_special_tokens([AddedToken(t, special=False) for t in
                                    ("<think>", "</think>", "<tool_call>", "</tool_call>")])
    engine = Engine(load_model(path), tok)
    script = iter(tok.encode('<think>hmm</think>Done.<tool_call>{"name": "f"}</tool_call>'))
    engine.sampler.sample = lambda logits, seq: (next(script), None)

    async def go():
        stream = engine.submit([5, 6], SamplingParams(max_tokens=len(tok.encode(
            '<think>hmm</think>Done.<tool_call>{"name": "f"}</tool_call>'))))
        return [(e.kind, e.text) async for e in stream if e.text]

    try:
        events = run(go())
    finally:
        engine.close()
    assert ("tool_call", '{"name": "f"}') in events
    assert "".join(t for k, t in events if k == "thinking") == "hmm"
    assert "".join(t for k, t in events if k == "text") == "Done."


def test_ending_a_session_in_flight_releases_it_when_the_request_ends(make_engine):
    engine = make_engine()

    async def go():
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True), session_id="s")
        engine.end_session("s")
        await stream.result()

    run(go())
    assert engine.snapshot()["sessions_pinned"] == 0 and engine.snapshot()["kv_blocks_used"] == 0


def test_closing_the_engine_cancels_requests_in_flight(make_engine):
    engine = make_engine()

    async def go():
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
        await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        return await stream.result()

    stats = run(go())[2]
    assert (stats.finish_reason, stats.error) == ("cancelled", "the engine was closed")


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
    engine = make_engine(kv_cache_mb=0.75)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)

    async def go():
        await engine.submit(list(range(100, 180)), params, session_id="idle").result()
        return await engine.submit(list(range(200, 300)), params).result()

    assert run(go())[2].completion_tokens == 60
    assert engine.snapshot()["sessions_pinned"] == 0


def test_stop_string_split_across_tokens_is_cut_from_the_output(make_engine):
    engine = make_engine()
    assert len(engine.tokenizer.encode(" = 4")) > 1
    prompts = [chat("What is 12 + 30?")] * 2
    hit, miss = run(together(engine, prompts, [SamplingParams(temperature=0, stop=[" = 4"]),
                                               SamplingParams(temperature=0, stop=[" = 5"])]))
    assert (hit[0], hit[2].finish_reason) == ("12 + 30", "stop")
    assert miss[0] == "12 + 30 = 42"


def test_cancel_frees_blocks(make_engine):
    engine = make_engine()

    async def go():
        stream = engine.submit(list(range(10, 90)), SamplingParams(max_tokens=400, ignore_eos=True))
        async for event in stream:
            if event.token_ids:
                assert engine.snapshot()["kv_blocks_used"] > 0
                stream.cancel()
                break
        return await stream.result()

    _, _, stats = run(go())
    assert (stats.finish_reason, stats.state) == ("cancelled", "COMPLETED")
    assert stats.completion_tokens < 400 and engine.snapshot()["kv_blocks_used"] == 0


def test_a_stalled_consumer_stalls_only_its_own_request(make_engine):
    engine = make_engine(event_queue_size=4, stall_timeout_s=1.0)
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)

    async def go():
        stalled = engine.submit(list(range(10, 50)), params)
        started = time.monotonic()
        _, ids, _ = await engine.submit(list(range(60, 90)), params).result()
        elapsed = time.monotonic() - started
        assert len(ids) == 120 and elapsed < 1.0
        assert stalled.pending <= 5
        await asyncio.sleep(1.2)
        return await stalled.result()

    _, ids, stats = run(go())
    assert (stats.finish_reason, stats.state) == ("timeout", "FAILED")
    assert len(ids) <= 5


def test_a_request_past_its_timeout_ends_with_timeout(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=450, ignore_eos=True, timeout_s=0.1)
    _, ids, stats = run(alone(engine, [[1, 2, 3]], params))[0]
    assert (stats.finish_reason, stats.state) == ("timeout", "FAILED") and 0 < len(ids) < 450


def test_a_sampling_error_fails_only_its_request(make_engine):
    engine = make_engine()
    sample = engine.sampler.sample

    def faulty(logits, seq):
        if seq.params.seed == 13:
            raise RuntimeError("injected")
        return sample(logits, seq)

    prompts = [chat(q) for q in QUESTIONS[:3]]
    params = [SamplingParams(temperature=0, seed=s) for s in (1, 13, 2)]
    good = run(alone(engine, [prompts[0], prompts[2]], GREEDY))
    engine.sampler.sample = faulty
    results = run(together(engine, prompts, params))
    assert results[1][2].finish_reason == "error" and "injected" in results[1][2].error
    assert [r[1] for r in (results[0], results[2])] == [g[1] for g in good]


def test_a_forward_error_fails_that_tick_and_the_engine_keeps_serving(make_engine):
    engine = make_engine()
    forward, calls = engine.runner.forward, []

    def faulty(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return forward(batch)

    engine.runner.forward = faulty
    (_, _, failed), (text, _, ok) = run(alone(engine, [chat("Hello!"), chat("What is 12 + 30?")], GREEDY))
    assert (failed.finish_reason, failed.state) == ("error", "FAILED") and "device lost" in failed.error
    assert (ok.finish_reason, text) == ("stop", "12 + 30 = 42")
    assert engine.snapshot()["kv_blocks_used"] == 0


def test_multibyte_utf8_streams_intact(make_engine):
    engine = make_engine()
    target = engine.tokenizer.encode("héllo 😀 wörld ✓")
    script = iter(target)
    engine.sampler.sample = lambda logits, seq: (next(script), None)

    async def go():
        stream = engine.submit([5, 6, 7], SamplingParams(max_tokens=len(target)))
        return [e.text async for e in stream if e.kind == "text"]

    pieces = run(go())
    assert "".join(pieces) == "héllo 😀 wörld ✓"
    assert not any("\ufffd" in p for p in pieces)


def test_logprobs_report_the_token_and_top_alternatives(make_engine):
    engine = make_engine()

    async def go():
        stream = engine.submit(chat("Hello!"), SamplingParams(temperature=0, max_tokens=5, logprobs=3))
        return [e.logprobs[0] async for e in stream if e.logprobs]

    entries = run(go())
    assert len(entries) == 5
    for entry in entries:
        assert len(entry["top"]) == 3 and entry["top"][0][0] == entry["token"]
        assert entry["logprob"] == pytest.approx(entry["top"][0][1]) and entry["logprob"] <= 0


def test_priority_orders_admission(make_engine):
    engine = make_engine(n_seq_max=1, n_batch=64)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def go():
        blocker = engine.submit([1, 2, 3], params)
        low = engine.submit([4, 5, 6], params, priority=5)
        high = engine.submit([7, 8, 9], params, priority=0)
        results = await asyncio.gather(blocker.result(), low.result(), high.result())
        return [r[2].times["SCHEDULED"] for r in results]

    blocker, low, high = run(go())
    assert blocker < high < low


def test_bad_requests_get_clear_errors(make_engine):
    engine = make_engine(kv_cache_mb=0.75)

    async def go():
        cases = [("", None, "empty"), ([], None, "empty"), ([5, 99999], None, "outside the vocabulary"),
                 ([1] * 5000, None, "context"),
                 ([1] * 400, SamplingParams(max_tokens=200), "context of 512"),
                 ([1, 2], SamplingParams(temperature=-1), "temperature"),
                 ([1, 2], SamplingParams(top_p=0), "top_p"), ([1, 2], SamplingParams(stop=[""]), "stop"),
                 ([1, 2], SamplingParams(logit_bias={5000: 1.0}), "logit_bias"),
                 ([1, 2], SamplingParams(max_tokens=500), "kv_cache_mb"), (42, None, "a prompt is")]
        for prompt, params, message in cases:
            with pytest.raises(EngineError, match=message):
                engine.submit(prompt, params)
        return await engine.submit([1, 2], SamplingParams(max_tokens=3)).result()

    assert run(go())[2].completion_tokens <= 3


def test_snapshot_reports_state_without_waiting_for_the_model(make_engine):
    engine = make_engine()
    assert engine.snapshot()["phase"] == "idle"

    async def go():
        stream = engine.submit(list(range(10, 400)), SamplingParams(max_tokens=30, ignore_eos=True))
        phases = set()
        async for _ in stream:
            phases.add(engine.snapshot()["phase"])
        await engine.submit(list(range(10, 400)), SamplingParams(max_tokens=2)).result()
        return phases

    assert "generating" in run(go())
    snap = engine.snapshot()
    assert snap["phase"] == "idle" and snap["tokens_per_s"] > 0 and 0 < snap["prefix_cache_hit_rate"] <= 1
    assert {"pending_len", "running", "queue_depth", "kv_blocks_used", "kv_blocks_free"} <= set(snap)


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_random_models_match_single_sequence_generation(make_engine, tiny_model_dir, arch):
    from shoal.model import load_model
    from shoal.model.generate import generate

    path = tiny_model_dir(arch)
    engine = make_engine(path, n_batch=64, prefill_chunk_size=16)
    prompts = [list(range(3 + i, 40 + 7 * i)) for i in range(5)]
    model = load_model(path)
    expected = [list(generate(model, p, max_tokens=20)) for p in prompts]
    got = run(together(engine, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)))
    assert [ids for _, ids, _ in got] == expected
