"""`shoal serve` as clients see it: the official openai package against a live server on 127.0.0.1."""

import asyncio
import re
import time

import httpx
import openai
import pytest
from conftest import start_server

QUESTION = [{"role": "user", "content": "What is 12 + 30?"}]


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_models_and_health(client, server_url):
    assert [m.id for m in client.models.list()] == ["demo"]
    assert httpx.get(f"{server_url}/health").json()["status"] == "ok"


def test_chat_completion(client):
    out = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0)
    assert out.choices[0].message.content == "12 + 30 = 42"
    assert out.choices[0].finish_reason == "stop" and out.object == "chat.completion"
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    again = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_chat_completion_streams_with_usage(client):
    chunks = list(client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "12 + 30 = 42"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completions_streamed_and_not(client):
    prompt = "<|im_start|>user\nCapital of Peru?<|im_end|>\n<|im_start|>assistant\n"
    out = client.completions.create(model="demo", prompt=prompt, temperature=0, max_tokens=20)
    assert out.choices[0].text == "The capital of Peru is Lima."
    streamed = client.completions.create(model="demo", prompt=prompt, temperature=0, max_tokens=20, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "The capital of Peru is Lima."


def test_seed_n_stop_logprobs(client):
    kwargs = dict(model="demo", messages=[{"role": "user", "content": "Hello!"}], temperature=1.5, max_tokens=12)
    first = client.chat.completions.create(seed=5, n=2, **kwargs)
    again = client.chat.completions.create(seed=5, n=2, **kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len(first.choices) == 2
    cut = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, stop=[" = 4"])
    assert cut.choices[0].message.content == "12 + 30"
    lp = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, logprobs=True,
                                        top_logprobs=2, max_tokens=3)
    entries = lp.choices[0].logprobs.content
    assert len(entries) == 3 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


@pytest.mark.parametrize(("kwargs", "status", "param"), [
    (dict(temperature=3), 400, "temperature"),
    (dict(messages=[]), 400, "messages"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), 400, "messages.0.role"),
    (dict(model="nope"), 404, "model"),
    (dict(max_tokens=5000), 400, None),
    (dict(top_logprobs=2), 400, None),
    (dict(n=0), 400, "n"),
    (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (dict(logit_bias={"x": 1}), 400, "logit_bias"),
])
def test_bad_fields_get_openai_errors(client, kwargs, status, param):
    request = dict(model="demo", messages=QUESTION) | kwargs
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**request)
    assert info.value.status_code == status
    error = info.value.body
    assert error["message"] and error["type"]
    if param:
        assert error["param"] == param
    if kwargs.get("model") == "nope":
        assert "demo" in error["message"]
    if "max_tokens" in kwargs:
        assert "context" in error["message"]


def test_a_client_that_disconnects_frees_its_sequence(client, server_url):
    stream = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=400, stream=True,
                                            extra_body={"ignore_eos": True})
    for _, _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (metric(server_url, 'shoal_requests_total{finish_reason="cancelled"}') >= 1
                and metric(server_url, "shoal_kv_cache_usage") == 0):
            break
        time.sleep(0.2)
    assert metric(server_url, 'shoal_requests_total{finish_reason="cancelled"}') >= 1
    assert metric(server_url, "shoal_kv_cache_usage") == 0


def test_fifty_concurrent_streaming_clients(server_url, client):
    questions = [f"What is {a} + {b}?" for a, b in [(12, 30), (7, 8), (21, 14), (40, 9), (33, 3)]]
    alone = {q: client.chat.completions.create(model="demo", messages=[{"role": "user", "content": q}],
                                               temperature=0).choices[0].message.content for q in questions}

    async def one(aclient: openai.AsyncOpenAI, q: str) -> str:
        stream = await aclient.chat.completions.create(model="demo", messages=[{"role": "user", "content": q}],
                                                       temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(aclient, questions[i % 5]) for i in range(50)))

    answers = asyncio.run(all_of_them())
    assert answers == [alone[questions[i % 5]] for i in range(50)]


def test_rate_limit_answers_429_then_recovers():
    url, proc = start_server("--rpm", "30")
    try:
        limited = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(30):
            limited.chat.completions.create(model="demo", messages=QUESTION, max_tokens=1)
        with pytest.raises(openai.RateLimitError) as info:
            limited.chat.completions.create(model="demo", messages=QUESTION, max_tokens=1)
        retry_after = int(info.value.response.headers["retry-after"])
        assert 1 <= retry_after <= 3
        time.sleep(retry_after)
        assert limited.chat.completions.create(model="demo", messages=QUESTION, max_tokens=1).choices
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_api_keys_are_checked():
    url, proc = start_server("--api-key", "sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert good.chat.completions.create(model="demo", messages=QUESTION, temperature=0).choices
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_shoal_chat_talks_to_a_running_server(server_url):
    import subprocess
    import sys
    from pathlib import Path

    shoal = str(Path(sys.executable).with_name("shoal"))
    out = subprocess.run([shoal, "chat", "--url", server_url], input="What is 12 + 30?\nCapital of Peru?\n/exit\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "12 + 30 = 42" in out.stdout and "The capital of Peru is Lima." in out.stdout
    bad = subprocess.run([shoal, "chat", "--url", "http://127.0.0.1:9"], input="/exit\n", capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "cannot reach" in bad.stderr


def test_private_mode_logs_no_prompt_text(monkeypatch, tmp_path):
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path))  # the engine's process times its products, and says so
    url, proc = start_server("--private")
    try:
        secret = "zebra-secret-4471"
        openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": f"Spell {secret}."}], max_tokens=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = proc.log_path.read_text()
    assert '"message": "request finished"' in log and secret not in log and "spelled" not in log
    assert "POST /v1/chat/completions" not in log
    assert '"logger": "shoal.model", "message": "timing products' in log  # the engine's process logs as JSON too


def test_openapi_document_validates(server_url):
    from openapi_spec_validator import validate

    spec = httpx.get(f"{server_url}/openapi.json").json()
    validate(spec)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/"} <= set(spec["paths"])
