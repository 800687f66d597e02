"""Plans (seed 004) end to end: compiled by the CLI, run against a real redis-server loaded by seed-demo."""

import asyncio
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import SHOAL, start_server
from delay_proxy import DelayProxy

ROOT = Path(__file__).parents[1]
PLANS = ROOT / "artifacts" / "plans"
FOLLOWS, RECOMMENDED = [101, 102, 103, 104], [201, 202, 203, 204]
EXPECTED = sorted((u * 10 + k for u in FOLLOWS + RECOMMENDED for k in (1, 2)), reverse=True)


def shoal(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SHOAL, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def demo(redis_url):
    done = shoal("plan", "seed-demo", "--redis", redis_url)
    assert done.returncode == 0, done.stderr
    return redis_url


def run(plan: str, request: dict, redis_url: str, times: int = 1, **limits) -> tuple[dict, int, float]:
    """Run a plan `times` times in this process, on one set of connections; (last answer, late completions,
    seconds the last run took)."""
    from shoal.plans.context import Services
    from shoal.plans.runtime import Plans
    from shoal.plans.scheduler import NodeError

    async def go() -> tuple[dict, int, float]:
        plans = Plans(PLANS, Services(redis_url=redis_url))
        try:
            for _ in range(times):
                started = time.perf_counter()
                answer = await plans.run(plan, request, **limits)
            return answer, 0, time.perf_counter() - started
        except NodeError as e:
            await plans.executor.drain()
            return {"error": str(e)}, plans.executor.late, 0.0
        finally:
            await plans.close()

    return asyncio.run(go())


def test_complex_dag_returns_the_demo_candidates_best_first(demo):
    done = shoal("plan", "run", "complex_dag", "--request", '{"user_id": 123, "request_id": "r1"}', "--redis", demo)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["request_id"] == "r1"
    assert [c["id"] for c in answer["candidates"]] == EXPECTED
    assert [c["score"] for c in answer["candidates"]] == pytest.approx([i * 0.1 for i in EXPECTED])
    weighted, *_ = run("complex_dag", {"user_id": 123, "param_overrides": {"weight": 2}}, demo)
    assert [c["score"] for c in weighted["candidates"]] == pytest.approx([i * 2.0 for i in EXPECTED])
    assert run("complex_dag", {"user_id": 9}, demo)[0]["candidates"] == []  # a user with no follows


def test_the_two_branches_overlap(demo):
    """50 ms a round trip: the critical path is 4 (viewer, follow + hydration, media), all nodes' sum 7."""
    proxy = DelayProxy(int(demo.rsplit(":", 1)[1].split("/")[0]), 0.05)
    try:
        answer, _, wall = run("complex_dag", {"user_id": 123}, f"redis://127.0.0.1:{proxy.port}/0", times=3)
    finally:
        proxy.close()
    assert [c["id"] for c in answer["candidates"]] == EXPECTED
    assert 0.2 <= wall < 0.3, f"wall {wall:.3f} s: the critical path is 0.2 s, the sum of the branches 0.35 s"


def test_a_deadline_answers_a_timeout_and_counts_the_late_result(demo):
    proxy = DelayProxy(int(demo.rsplit(":", 1)[1].split("/")[0]), 0.05)
    try:
        answer, late, _ = run("complex_dag", {"user_id": 123}, f"redis://127.0.0.1:{proxy.port}/0", deadline_ms=30)
        done = shoal("plan", "run", "complex_dag", "--request", '{"user_id": 123}', "--deadline-ms", "30",
                     "--redis", f"redis://127.0.0.1:{proxy.port}/0")
    finally:
        proxy.close()
    assert answer == {"error": "Node execution timeout"} and late == 1
    assert done.returncode == 1 and json.loads(done.stdout) == {"error": "Node execution timeout"}


def test_compiling_twice_gives_the_same_bytes_as_the_shipped_artifacts(tmp_path):
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "plans").glob("*.py"))
    for out in ("a", "b"):
        done = shoal("plan", "compile", *sources, "--out", str(tmp_path / out))
        assert done.returncode == 0, done.stderr
    for shipped in PLANS.glob("*.plan.json"):
        first = (tmp_path / "a" / shipped.name).read_bytes()
        assert first == (tmp_path / "b" / shipped.name).read_bytes() == shipped.read_bytes()
    assert len(list(PLANS.glob("*.plan.json"))) == len(sources) == 2
    listed = shoal("plan", "list", "--plan-dir", str(PLANS))
    assert [json.loads(line)["name"] for line in listed.stdout.splitlines()] == ["best_of_n", "complex_dag"]


def test_bad_requests_are_named(demo):
    from shoal.plans import PlanError

    for request, cause in [({}, "missing required field: user_id"), ({"user_id": 0}, "user_id must be"),
                           ({"user_id": 1, "colour": 2}, "unknown request field(s): colour"),
                           ({"user_id": 1, "param_overrides": {"nope": 1}}, "unknown param 'nope'"),
                           ({"user_id": 1, "param_overrides": {"weight": "x"}}, "param weight must be a float")]:
        with pytest.raises(PlanError, match=cause.replace("(", r"\(").replace(")", r"\)")):
            run("complex_dag", request, demo)
    done = shoal("plan", "run", "nope", "--request", '{"user_id": 1}', "--plan-dir", str(PLANS))
    assert done.returncode == 2 and "no plan 'nope'" in done.stderr


def test_a_failing_node_fails_the_request_with_its_cause(free_redis_url):
    answer, *_ = run("complex_dag", {"user_id": 123}, free_redis_url)
    assert answer["error"].startswith("node n0: redis endpoint redis.default:")


@pytest.fixture
def free_redis_url():
    from conftest import free_port

    return f"redis://127.0.0.1:{free_port()}/0"


def test_the_plan_api_runs_plans_and_counts_late_results(demo):
    proxy = DelayProxy(int(demo.rsplit(":", 1)[1].split("/")[0]), 0.05)
    url, proc = start_server("--no-local-worker", "--plan-dir", str(PLANS), "--redis",
                             f"redis://127.0.0.1:{proxy.port}/0", "--rpm", "0", ready=("ok", "no_workers"))
    try:
        assert httpx.get(f"{url}/v1/plans").json() == {"plans": ["best_of_n", "complex_dag"]}
        ok = httpx.post(f"{url}/v1/plans/complex_dag", json={"user_id": 123}, timeout=30)
        assert ok.status_code == 200 and [c["id"] for c in ok.json()["candidates"]] == EXPECTED
        late = httpx.post(f"{url}/v1/plans/complex_dag", json={"user_id": 123, "deadline_ms": 20}, timeout=30)
        assert late.status_code == 504 and late.json() == {"error": "Node execution timeout"}
        missing = httpx.post(f"{url}/v1/plans/nope", json={"user_id": 123})
        assert missing.status_code == 404 and "no plan 'nope'" in missing.json()["error"]["message"]
        bad = httpx.post(f"{url}/v1/plans/complex_dag", json={"user_id": "x"})
        assert bad.status_code == 400 and "user_id must be" in bad.json()["error"]["message"]
        deadline, metrics = time.monotonic() + 10, ""
        while "shoal_plan_late_completions_total 1.0" not in metrics and time.monotonic() < deadline:
            time.sleep(0.05)  # the late Redis reply lands about 50 ms after the answer
            metrics = httpx.get(f"{url}/metrics").text
        assert "shoal_plan_late_completions_total 1.0" in metrics
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proxy.close()
