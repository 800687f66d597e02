"""DAG plans (seed 004): complex_dag's throughput and latency, the scheduler's own cost per node, and whether
the plan's two branches overlap when every Redis round trip is slow.

Everything runs in this process against a private `redis-server` (a free port, no persistence, killed at
exit) seeded with `shoal.plans.demo.seed`; one event loop, one `Plans` (cpu_threads 4) for every run.
- plans_per_s: complex_dag from C concurrent tasks (C = 1, 16, 64) for a fixed time after a warm-up; plans/s
  and p50/p99 latency. The baseline, measured in the same run, is a hand-written redis.asyncio version of
  the same 7 round trips at concurrency 1 (HGETALL user:123, then per branch, the two branches gathered as
  the plan overlaps them: a pipeline of LRANGE follow:123, a pipeline of HGETALL user:x for the ids, a
  pipeline of LRANGE media:x; then score = id * 0.1, sort, take 50 in plain Python), checked to give the
  same candidates. plan_over_direct = the plan's p50 latency / the direct p50 latency at concurrency 1.
- scheduler_overhead_us_per_node (target < 50): Executor.run on a synthetic plan of N trivial steps, as a
  chain and as a wide fan (one root, N - 2 leaves, one sink), with io steps (coroutines that return at once)
  and cpu steps (plain functions, run on the pool); the median time of a run minus the median time of calling
  the same functions in a plain loop (awaited for io, called inline for cpu), over N. The executor fuses a
  chain of cpu steps into one trip to the pool, so cpu_chain is a fused chain's cost per node; in the fan
  every cpu step is its own trip, so cpu_fan includes a thread-pool hop per node; `pool_hop_us` is that hop
  alone (await wrap_future(pool.submit) in a loop, no scheduler).
- wall_over_critical_path: complex_dag through an asyncio TCP proxy in front of Redis that holds every
  client-to-server chunk for D ms (per connection and direction, in order), so each round trip costs about D.
  The critical path is 4 round trips (viewer, follow's LRANGEs, follow's HGETALLs, media) and the nodes' round
  trips sum to 7; the CPU nodes take well under a millisecond (see the unproxied latency). A ratio near 1
  means the branches overlap; near 7/4 would mean they ran one after the other.

Figures are ratios against baselines measured in the same run. 2 cores: the full run takes about 20 s,
--quick under 10 s. Prints one JSON object; progress goes to stderr.
Usage: python bench/plans.py [--quick]
"""

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy
import redis
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import start_redis
from delay_proxy import DelayProxy

from shoal.plans import demo
from shoal.plans.context import Services
from shoal.plans.runtime import Plans
from shoal.plans.scheduler import Executor, Step

PLAN_DIR = Path(__file__).resolve().parent.parent / "artifacts" / "plans"
PLAN, BODY = "complex_dag", {"user_id": demo.VIEWER}
CONCURRENCY = (1, 16, 64)
CRITICAL_ROUND_TRIPS, ALL_ROUND_TRIPS = 4, 7
TARGET_US_PER_NODE = 50
FULL = dict(seconds=3.0, warm_up=0.5, nodes=200, sched_repeats=40, delay_ms=20.0, proxied_runs=7)
QUICK = dict(seconds=1.0, warm_up=0.25, nodes=200, sched_repeats=15, delay_ms=20.0, proxied_runs=3)
STARTED = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# the hand-written baseline ----------------------------------------------------------------------------------------

async def direct(client: aioredis.Redis, user: int) -> list[int]:
    """complex_dag by hand: the same 7 round trips (branches gathered), the same scores, order and cut."""
    await client.hgetall(f"user:{user}")  # the viewer row: the plan reads it too, and uses nothing of it here

    async def branch(relation: str) -> list[int]:
        pipe = client.pipeline(transaction=False)
        pipe.lrange(f"{relation}:{user}", 0, 99)
        ids = [int(x) for found in await pipe.execute() for x in found]
        pipe = client.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(f"user:{i}")
        await pipe.execute()  # hydration: countries, which complex_dag does not use further
        pipe = client.pipeline(transaction=False)
        for i in ids:
            pipe.lrange(f"media:{i}", 0, 99)
        return [int(x) for found in await pipe.execute() for x in found]

    followed, recommended = await asyncio.gather(branch("follow"), branch("recommendation"))
    rows = [(i, i * 0.1) for i in followed + recommended]
    rows.sort(key=lambda r: -r[1])  # stable, like the plan's sort
    return [i for i, _ in rows[:50]]


# load: C tasks for a fixed time -------------------------------------------------------------------------------

async def load(call, concurrency: int, seconds: float, warm_up: float) -> dict:
    """Run `call` back to back from `concurrency` tasks; the counts and latencies after the warm-up."""
    start = time.perf_counter()
    measure_from, stop = start + warm_up, start + warm_up + seconds
    latencies: list[float] = []

    async def worker() -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                return
            await call()
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - measure_from
    return {"concurrency": concurrency, "completed": len(latencies),
            "per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1000 * pct(latencies, 0.5), 3), "p99_ms": round(1000 * pct(latencies, 0.99), 3)}


# the scheduler's own cost ------------------------------------------------------------------------------------

async def io_step(inputs: list) -> int:
    return 0


def cpu_step(inputs: list) -> int:
    return 0


def synthetic(shape: str, n: int, io: bool) -> list[Step]:
    fn = io_step if io else cpu_step
    if shape == "chain":
        return [Step(f"s{i}", (f"s{i - 1}",) if i else (), io, fn) for i in range(n)]
    leaves = [f"s{i}" for i in range(1, n - 1)]
    return ([Step("s0", (), io, fn)] + [Step(leaf, ("s0",), io, fn) for leaf in leaves]
            + [Step(f"s{n - 1}", tuple(leaves), io, fn)])


async def plain(steps: list[Step]) -> None:
    """The same functions with the same inputs, called one after another with no scheduler."""
    results: dict[str, int] = {}
    for s in steps:
        inputs = [results[d] for d in s.deps]
        results[s.node_id] = await s.fn(inputs) if s.io else s.fn(inputs)


async def pool_hops(pool: ThreadPoolExecutor, steps: list[Step]) -> None:
    for s in steps:
        await asyncio.wrap_future(pool.submit(s.fn, []))


async def scheduler_overhead(executor: Executor, n: int, repeats: int) -> dict:
    out = {}
    for io in (True, False):
        kind = "io" if io else "cpu"
        for shape in ("chain", "fan"):
            steps = synthetic(shape, n, io)
            outputs = [steps[-1].node_id]
            runs, bases = [], []
            for r in range(repeats + 2):  # alternated; the first two of each discarded
                t0 = time.perf_counter()
                await executor.run(steps, outputs)
                t1 = time.perf_counter()
                await plain(steps)
                t2 = time.perf_counter()
                if r >= 2:
                    runs.append(t1 - t0)
                    bases.append(t2 - t1)
            run_us, base_us = 1e6 * statistics.median(runs) / n, 1e6 * statistics.median(bases) / n
            out[f"{kind}_{shape}"] = {"us_per_node": round(run_us - base_us, 2),
                                      "executor_us_per_node": round(run_us, 2),
                                      "plain_loop_us_per_node": round(base_us, 2)}
    hops = []
    steps = synthetic("chain", n, False)
    for _ in range(repeats):
        t0 = time.perf_counter()
        await pool_hops(executor.pool, steps)
        hops.append(time.perf_counter() - t0)
    out["pool_hop_us"] = round(1e6 * statistics.median(hops) / n - out["cpu_chain"]["plain_loop_us_per_node"], 2)
    return out


async def overlap(redis_port: int, delay_ms: float, runs: int, unproxied_ms: float) -> dict:
    proxy = DelayProxy(redis_port, delay_ms / 1000)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    plans = Plans(PLAN_DIR, Services(redis_url=url))
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        async def timed(call) -> list[float]:
            for _ in range(2):  # warm-up: opens the connections both branches need
                await call()
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                await call()
                times.append(1000 * (time.perf_counter() - t0))
            return times

        plan_ms = await timed(lambda: plans.run(PLAN, BODY))
        direct_ms = await timed(lambda: direct(client, demo.VIEWER))
    finally:
        await plans.close()
        await client.aclose()
        proxy.close()
    wall, hand = statistics.median(plan_ms), statistics.median(direct_ms)
    critical, serial = CRITICAL_ROUND_TRIPS * delay_ms, ALL_ROUND_TRIPS * delay_ms
    return {"delay_ms_per_round_trip": delay_ms, "runs": runs,
            "wall_ms": round(wall, 2), "wall_ms_all": [round(t, 2) for t in plan_ms],
            "critical_path_ms": critical, "critical_path_round_trips": CRITICAL_ROUND_TRIPS,
            "sum_of_round_trips_ms": serial, "all_round_trips": ALL_ROUND_TRIPS,
            "unproxied_plan_p50_ms": unproxied_ms,
            "direct_wall_ms": round(hand, 2),
            "wall_over_critical_path": round(wall / critical, 3),
            "wall_over_sum_of_round_trips": round(wall / serial, 3),
            "direct_wall_over_critical_path": round(hand / critical, 3)}


# ---------------------------------------------------------------------------------------------------------------

async def bench(url: str, redis_port: int, p: dict) -> dict:
    progress(f"seeding {url} ...")
    keys = await demo.seed(url)
    plans = Plans(PLAN_DIR, Services(redis_url=url))
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        got = [r["id"] for r in (await plans.run(PLAN, BODY))["candidates"]]
        hand = await direct(client, demo.VIEWER)
        if got != hand:
            raise RuntimeError(f"the plan and the direct baseline disagree: {got} vs {hand}")
        progress(f"{PLAN}: {len(got)} candidates, the same as the direct baseline")

        progress("direct redis.asyncio baseline, concurrency 1 ...")
        baseline = await load(lambda: direct(client, demo.VIEWER), 1, p["seconds"], p["warm_up"])
        progress(f"  {baseline}")
        loads = {}
        for c in CONCURRENCY:
            progress(f"{PLAN}, concurrency {c} ...")
            loads[str(c)] = await load(lambda: plans.run(PLAN, BODY), c, p["seconds"], p["warm_up"])
            progress(f"  {loads[str(c)]}")

        progress(f"scheduler overhead: {p['nodes']} trivial steps x {p['sched_repeats']} ...")
        sched = await scheduler_overhead(plans.executor, p["nodes"], p["sched_repeats"])
        progress(f"  {sched}")
    finally:
        await plans.close()
        await client.aclose()

    progress(f"through a proxy adding {p['delay_ms']} ms per round trip ...")
    prox = await overlap(redis_port, p["delay_ms"], p["proxied_runs"], loads["1"]["p50_ms"])
    progress(f"  wall {prox['wall_ms']} ms, critical path {prox['critical_path_ms']} ms")

    worst = max(v["us_per_node"] for k, v in sched.items() if k != "pool_hop_us")
    return {
        "plan": PLAN, "candidates": len(got), "seeded_keys": keys,
        "plans_per_s": {c: v["per_s"] for c, v in loads.items()},
        "latency_ms": {c: {"p50": v["p50_ms"], "p99": v["p99_ms"]} for c, v in loads.items()},
        "load": loads,
        "direct_baseline": {"how": "redis.asyncio, concurrency 1: HGETALL viewer, then the two branches gathered "
                                   "(LRANGE pipeline, HGETALL pipeline, media LRANGE pipeline each), then score, "
                                   "sort, take in Python: the same 7 round trips, 4 on the critical path",
                            **baseline},
        "plan_over_direct": round(loads["1"]["p50_ms"] / baseline["p50_ms"], 3),
        "plan_over_direct_throughput": round(baseline["per_s"] / loads["1"]["per_s"], 3),
        "scheduler_overhead_us_per_node": sched,
        "scheduler_overhead_target_us": TARGET_US_PER_NODE,
        "scheduler_meets_target": worst < TARGET_US_PER_NODE,
        "wall_over_critical_path": prox["wall_over_critical_path"],
        "proxied": prox,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1 s per load point, fewer scheduler repeats")
    args = parser.parse_args()
    p = QUICK if args.quick else FULL
    proc, url = start_redis()
    try:
        results = asyncio.run(bench(url, int(url.rsplit(":", 1)[1].split("/")[0]), p))
    finally:
        proc.kill()
        proc.wait()
    report = {"quick": args.quick, "device": "cpu", "python": platform.python_version(),
              "numpy": numpy.__version__, "redis_py": redis.__version__, "parameters": p,
              "concurrency": list(CONCURRENCY), "cpu_threads": 4, **results,
              "wall_s": round(time.perf_counter() - STARTED, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
