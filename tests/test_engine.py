"""The engine end to end on the demo model and tiny random models: batching, sampling, streaming, errors."""

import asyncio
import time

import pytest
import torch
from engine_helpers import GREEDY, QUESTIONS, abandon_then_serve, alone, chat, run, together

from shoal.engine import Engine, EngineError, SamplingParams


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
    engine.sampler.sample, engine.sampler.plain = lambda logits, seq: (next(script), None), lambda seq: False

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


@pytest.mark.parametrize("held", [False, True])
def test_closing_the_engine_cancels_requests_in_flight(make_engine, held):
    engine = make_engine(event_queue_size=2 if held else 64)  # held: its unread events stop it before the close

    async def go():
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
        await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        return await stream.result()

    stats = run(go())[2]
    assert (stats.finish_reason, stats.error) == ("cancelled", "the engine was closed")


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


def test_cancelling_a_stalled_request_ends_it_at_once(make_engine):
    engine = make_engine(event_queue_size=4)

    async def go():
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
        await asyncio.sleep(0.5)  # the engine holds it after 4 events and waits for commands
        stream.cancel()
        return await asyncio.wait_for(stream.result(), 5)

    _, ids, stats = run(go())
    assert stats.finish_reason == "cancelled" and len(ids) == 4 and engine.snapshot()["kv_blocks_used"] == 0


def test_a_stalled_consumer_stalls_only_its_own_request(make_engine):
    engine = make_engine(event_queue_size=4, stall_timeout_s=3.0)  # long enough for 120 tokens on a busy machine
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)

    async def go():
        stalled = engine.submit(list(range(10, 50)), params)
        started = time.monotonic()
        _, ids, _ = await engine.submit(list(range(60, 90)), params).result()
        elapsed = time.monotonic() - started
        assert len(ids) == 120 and elapsed < 3.0  # done before the stalled one times out: never waited on it
        assert stalled.pending <= 5
        await asyncio.sleep(3.2)
        return await stalled.result()

    _, ids, stats = run(go())
    assert (stats.finish_reason, stats.state) == ("timeout", "FAILED")
    assert len(ids) <= 5


def test_a_request_whose_event_loop_closed_is_cancelled_and_the_engine_goes_on(make_engine):
    abandon_then_serve(make_engine())


def test_a_request_past_its_timeout_ends_with_timeout(make_engine):
    engine = make_engine()
    forward = engine.runner.forward

    def paced(batch):  # 450 ticks take 2.25 s or more on any host (a Zen 5 host decoded them in under 0.5 s)
        time.sleep(0.005)
        return forward(batch)

    engine.runner.forward = paced
    params = SamplingParams(max_tokens=450, ignore_eos=True, timeout_s=0.5)
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
    engine.sampler.sample, engine.sampler.plain = faulty, lambda seq: False  # one by one, on a GPU too
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
    engine.sampler.sample, engine.sampler.plain = lambda logits, seq: (next(script), None), lambda seq: False

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


def test_an_engine_runs_in_bfloat16_and_an_unknown_dtype_is_named(make_engine):
    from shoal.model.errors import ModelError

    engine = make_engine(dtype="bfloat16")
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def go() -> tuple:
        return await engine.submit("What is 12 + 30?", params).result()

    _, ids, stats = asyncio.run(go())
    assert len(ids) == 8 and stats.finish_reason == "length"
    with pytest.raises(ModelError, match="unknown dtype 'float8'; use one of float32, bfloat16, float16"):
        make_engine(dtype="float8")


def test_a_stage_takes_hidden_states_from_a_stage_in_another_dtype():
    from shoal.engine import EngineConfig
    from shoal.engine.stage import StageEngine
    from shoal.model import DEMO_PATH

    first = StageEngine.from_dir(DEMO_PATH, (0, 1))
    rest = StageEngine.from_dir(DEMO_PATH, (1, 4), EngineConfig(dtype="bfloat16"))

    async def go() -> dict:
        ids = first.open("s", (0, 1), "Hello")
        rest.open("s", (1, 4), "Hello", SamplingParams(temperature=0, max_tokens=4))
        hidden = (await first.step("s", 0, torch.tensor(ids)))["hidden"]
        return await rest.step("s", 0, hidden, sample=True)

    try:
        assert isinstance(asyncio.run(go())["token"], int)
    finally:
        first.close()
        rest.close()


def test_an_engine_on_packed_weights_matches_plain_ones_and_keys_its_cache_alike(tiny_model_dir):
    from shoal.engine.engine import fingerprint
    from shoal.model import load_model
    from shoal.model.matmul import ROW_BUCKETS, Linear, pack_loaded, packed_product
    from shoal.model.tokenizer import Tokenizer

    path = tiny_model_dir("llama")
    plain, packed = load_model(path, device="cpu"), load_model(path, device="cpu")  # packing is a CPU layout
    tied = packed.lm_head.weight is packed.embed_tokens.weight
    for m in packed.modules():
        if isinstance(m, Linear):
            m.ways = (packed_product,) * len(ROW_BUCKETS)  # as `tune` chooses where it pays for every row count
    pack_loaded(packed)
    assert packed.layers[0].mlp.down_proj.weight.is_mkldnn
    assert not tied or (packed.lm_head.packed is not None and packed.lm_head.weight is packed.embed_tokens.weight)
    assert fingerprint(packed) == fingerprint(plain)
    engines = [Engine(model, Tokenizer.from_dir(path)) for model in (plain, packed)]
    try:
        prompts = [list(range(3 + i, 40 + 7 * i)) for i in range(4)]
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        got = [[ids for _, ids, _ in run(together(engine, prompts, params))] for engine in engines]
        assert got[0] == got[1]
    finally:
        for engine in engines:
            engine.close()


def test_a_stage_runs_decode_steps_on_the_loops_thread_as_one_batch_and_prefill_on_its_model_thread(make_engine):
    import threading

    from shoal.engine.stage import StageEngine
    from shoal.model import DEMO_PATH

    stage = StageEngine.from_dir(DEMO_PATH, (0, 4))
    runs: list[tuple[str, int]] = []
    original = stage._run

    def recording(group: list, answers: list) -> None:
        runs.append((threading.current_thread().name, len(group)))
        original(group, answers)
    stage._run = recording

    async def go() -> tuple[list[int], list[int]]:
        greedy = SamplingParams(temperature=0, max_tokens=8)
        ids = {s: stage.open(s, (0, 4), prompt, greedy) for s, prompt in (("a", "Hello"), ("b", "Once upon"))}
        firsts = await asyncio.gather(*(stage.step(s, 0, torch.tensor(ids[s]), sample=True) for s in "ab"))
        seconds = await asyncio.gather(*(stage.step(s, len(ids[s]), torch.tensor([f["token"]]), sample=True)
                                         for s, f in zip("ab", firsts, strict=True)))
        return [f["token"] for f in firsts], [s["token"] for s in seconds]

    mlp_rows: list[int] = []
    stage.model.layers[-1].mlp.register_forward_hook(lambda module, args, out: mlp_rows.append(len(args[0])))
    try:
        firsts, seconds = asyncio.run(go())
    finally:
        stage.close()
    assert runs == [("shoal-stage", 2), ("MainThread", 2)]
    assert mlp_rows == [2, 2]  # the last layer finishes the sampled rows only, each prompt's last one
    each = run(alone(make_engine(), ["Hello", "Once upon"], SamplingParams(temperature=0, max_tokens=2)))
    assert [ids for _, ids, _ in each] == [[a, b] for a, b in zip(firsts, seconds, strict=True)]


def test_a_last_stage_returns_every_row_of_a_step_that_does_not_sample_beside_one_that_does():
    from shoal.engine.stage import StageEngine
    from shoal.model import DEMO_PATH

    stage = StageEngine.from_dir(DEMO_PATH, (0, 4))
    greedy = SamplingParams(temperature=0, max_tokens=4)

    async def go() -> tuple[dict, dict, dict]:
        ids = {s: stage.open(s, (0, 4), "Once upon a time", greedy) for s in ("alone", "sampled", "beside")}
        alone = await stage.step("alone", 0, torch.tensor(ids["alone"]))
        sampled, beside = await asyncio.gather(stage.step("sampled", 0, torch.tensor(ids["sampled"]), sample=True),
                                               stage.step("beside", 0, torch.tensor(ids["beside"])))
        return alone, sampled, beside

    try:
        alone, sampled, beside = asyncio.run(go())
    finally:
        stage.close()
    assert isinstance(sampled["token"], int) and beside["hidden"].shape == alone["hidden"].shape
    torch.testing.assert_close(beside["hidden"], alone["hidden"], atol=1e-4, rtol=0)
