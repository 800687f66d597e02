"""Pipelines of stage workers on this machine: per-token decode latency and throughput with the model whole on
one worker and split into routes of 1, 2 and 3 stages, the cost of one extra hop, and how a 3-stage route's
throughput at 16 concurrent sequences compares with one whole-model worker's.

Everything runs as real subprocesses on 127.0.0.1: one `shoal serve --no-local-worker` coordinator, and for
each configuration its `shoal worker` processes (with `--layers START:END` for stages), killed before the next.
Requests go through the OpenAI-compatible /v1/completions (temperature 0, ignore_eos, fixed max_tokens).
ms_per_token is decode only: the median gap between a streamed sequence's tokens, over a few sequences.
hop_overhead_ms comes from both demo routes served at once under two model names, their requests alternated,
so that the machine's drift between one configuration and the next does not count.
Models: the demo model (4 layers) and a random 12-layer llama (hidden 512) that
speaks the demo tokenizer. Prints one JSON object; progress goes to stderr.
Every worker runs with --threads 1 (the processes share 2 cores; idle math threads would spin on them).
With --relay, the paired measurement also serves a third route, the 3-stage one with every stage started
--no-push (the coordinator relays each hop's output), alternated with the other two: hop_overhead_ms_relayed.
Usage: python bench/pipeline.py [--quick] [--relay]   (--quick: demo model only, fewer tokens; about a minute)
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import make_hf_model, save_hf_model, start_server, start_worker, wait_workers

from shoal.model import DEMO_PATH

TOKEN = "bench-token"
PROMPT = "Once upon a time"
CONCURRENT = 16
DEMO_SPLITS = {"whole": None, "1_stage": ["0:4"], "2_stages": ["0:2", "2:4"], "3_stages": ["0:1", "1:3", "3:4"]}
BIG_SPLITS = {"whole": None, "2_stages": ["0:6", "6:12"], "3_stages": ["0:4", "4:8", "8:12"]}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def big_model(path: Path) -> Path:
    """A random 12-layer llama with the demo model's vocabulary and tokenizer files."""
    vocab = json.loads((DEMO_PATH / "config.json").read_text())["vocab_size"]
    model = make_hf_model("llama", num_hidden_layers=12, hidden_size=512, intermediate_size=1376,
                          num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=1024)
    save_hf_model(model, path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(DEMO_PATH / name, path / name)
    return path


def body(model: str, prompt: str, tokens: int, stream: bool) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}


async def streamed(http: httpx.AsyncClient, model: str, tokens: int, snapshot: list | None = None) -> dict:
    """One streamed sequence: seconds to the first token, to the last chunk, and tokens generated; with `snapshot`,
    /v1/workers as seen after the first token is appended to it."""
    started, first, last, used, gaps = time.perf_counter(), None, None, 0, []
    async with http.stream("POST", "/v1/completions", json=body(model, PROMPT, tokens, True)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk, now = json.loads(line.removeprefix("data: ")), time.perf_counter()
            if "error" in chunk:
                raise RuntimeError(f"generation failed: {chunk['error']}")
            if chunk["choices"] and first is None:
                first = now
                if snapshot is not None:
                    snapshot.append((await http.get("/v1/workers")).json())
            if chunk["choices"]:
                if last is not None:
                    gaps.append(now - last)
                last = now
            used = (chunk.get("usage") or {}).get("completion_tokens", used)
    if first is None or used < 2:
        raise RuntimeError(f"a streamed request gave {used} tokens")
    return {"ttft_s": first - started, "total_s": last - started, "tokens": used, "gaps": gaps}


async def latency(url: str, model: str, tokens: int, reps: int) -> dict:
    """Decode ms per token (the median gap between streamed tokens, so a stray pause elsewhere on the machine
    does not count) and single-sequence tok/s over `reps` sequential streamed requests."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        runs = [await streamed(http, model, tokens) for _ in range(reps)]
    ms = 1000 * statistics.median(gap for r in runs for gap in r["gaps"])
    tok_s = statistics.median(r["tokens"] / r["total_s"] for r in runs)
    return {"ms_per_token": round(ms, 3), "tok_s_1_seq": round(tok_s, 1),
            "ttft_ms": round(1000 * statistics.median(r["ttft_s"] for r in runs), 1)}


async def throughput(url: str, model: str, tokens: int) -> float:
    """Tokens/s of CONCURRENT non-streamed sequences sent at once (the same prompts for every configuration)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def one(i: int) -> int:
            response = await http.post("/v1/completions", json=body(model, f"{PROMPT} {i}", tokens, False))
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        served = sum(await asyncio.gather(*(one(i) for i in range(CONCURRENT))))
        return served / (time.perf_counter() - started)


async def warm_up(url: str, model: str) -> list:
    """One short streamed request; returns the route it ran on, as "worker start:end" ([] for a whole-model worker)."""
    snapshot: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await streamed(http, model, 8, snapshot)
    return [f"{name} {start}:{end}" for name, start, end in next(iter(snapshot[0]["routes"].values()), [])]


def configuration(url: str, model: str, path: Path, layers: list[str] | None, args: argparse.Namespace) -> dict:
    """Start the configuration's workers, wait for them, warm up, measure, kill them and wait until they are gone."""
    kind, n = ("stages", len(layers)) if layers else ("workers", 1)
    # Up to 4 model processes share 2 cores: one math thread each, or idle threads spin on the busy one's cores.
    extra = ["--model", str(path), "--model-name", model, "--kv-cache-mb", "64", "--threads", "1"]
    workers = [start_worker(url, f"{model}-{i}", TOKEN, *extra, *(["--layers", r] if r else []))
               for i, r in enumerate(layers or [None])]
    try:
        wait_workers(url, n, timeout=180, kind=kind)
        out = {"layers": layers or "whole-model worker", "route": asyncio.run(warm_up(url, model))}
        out |= asyncio.run(latency(url, model, args.tokens, args.reps))
        out[f"tok_s_{CONCURRENT}_seq"] = round(asyncio.run(throughput(url, model, args.tokens)), 1)
    finally:
        for w in workers:
            w.kill()
            w.wait()
            w.log_path.unlink(missing_ok=True)
    wait_workers(url, 0, timeout=60, kind=kind)
    return out


def paired_hops(url: str, args: argparse.Namespace) -> dict:
    """The hop overhead from the demo model served twice at once, as a 1-stage route and as a 3-stage route
    (two model names, same weights), with their requests alternated: each pair is measured under the same
    conditions, so the machine's drift between configurations does not count."""
    extra = ["--model", str(DEMO_PATH), "--kv-cache-mb", "64", "--threads", "1"]
    splits = {"demo-route1": DEMO_SPLITS["1_stage"], "demo-route3": DEMO_SPLITS["3_stages"]}
    if args.relay:
        splits["demo-route3-relay"] = DEMO_SPLITS["3_stages"]
    workers = [start_worker(url, f"{name}-{i}", TOKEN, *extra, "--model-name", name, "--layers", layers,
                            *(["--no-push"] if name.endswith("relay") else []))
               for name, split in splits.items() for i, layers in enumerate(split)]
    try:
        wait_workers(url, len(workers), timeout=180, kind="stages")

        async def rounds() -> dict[str, list[float]]:
            async with httpx.AsyncClient(base_url=url, timeout=600) as http:
                for name in splits:
                    await streamed(http, name, 8)
                hops: dict[str, list[float]] = {name: [] for name in splits if name != "demo-route1"}
                for _ in range(args.pairs):
                    one = statistics.median((await streamed(http, "demo-route1", args.tokens))["gaps"])
                    for name, each in hops.items():
                        three = statistics.median((await streamed(http, name, args.tokens))["gaps"])
                        each.append(1000 * (three - one) / 2)
                return hops

        measured = asyncio.run(rounds())
        hops = measured["demo-route3"]
    finally:
        for w in workers:
            w.kill()
            w.wait()
            w.log_path.unlink(missing_ok=True)
    wait_workers(url, 0, timeout=60, kind="stages")
    out = {"pairs": len(hops), "hop_ms_each_pair": [round(h, 3) for h in hops],
           "hop_overhead_ms": round(statistics.median(hops), 3)}
    if args.relay:
        relayed = measured["demo-route3-relay"]
        out |= {"hop_ms_each_pair_relayed": [round(h, 3) for h in relayed],
                "hop_overhead_ms_relayed": round(statistics.median(relayed), 3)}
    return out


def measure(url: str, model: str, path: Path, splits: dict, args: argparse.Namespace) -> dict:
    results = {}
    for label, layers in splits.items():
        say(f"{model}: {label} ({layers or 'whole model'}) ...")
        results[label] = configuration(url, model, path, layers, args)
        say(f"  {results[label]}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="demo model only, fewer tokens and repeats")
    parser.add_argument("--relay", action="store_true", help="also measure the hop with the coordinator relaying "
                        "every hop's output (stages started --no-push), alternated with the pushed route")
    args = parser.parse_args()
    args.tokens, args.reps, args.pairs = (24, 2, 5) if args.quick else (64, 3, 15)
    started = time.perf_counter()
    url, proc = start_server("--no-local-worker", "--worker-token", TOKEN, "--rpm", "0", "--streams", "0",
                             "--tpm", "0", "--private", ready=("ok", "no_workers"))
    try:
        with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
            demo = measure(url, "demo", DEMO_PATH, DEMO_SPLITS, args)
            say("demo: 1-stage and 3-stage routes side by side, alternated ...")
            paired = paired_hops(url, args)
            models = {"demo": demo}
            if not args.quick:
                say("building the 12-layer random model ...")
                models["big-12-layer"] = measure(url, "big", big_model(Path(tmp)), BIG_SPLITS, args)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.log_path.unlink(missing_ok=True)
    hop = paired["hop_overhead_ms"]
    report = {
        "quick": args.quick, "cores": os.cpu_count(), "max_tokens": args.tokens, "latency_repeats": args.reps,
        "concurrent": CONCURRENT,
        "models": models,
        "hop_overhead_definition": "demo model: (decode ms/token of the 3-stage route 0:1,1:3,3:4 - that of a "
                                   "1-stage route --layers 0:4) / 2 extra hops, the median over pairs of requests "
                                   "alternated between the two routes served at once; a whole-model worker is not a "
                                   "route and is reported beside it",
        "hop_pairs": paired,
        "ms_per_token_demo_whole_worker": demo["whole"]["ms_per_token"],
        "ms_per_token_demo_1_stage_route": demo["1_stage"]["ms_per_token"],
        "ms_per_token_demo_3_stage_route": demo["3_stages"]["ms_per_token"],
        "hop_overhead_ms": hop, "hop_overhead_target_ms": 1.0, "meets_target": hop <= 1.0,
        f"throughput_ratio_3_stages_{CONCURRENT}_seq": round(
            demo["3_stages"][f"tok_s_{CONCURRENT}_seq"] / demo["whole"][f"tok_s_{CONCURRENT}_seq"], 3),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
