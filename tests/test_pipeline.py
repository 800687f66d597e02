"""Pipelines of real stage worker subprocesses, each holding a range of the demo model's 4 layers."""

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from conftest import TOKEN, start_server, start_worker, wait_workers

from shoal.engine import Engine, SamplingParams
from shoal.model import DEMO_PATH

QUESTIONS = ["What is 12 + 30?", "What is the capital of France?", "Spell cat.", "Say hello."]
CORRUPT = Path(__file__).with_name("corrupt_worker.py")
UNREACHABLE = Path(__file__).with_name("unreachable_worker.py")


@pytest.fixture
def swarm():
    """A pure coordinator; yields (url, a list to put stage processes in)."""
    url, proc = start_server("--no-local-worker", "--worker-token", TOKEN, "--rpm", "0", "--streams", "0",
                             "--tpm", "0", "--verify-rate", "0", ready=("ok", "no_workers"))
    stages: list[subprocess.Popen] = []
    yield url, stages, proc
    for p in stages:
        if p.poll() is None:
            p.kill()
    proc.terminate()
    proc.wait(timeout=30)


def stage(url: str, name: str, layers: str) -> subprocess.Popen:
    return start_worker(url, name, TOKEN, "--layers", layers, "--kv-cache-mb", "32")


def expected(params: dict) -> list[str]:
    """What one whole-model engine answers, in process."""
    async def run() -> list[str]:
        engine = Engine.from_dir(DEMO_PATH)
        try:
            out = []
            for q in QUESTIONS:
                stream = engine.submit([{"role": "user", "content": q}], SamplingParams(**params))
                out.append("".join([e.text async for e in stream if e.kind == "text"]))
            return out
        finally:
            engine.close()
    return asyncio.run(run())


def ask(url: str, params: dict, stream: bool = False) -> list[str]:
    """All QUESTIONS at once through the API."""
    async def one(client: openai.AsyncOpenAI, q: str) -> str:
        kwargs = dict(model="demo", messages=[{"role": "user", "content": q}], max_tokens=params["max_tokens"],
                      temperature=params["temperature"], seed=params.get("seed"),
                      extra_body={"ignore_eos": params.get("ignore_eos", False)})
        if not stream:
            return (await client.chat.completions.create(**kwargs)).choices[0].message.content
        chunks = await client.chat.completions.create(stream=True, **kwargs)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*[one(client, q) for q in QUESTIONS])
    return asyncio.run(run())


def test_three_stages_give_the_tokens_of_one_whole_model_worker(swarm):
    url, stages, _ = swarm
    stages += [stage(url, "s0", "0:1"), stage(url, "s1", "1:3"), stage(url, "s2", "3:4")]
    wait_workers(url, 3, kind="stages")
    for params in (dict(temperature=0.0, max_tokens=40), dict(temperature=0.8, seed=7, max_tokens=40)):
        assert ask(url, params) == expected(params)
        assert ask(url, params, stream=True) == expected(params)
    seen = httpx.get(f"{url}/v1/workers").json()
    assert seen["routes"] == {}  # every hop's session was closed
    # every step went to the first hop from the coordinator, and on from each hop to the next by push
    assert seen["route_hops"]["pushed"] == 2 * seen["route_hops"]["sent"] and "relayed" not in seen["route_hops"]


def test_a_stage_that_takes_no_pushes_gets_its_inputs_relayed(swarm):
    url, stages, _ = swarm
    stages += [stage(url, "s0", "0:1"), start_worker(url, "s1", TOKEN, "--layers", "1:3", "--kv-cache-mb", "32",
                                                     "--no-push"), stage(url, "s2", "3:4")]
    wait_workers(url, 3, kind="stages")
    params = dict(temperature=0.0, max_tokens=20)
    assert ask(url, params) == expected(params)
    seen = httpx.get(f"{url}/v1/workers").json()
    assert {w["name"]: w["peer"] is None for w in seen["workers"].values()} == {"s0": False, "s1": True, "s2": False}
    assert set(seen["route_hops"]) == {"sent"}


def test_a_missing_layer_range_is_503_naming_it(swarm):
    url, stages, _ = swarm
    stages += [stage(url, "s0", "0:1"), stage(url, "s2", "3:4")]
    wait_workers(url, 2, kind="stages")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503 and "layers 1:3" in info.value.message


def test_killing_the_middle_stage_mid_decode_gives_identical_output(swarm):
    url, stages, _ = swarm
    stages += [stage(url, "s0", "0:1"), stage(url, "m1", "1:3"), stage(url, "m2", "1:3"), stage(url, "s2", "3:4")]
    wait_workers(url, 4, kind="stages")
    params = dict(temperature=0.8, seed=3, max_tokens=300, ignore_eos=True)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    chunks = iter(client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": QUESTIONS[0]}], stream=True, max_tokens=300,
        temperature=0.8, seed=3, extra_body={"ignore_eos": True}))
    text = [next(chunks).choices[0].delta.content or "" for _ in range(5)]
    routes = httpx.get(f"{url}/v1/workers").json()["routes"]
    middle = next(name for name, start, _ in next(iter(routes.values())) if start == 1)
    next(p for p in stages if p.args[p.args.index("--name") + 1] == middle).send_signal(signal.SIGKILL)
    text += [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(text) == expected({**params, "max_tokens": 300})[0]


def test_a_stage_that_pushes_cannot_reach_gets_its_inputs_relayed_from_then_on(swarm):
    url, stages, _ = swarm
    first = stage(url, "s0", "0:1")
    stages.append(first)  # in the list, so the fixture stops it
    log = Path(first.log_path)
    stages.append(subprocess.Popen([sys.executable, str(UNREACHABLE), "worker", "--coordinator", url, "--token", TOKEN,
                                    "--name", "s1", "--layers", "1:3", "--kv-cache-mb", "32"],
                                   stdout=log.with_suffix(".s1").open("w"), stderr=subprocess.STDOUT))
    stages += [stage(url, "s2", "3:4")]
    wait_workers(url, 3, kind="stages")
    params = dict(temperature=0.0, max_tokens=20)
    assert ask(url, params) == expected(params)
    first = httpx.get(f"{url}/v1/workers").json()["route_hops"]
    assert first["relayed"] >= 1  # the pushes to s1 failed and the coordinator relayed those steps
    assert ask(url, params) == expected(params)
    hops = httpx.get(f"{url}/v1/workers").json()["route_hops"]
    # since then, routes through s1 are relayed hop by hop: no push is tried, none has to be relayed
    assert (hops["relayed"], hops.get("pushed")) == (first["relayed"], first.get("pushed"))
    assert hops["sent"] > first["sent"]


def test_a_worker_that_corrupts_its_activations_is_caught_by_verification():
    url, proc = start_server("--no-local-worker", "--worker-token", TOKEN, "--verify-rate", "1",
                             ready=("ok", "no_workers"))
    stages = [stage(url, "s1", "2:4"), stage(url, "good1", "0:2"), stage(url, "good2", "0:2")]
    log = stages[0].log_path.with_name(stages[0].log_path.name + ".bad")
    with log.open("w") as f:
        stages.append(subprocess.Popen([sys.executable, str(CORRUPT), "worker", "--coordinator", url, "--token",
                                        TOKEN, "--name", "bad", "--layers", "0:2", "--kv-cache-mb", "32"],
                                       stdout=f, stderr=subprocess.STDOUT))
    try:
        wait_workers(url, 4, kind="stages")
        params = dict(temperature=0.0, max_tokens=24)
        for _ in range(3):
            assert ask(url, params) == expected(params)
        workers = httpx.get(f"{url}/v1/workers").json()["workers"].values()
        assert [w["name"] for w in workers if w["banned"]] == ["bad"]
    finally:
        for p in stages:
            p.kill()
        proc.terminate()
        proc.wait(timeout=30)


def test_a_stage_holding_a_third_of_a_model_uses_about_a_third_of_its_weight_memory(tmp_path):
    from conftest import make_hf_model, save_hf_model

    from shoal.model import load_model

    path = save_hf_model(make_hf_model("llama", num_hidden_layers=12, vocab_size=96), tmp_path)

    def weight_bytes(layers: tuple[int, int] | None) -> int:
        return sum(p.numel() * p.element_size() for p in load_model(path, layers).parameters())

    whole, middle = weight_bytes(None), weight_bytes((4, 8))
    assert 0.3 < middle / whole < 0.34
    assert weight_bytes((0, 4)) > middle  # the first range also holds the embedding


def test_a_joining_worker_with_a_memory_limit_takes_the_range_the_swarm_lacks(swarm):
    url, stages, _ = swarm
    stages.append(stage(url, "s0", "0:2"))
    wait_workers(url, 1, kind="stages")
    stages.append(start_worker(url, "auto", TOKEN, "--max-memory-gb", "0.007", "--kv-cache-mb", "32"))
    wait_workers(url, 2, kind="stages")  # 0.007 GB holds 2 of the demo model's 4 layers
    held = sorted(w["layers"]["demo"] for w in httpx.get(f"{url}/v1/workers").json()["workers"].values())
    assert held == [[0, 2], [2, 4]]
    params = dict(temperature=0.0, max_tokens=16)
    assert ask(url, params) == expected(params)


def test_a_route_pays_each_stage_owner(tmp_path):
    from sqlalchemy import text

    from shoal.store.ledger import Ledger

    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(db)
    asker = ledger.create_user("asker")
    ledger.transfer(ledger.account(asker).id, 100.0, "grant")
    url, proc = start_server("--no-local-worker", "--db", db, ready=("ok", "no_workers"))
    stages = [start_worker(url, name, ledger.create_worker_token(name, f"owner-{name}"), "--layers", layers)
              for name, layers in (("s0", "0:1"), ("s1", "1:3"), ("s2", "3:4"))]
    try:
        wait_workers(url, 3, kind="stages")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=asker, max_retries=0)
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello!"}], max_tokens=40,
                                       extra_body={"ignore_eos": True})
    finally:
        for p in stages:
            p.kill()
        proc.terminate()
        proc.wait(timeout=30)
    with ledger.engine.connect() as c:
        rewards = dict(c.execute(text("select worker, amount from transfers where reason='reward'")).all())
    assert set(rewards) == {"s0", "s1", "s2"}  # the demo model is so small that each share rounds to 0 kudos
    assert ledger.balanced()
