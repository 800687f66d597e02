"""best_of and the LLM plan operators: generations through the coordinator's queue, scored, the best kept."""

import httpx
import openai
import pytest

QUESTION = [{"role": "user", "content": "What is 21 + 14?"}]


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


def mean_logprob(choice) -> float:
    entries = choice.logprobs.content
    return sum(e.logprob for e in entries) / len(entries)


def test_best_of_returns_the_samples_with_the_highest_logprob_per_token(client):
    kwargs = dict(model="demo", messages=QUESTION, temperature=1.0, max_tokens=12)
    best = client.chat.completions.create(n=2, seed=40, extra_body={"best_of": 4}, **kwargs)
    answers = [client.chat.completions.create(seed=40 + k, logprobs=True, top_logprobs=0, **kwargs) for k in range(4)]
    samples = [a.choices[0] for a in answers]
    ranked = sorted(samples, key=mean_logprob, reverse=True)  # stable, as the plan's sort
    assert [c.message.content for c in best.choices] == [c.message.content for c in ranked[:2]]
    assert best.usage.completion_tokens == sum(a.usage.completion_tokens for a in answers)  # all four are billed


def test_best_of_is_checked(client):
    for extra, cause in [({"best_of": 1, "n": 2}, "best_of (1) must be at least n (2)"),
                         ({"best_of": 2, "stream": True}, "cannot be combined with stream")]:
        with pytest.raises(openai.BadRequestError, match=cause.replace("(", r"\(").replace(")", r"\)")):
            client.chat.completions.create(model="demo", messages=QUESTION, extra_body=extra)


def test_the_shipped_best_of_n_plan_runs_over_http(server_url):
    body = {"prompt": [{"role": "user", "content": "What is 7 + 8?"}]}
    answer = httpx.post(f"{server_url}/v1/plans/best_of_n", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    [best] = answer.json()["candidates"]
    assert best["text"] and best["completion_tokens"] >= 1 and best["score"] == pytest.approx(best["logprob"])
    missing = httpx.post(f"{server_url}/v1/plans/best_of_n", json={}, timeout=30)
    assert missing.status_code == 400 and "missing required field: prompt" in missing.json()["error"]["message"]


def test_shoal_plan_run_can_run_a_plan_on_a_server(server_url):
    import json
    import subprocess

    from conftest import SHOAL

    def plan_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([SHOAL, "plan", "run", *args, "--url", server_url], capture_output=True, text=True,
                              timeout=120)

    done = plan_run("best_of_n", "--request", '{"prompt": "Hello"}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["candidates"][0]["text"]
    missing = plan_run("best_of_n", "--request", "{}")
    assert missing.returncode == 2 and "missing required field: prompt" in missing.stderr
