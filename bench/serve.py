"""`shoal serve` under concurrent streaming clients, against the engine's own offline speed, same run.

For each concurrency: that many clients each stream one chat completion (64 tokens, ignore_eos)
from a live server on the demo model; then the same requests go straight into an in-process
Engine with the same number of math threads as `shoal serve` gives its own (one per core less
one). Prints one JSON object: TTFT and inter-token latency p50/p99, served tokens/s (counted from
each stream's usage), engine tokens/s and served_over_engine (the HTTP layer's cost, the client's
share of the cores included; 1.0 means none).
Usage: python bench/serve.py [--levels 1,8,32,128] [--tokens 64]
"""

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import start_server

from shoal.engine import Engine, EngineConfig, SamplingParams
from shoal.model import DEMO_PATH

QUESTIONS = ["What is 12 + 30?", "Capital of Peru?", "Spell apple.", "Reverse the word garden.", "Hello!"]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


async def client(http: httpx.AsyncClient, i: int, tokens: int) -> tuple[float, list[float], int]:
    """(TTFT, gaps between chunks, tokens) of one streamed request."""
    body = {"model": "demo", "messages": messages(i), "stream": True, "max_tokens": tokens, "ignore_eos": True,
            "temperature": 0.7, "seed": i, "stream_options": {"include_usage": True}}
    started, stamps, used = time.perf_counter(), [], 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                stamps.append(time.perf_counter())
            elif line.startswith('data: {') and '"usage"' in line:
                used = json.loads(line.removeprefix("data: "))["usage"]["completion_tokens"]
    return stamps[0] - started, [b - a for a, b in itertools.pairwise(stamps)], used


async def served(url: str, n: int, tokens: int) -> dict:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        results = await asyncio.gather(*(client(http, i, tokens) for i in range(n)))
        wall = time.perf_counter() - started
    ttft = sorted(r[0] for r in results)
    gaps = sorted(g for r in results for g in r[1])
    total = sum(r[2] for r in results)
    return {"ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(gaps, 50),
            "itl_p99_ms": pct(gaps, 99), "served_tok_s": round(total / wall, 1)}


async def offline(engine: Engine, n: int, tokens: int) -> float:
    started = time.perf_counter()
    streams = [engine.submit(messages(i), SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.7, seed=i))
               for i in range(n)]
    results = await asyncio.gather(*(s.result() for s in streams))
    return sum(len(r[1]) for r in results) / (time.perf_counter() - started)


def scheduling_p50(metrics: str) -> float:
    """The upper bound of the histogram bucket holding the median coordinator scheduling time."""
    prefix = 'shoal_request_stage_seconds_bucket{le="'
    buckets = [(float(line.split('"')[1]), float(line.split()[-1])) for line in metrics.splitlines()
               if line.startswith(prefix) and 'stage="scheduling"' in line]
    total = buckets[-1][1]
    return next(le for le, count in buckets if count >= total / 2) * 1000


def pct(values: list[float], p: float) -> float:
    if len(values) == 1:
        return round(values[0] * 1000, 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[p - 1] * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="1,8,32,128")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    url, proc = start_server("--rpm", "0", "--streams", "0", "--tpm", "0", "--private")
    torch.set_num_threads(max(1, torch.get_num_threads() - 1))  # as `shoal serve` sets its worker's
    engine = Engine.from_dir(DEMO_PATH, EngineConfig())
    report = {"model": "demo", "tokens_per_request": args.tokens, "engine_threads": torch.get_num_threads(),
              "levels": {}}
    try:
        asyncio.run(served(url, 2, 4))
        asyncio.run(offline(engine, 2, 4))
        for n in levels:
            level = asyncio.run(served(url, n, args.tokens))
            level["engine_tok_s"] = round(asyncio.run(offline(engine, n, args.tokens)), 1)
            level["served_over_engine"] = round(level["served_tok_s"] / level["engine_tok_s"], 3)
            report["levels"][n] = level
        report["scheduling_p50_ms_at_most"] = scheduling_p50(httpx.get(f"{url}/metrics").text)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        engine.close()
    report["served_over_engine_min"] = min(v["served_over_engine"] for v in report["levels"].values())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
