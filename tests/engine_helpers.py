"""What the engine tests share: prompts, and running requests alone or together."""

import asyncio
import time

from shoal.engine import Engine, SamplingParams

QUESTIONS = ["What is 12 + 30?", "Capital of Peru?", "Spell apple.", "Hello!", "What is 91 - 45?",
             "Reverse the word garden.", "How many letters are in planet?", "Name the capital of Japan.",
             "Add 7 and 8.", "Who are you?", "What is 305 + 12?", "Spell the word tiger letter by letter.",
             "Capital of France?", "Write mango backwards.", "Calculate 66-9", "What can you do?"]
GREEDY = SamplingParams(temperature=0, max_tokens=40)


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


def abandon_then_serve(engine: Engine) -> None:
    """A request whose event loop closes while it runs is cancelled, and the engine serves the next one."""

    async def leave():
        engine.submit([1, 2, 3], SamplingParams(max_tokens=300, ignore_eos=True))
        await asyncio.sleep(0.05)

    run(leave())  # waking a closed loop raises in the thread that delivers the events
    _, ids, _ = run(alone(engine, [[4, 5, 6]], SamplingParams(max_tokens=5, ignore_eos=True)))[0]
    assert len(ids) == 5
    deadline = time.monotonic() + 5
    while engine.snapshot()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.snapshot()["running"] == 0 and engine.snapshot()["kv_blocks_used"] == 0
