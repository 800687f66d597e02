"""The AI Horde v2 text API against live servers: the official horde_sdk, a pop/submit bridge, kudos priority."""

import os
import subprocess
import sys
import time

import httpx
import pytest
from conftest import start_server

from shoal.store.ledger import Ledger

CHATML = "<|im_start|>user\nCapital of Peru?<|im_end|>\n<|im_start|>assistant\n"
ANON = {"apikey": "0000000000"}


def wait_done(url: str, wp_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/api/v2/generate/text/status/{wp_id}").json()
        if status["done"]:
            return status
        time.sleep(0.2)
    raise AssertionError(f"request {wp_id} not done: {status}")


def test_the_official_horde_sdk_gets_a_generation(server_url):
    script = f"""
from horde_sdk.ai_horde_api.ai_horde_clients import AIHordeAPISimpleClient
from horde_sdk.ai_horde_api.apimodels import TextGenerateAsyncRequest, ModelGenerationInputKobold
status, gid = AIHordeAPISimpleClient().text_generate_request(TextGenerateAsyncRequest(
    apikey="0000000000", prompt={CHATML!r}, models=["demo"],
    params=ModelGenerationInputKobold(max_length=32, max_context_length=256, temperature=0)), timeout=60)
print(status.generations[0].text)
"""
    env = dict(os.environ, AI_HORDE_URL=f"{server_url}/api/")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "The capital of Peru is Lima."


def test_horde_errors_have_the_horde_shape(server_url):
    api = f"{server_url}/api/v2"
    empty = httpx.post(f"{api}/generate/text/async", json={"prompt": ""}, headers=ANON)
    assert (empty.status_code, empty.json()["rc"]) == (400, "MissingPrompt")
    bad = httpx.post(f"{api}/generate/text/async", json={"prompt": "hi", "params": {"max_length": 5}}, headers=ANON)
    assert bad.status_code == 400 and "params.max_length" in bad.json()["errors"]
    assert httpx.post(f"{api}/generate/text/async", json={"prompt": "hi"}, headers={"apikey": "x" * 22}).json()[
        "rc"] == "InvalidAPIKey"
    missing = httpx.get(f"{api}/generate/text/status/nope")
    assert (missing.status_code, missing.json()["rc"]) == (404, "RequestNotFound")
    assert httpx.get(f"{api}/nothing/here").json()["rc"] == "NotFound"
    assert httpx.get(f"{api}/status/heartbeat").json()["message"] == "OK"
    assert [m["name"] for m in httpx.get(f"{api}/status/models?type=text").json()] == ["demo"]
    dry = httpx.post(f"{api}/generate/text/async", json={"prompt": "hi", "dry_run": True}, headers=ANON)
    assert dry.status_code == 200 and dry.json()["kudos"] > 0


@pytest.fixture
def pull_only(tmp_path):
    """A coordinator with no shoal workers, a ledger with a worker owner and a rich user."""
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(db)
    owner, rich = ledger.create_user("bridge-owner"), ledger.create_user("rich")
    ledger.transfer(ledger.account(rich).id, 500.0, "grant")
    url, proc = start_server("--no-local-worker", "--db", db, ready=("ok", "no_workers"))
    yield f"{url}/api/v2", {"apikey": owner}, {"apikey": rich}, ledger
    proc.terminate()
    proc.wait(timeout=30)


def pop(api: str, key: dict, max_length: int = 80, max_context_length: int = 1024) -> dict:
    response = httpx.post(f"{api}/generate/text/pop", json={"name": "scribe-1", "models": ["demo"],
                                                             "max_length": max_length,
                                                             "max_context_length": max_context_length}, headers=key)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_horde_style_worker_pops_and_submits(pull_only):
    api, owner, _, ledger = pull_only
    assert pop(api, owner)["ids"] == []
    wp = httpx.post(f"{api}/generate/text/async", json={"prompt": "Say hi", "models": ["demo"],
                                                        "params": {"max_length": 40}}, headers=ANON)
    assert wp.status_code == 202, wp.text
    job = pop(api, owner)
    assert job["payload"]["prompt"] == "Say hi" and job["payload"]["max_length"] == 40 and job["model"] == "demo"
    anon_pop = httpx.post(f"{api}/generate/text/pop", json={"name": "x", "models": ["demo"]}, headers=ANON)
    assert anon_pop.json()["rc"] == "AnonForbiddenWorker"
    done = httpx.post(f"{api}/generate/text/submit", json={"id": job["id"], "generation": "Hi there!"},
                      headers=owner)
    assert done.status_code == 200 and done.json()["reward"] > 0
    again = httpx.post(f"{api}/generate/text/submit", json={"id": job["id"], "generation": "x"}, headers=owner)
    assert (again.status_code, again.json()["rc"]) == (400, "DuplicateGen")
    unknown = httpx.post(f"{api}/generate/text/submit", json={"id": "nope", "generation": "x"}, headers=owner)
    assert (unknown.status_code, unknown.json()["rc"]) == (404, "InvalidJobID")
    status = wait_done(api.removesuffix("/api/v2"), wp.json()["id"])
    assert [g["text"] for g in status["generations"]] == ["Hi there!"]
    assert status["generations"][0]["worker_name"] == "scribe-1"
    assert ledger.account(owner["apikey"]).kudos > 0 and ledger.balanced()


def test_a_high_kudos_users_job_starts_before_an_older_anonymous_one(pull_only):
    api, owner, rich, _ = pull_only
    pop(api, owner)
    body = {"prompt": "Say hi", "models": ["demo"], "params": {"max_length": 40}}
    older = httpx.post(f"{api}/generate/text/async", json=body, headers=ANON).json()["id"]
    richer = httpx.post(f"{api}/generate/text/async", json=body, headers=rich).json()["id"]
    first = pop(api, owner)
    url = api.removesuffix("/api/v2")
    assert httpx.get(f"{url}/api/v2/generate/text/status/{richer}").json()["processing"] == 1
    assert httpx.get(f"{url}/api/v2/generate/text/status/{older}").json()["waiting"] == 1
    assert first["ids"]


def test_the_returned_text_includes_the_stop_sequence(server_url):
    body = {"prompt": CHATML, "models": ["demo"], "params": {"max_length": 32, "temperature": 0,
                                                              "stop_sequence": ["Peru"]}}
    wp = httpx.post(f"{server_url}/api/v2/generate/text/async", json=body, headers=ANON)
    assert wp.status_code == 202, wp.text
    assert [g["text"] for g in wait_done(server_url, wp.json()["id"])["generations"]] == ["The capital of Peru"]


def test_large_requests_need_upfront_kudos_or_a_downgrade(pull_only):
    api, owner, rich, ledger = pull_only
    pop(api, owner, 1024, 4096)  # the bridge worker is now known: one thread
    body = {"prompt": "Tell a long story", "models": ["demo"], "params": {"max_length": 1024}}
    refused = httpx.post(f"{api}/generate/text/async", json=body, headers=ANON)
    assert (refused.status_code, refused.json()["rc"]) == (403, "KudosUpfront")
    paid = httpx.post(f"{api}/generate/text/async", json=body, headers=rich)
    assert paid.status_code == 202 and ledger.account(rich["apikey"]).kudos == 480  # 20 kudos held for the job
    cut = httpx.post(f"{api}/generate/text/async", json={**body, "allow_downgrade": True}, headers=ANON)
    assert cut.status_code == 202, cut.text
    url = api.removesuffix("/api/v2")
    waiting = httpx.get(f"{url}/api/v2/generate/text/status/{cut.json()['id']}").json()
    assert waiting["queue_position"] == 2 and waiting["wait_time"] > 0
    popped = [pop(api, owner, 1024, 4096) for _ in range(2)]
    assert [p["payload"]["max_length"] for p in popped] == [1024, 512]  # the anonymous one was cut to 512
    for job in popped:
        httpx.post(f"{api}/generate/text/submit", json={"id": job["id"], "generation": "Once."}, headers=owner)
    wait_done(url, paid.json()["id"])
    assert 480 < ledger.account(rich["apikey"]).kudos < 500 and ledger.balanced()  # the hold came back
