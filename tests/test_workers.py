"""Workers on other machines, as real processes on 127.0.0.1: one WebSocket out, credit, failover, drain."""

import asyncio
import signal
import subprocess
import time

import httpx
import openai
import pytest
from conftest import SHOAL, TOKEN, start_server, start_worker, wait_workers


@pytest.fixture
def coordinator(tmp_path):
    """A pure coordinator with a ledger file; yields its URL, a list to put worker processes in, its log and
    the ledger (shared with the server through the file)."""
    from shoal.store.ledger import Ledger

    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(db)
    url, proc = start_server("--no-local-worker", "--worker-token", TOKEN, "--rpm", "0", "--streams", "0",
                             "--tpm", "0", "--db", db, ready=("ok", "no_workers"))
    workers: list[subprocess.Popen] = []
    yield url, workers, proc.log_path, ledger
    for w in workers:
        if w.poll() is None:
            w.kill()
    proc.terminate()
    proc.wait(timeout=30)


def test_killing_a_worker_mid_generation_loses_no_request_and_no_text(coordinator):
    url, workers, log, ledger = coordinator
    asker = ledger.create_user("asker")
    ledger.transfer(ledger.account(asker).id, 1000.0, "grant")
    workers += [start_worker(url, name, ledger.create_worker_token(name, "pool")) for name in ("w1", "w2")]
    wait_workers(url, 2)
    questions = [f"What is {a} + {b}?" for a, b in [(12, 30), (7, 8), (21, 14), (40, 9)]]

    async def one(client: openai.AsyncOpenAI, i: int, streaming: list[int]) -> str:
        kwargs = dict(model="demo", messages=[{"role": "user", "content": questions[i % 4]}], temperature=0.8,
                      seed=i, max_tokens=120, extra_body={"ignore_eos": True})
        if i % 2:
            return (await client.chat.completions.create(**kwargs)).choices[0].message.content
        text = []
        async for chunk in await client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices and chunk.choices[0].delta.content:
                streaming += [i] if not text else []
                text.append(chunk.choices[0].delta.content)
        return "".join(text)

    async def all_of_them(kill: bool) -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=asker, max_retries=0, timeout=300)
        streaming: list[int] = []
        tasks = [asyncio.create_task(one(client, i, streaming)) for i in range(40)]
        if kill:  # once generation is under way on both workers, however slow the machine
            while len(streaming) < 10:
                await asyncio.sleep(0.05)
            workers[0].send_signal(signal.SIGKILL)
        return await asyncio.gather(*tasks)

    answers = asyncio.run(all_of_them(kill=True))
    again = asyncio.run(all_of_them(kill=False))
    assert answers == again
    assert all(answers)
    assert '"message": "job reassigned"' in log.read_text()
    with ledger.engine.connect() as c:
        from sqlalchemy import text

        paid = c.execute(text("select count(*), count(distinct job) from transfers where reason='reward'")).one()
        charged = c.execute(text("select count(*) from transfers where reason='charge'")).scalar()
    assert tuple(paid) == (80, 80) and charged == 80  # every job paid once, none twice, the killed one's included
    assert ledger.balanced() and ledger.account(asker).kudos < 1000


def test_a_worker_with_a_wrong_token_is_refused(coordinator):
    url, workers, *_ = coordinator
    workers.append(start_worker(url, "intruder", token="wrong"))
    deadline = time.monotonic() + 30
    while "connection failed" not in workers[0].log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "connection failed" in workers[0].log_path.read_text() and workers[0].poll() is None
    assert httpx.get(f"{url}/health").json()["status"] == "no_workers"


def test_a_ledger_token_connects_and_its_owner_is_paid_once_per_job(tmp_path):
    from shoal.store.ledger import Ledger

    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    made = subprocess.run([SHOAL, "token", "create", "--worker", "rig", "--user", "carol", "--db", db],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    url, proc = start_server("--no-local-worker", "--db", db, ready=("ok", "no_workers"))
    worker = start_worker(url, "rig", token=made.stdout.strip())
    try:
        wait_workers(url, 1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(3):
            client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello!"}])
    finally:
        worker.kill()
        proc.terminate()
        proc.wait(timeout=30)
    ledger = Ledger(db)
    with ledger.engine.connect() as c:
        from sqlalchemy import text

        rewards = c.execute(text("select count(*), count(distinct job) from transfers where reason='reward'")).one()
    assert tuple(rewards) == (3, 3) and ledger.balanced()


def test_sigterm_drains_the_worker(coordinator):
    url, workers, *_ = coordinator
    workers.append(start_worker(url, "w1"))
    wait_workers(url, 1)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello!"}],
                                            max_tokens=300, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    workers[0].send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert workers[0].wait(timeout=30) == 0
    wait_workers(url, 0)


def test_headroom_is_a_share_of_the_machine():
    from shoal.worker.agent import headroom

    assert 0.0 <= headroom() <= 1.0
