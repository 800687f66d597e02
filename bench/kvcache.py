"""The prefix KV cache's disk tier: time to first token from disk, save throughput, and what save points cost.

For each model, one prompt (max_tokens=1, temperature 0) is timed three ways, each in an engine that has
already run a short warm-up request:
- cold: a fresh engine process whose disk tier starts empty;
- ram_hit: the same engine, the same prompt again (an exact hit from the RAM prefix cache);
- disk_hit: a NEW engine process on the same disk directory, so RAM is empty and the prefix comes from the
  row the first process saved (checked: cache_hit_kind exact and snapshot()["kv_disk"]["hits_disk"] + 1).
TTFT is wall time from submit to the first token's event (`ttft_ms`); the engine's own queue + prefill ms,
which include the disk load, are reported too (`engine_ttft_ms`). Several different prompts are timed and
the medians kept. disk_hit_speedup = cold / disk_hit (target 5). Rows are read back right after they were
written, so "disk" here is the OS page cache: the read is not from a cold device.

A prompt of n tokens can hit exactly only if its first n - 1 tokens are cached; the disk tier resumes
block-aligned (16-token) prefixes, so prompts are 16k + 1 tokens long: 497 on the demo model (context 512,
the longest such prompt that fits) and 2,049 on a random model shaped like Qwen2-0.5B (a 2,048-token
prefix and one token more). The demo also times a 496-token prompt to show what an unaligned one gets.

save_mb_s: bytes published / seconds spent publishing (encode, checksum, write, fsync, link) over the saves
of the first process. save_overhead (demo model, target < 0.05): 1 - decode tokens/s with the disk tier on
(continued_every=64, so every run makes a `cold`, four `continued` and a `finish` save) over tokens/s
without it, 256 new tokens after a 128-token prompt, both engines in this process on one loaded model, runs
alternated (off, on, on, off, ...) after one discarded run each, and medians kept. Each run has a fresh prompt,
so every save is new, and the next run starts only once the writer has landed the last one. Run-to-run noise
on a small shared machine can be larger than the target, so the cost is also accounted for directly:
model_thread_save_share (time the engine's model thread spent in its save points, which stalls every
sequence, over the run's time) and writer_share_of_run (the writer thread's publishing time over the run's
time: a bound on what it can take from decode by competing for cores).

Everything runs on the CPU-or-GPU default of `load_model`; on 2 cores the full run takes a few minutes and
--quick (demo model only, fewer repeats) well under a minute. Prints one JSON object; progress on stderr.
Usage: python bench/kvcache.py [--quick]
"""

import argparse
import asyncio
import gc
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from shoal.engine import Engine, EngineConfig, SamplingParams
from shoal.model import DEMO_PATH, load_model
from shoal.model.kv import BLOCK_SIZE
from shoal.model.tokenizer import Tokenizer

TARGET_SPEEDUP, TARGET_OVERHEAD = 5, 0.05
FULL = dict(demo_prompts=3, qwen_prompts=2, overhead_repeats=15, new_tokens=256)
QUICK = dict(demo_prompts=3, qwen_prompts=0, overhead_repeats=6, new_tokens=256)
WARM_UP = 32  # tokens: under save_min_tokens, so the warm-up request saves nothing
STARTED = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def random_prompt(vocab: int, length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


# one engine process: time requests, report the disk tier's counters --------------------------------------------

async def timed(engine: Engine, prompt: list[int]) -> dict:
    """One max_tokens=1 request: wall TTFT, the engine's own view of it, how the cache served it."""
    hits = engine.snapshot()["kv_disk"].get("hits_disk", 0)
    started = time.perf_counter()
    stream = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    first, ids = None, []
    async for event in stream:
        if event.token_ids and first is None:
            first = time.perf_counter() - started
        ids += event.token_ids
    stats = stream.stats
    assert stats is not None and first is not None, stats
    return {"ttft_ms": round(1000 * first, 2), "engine_ttft_ms": round(stats.queue_ms + stats.prefill_ms, 2),
            "cache_hit_kind": stats.cache_hit_kind, "cached_tokens": stats.cache_delta["read"],
            "prompt_tokens": len(prompt), "hits_disk_delta": engine.snapshot()["kv_disk"].get("hits_disk", 0) - hits,
            "ids": ids}


async def child(spec: dict) -> dict:
    started = time.perf_counter()
    engine = Engine.from_dir(spec["path"], EngineConfig(kv_disk_dir=spec["disk"], **spec["config"]))
    loaded = time.perf_counter() - started
    try:
        await timed(engine, random_prompt(engine.model.config.vocab_size, WARM_UP, seed=10**6))
        results = {}
        for label, prompt in spec["requests"]:
            results[label] = await timed(engine, prompt)
    finally:
        engine.close()  # lets the queued saves land
    assert engine.saver is not None
    return {"load_s": round(loaded, 2), "requests": results, "kv_disk": engine.saver.stats()}


def run_child(path: Path, disk: Path, config: dict, requests: list[tuple[str, list[int]]]) -> dict:
    spec = {"path": str(path), "disk": str(disk), "config": config, "requests": requests}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"engine process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# TTFT: cold, RAM hit, disk hit ---------------------------------------------------------------------------------

def median_of(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 2)


def summary(runs: list[dict]) -> dict:
    return {"ttft_ms": median_of(runs, "ttft_ms"), "engine_ttft_ms": median_of(runs, "engine_ttft_ms"),
            "ttft_ms_runs": [r["ttft_ms"] for r in runs],
            "cache_hit_kinds": sorted({r["cache_hit_kind"] for r in runs}),
            "cached_tokens": sorted({r["cached_tokens"] for r in runs}),
            "hits_disk_delta": sorted({r["hits_disk_delta"] for r in runs})}


def mb_per_s(stats: dict, kind: str) -> float | None:
    seconds = stats[f"{kind}_seconds"]
    return round(stats[f"{kind}_bytes"] / seconds / 1e6, 1) if seconds else None


def ttft_section(path: Path, disk: Path, config: dict, prompt_len: int, n_prompts: int,
                 unaligned: int | None = None) -> dict:
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = {f"p{i}": random_prompt(vocab, prompt_len, seed=i) for i in range(n_prompts)}
    if unaligned:
        prompts["unaligned"] = random_prompt(vocab, unaligned, seed=100)
    progress(f"{path.name}: cold + RAM hit of {n_prompts} x {prompt_len} tokens in a fresh engine process")
    first = run_child(path, disk, config, [(f"{kind}/{name}", p) for name, p in prompts.items()
                                           for kind in ("cold", "ram_hit")])
    progress(f"{path.name}: disk hit in a new engine process (load {first['load_s']} s in the first)")
    second = run_child(path, disk, config, [(f"disk_hit/{name}", p) for name, p in prompts.items()])
    runs = {**first["requests"], **second["requests"]}
    by_kind = {kind: [runs[f"{kind}/p{i}"] for i in range(n_prompts)] for kind in ("cold", "ram_hit", "disk_hit")}
    cached = prompt_len - 1
    checks = {
        "cold_is_cold": all(r["cache_hit_kind"] == "cold" and r["cached_tokens"] == 0 for r in by_kind["cold"]),
        "ram_hit_is_exact_from_ram": all(r["cache_hit_kind"] == "exact" and r["cached_tokens"] == cached
                                         and r["hits_disk_delta"] == 0 for r in by_kind["ram_hit"]),
        "disk_hit_is_exact_from_disk": all(r["cache_hit_kind"] == "exact" and r["cached_tokens"] == cached
                                           and r["hits_disk_delta"] == 1 for r in by_kind["disk_hit"]),
        "same_token_all_three": all(runs[f"cold/p{i}"]["ids"] == runs[f"ram_hit/p{i}"]["ids"]
                                    == runs[f"disk_hit/p{i}"]["ids"] for i in range(n_prompts)),
    }
    cold, disk_hit = summary(by_kind["cold"]), summary(by_kind["disk_hit"])
    speedup = cold["ttft_ms"] / disk_hit["ttft_ms"]
    saved, loaded = first["kv_disk"], second["kv_disk"]
    report = {
        "prompt_tokens": prompt_len, "prompts": n_prompts, "config": config,
        "cold": cold, "ram_hit": summary(by_kind["ram_hit"]), "disk_hit": disk_hit,
        "disk_hit_speedup": round(speedup, 2), "target": TARGET_SPEEDUP, "meets_target": speedup >= TARGET_SPEEDUP,
        "engine_disk_hit_speedup": round(cold["engine_ttft_ms"] / disk_hit["engine_ttft_ms"], 2),
        "ram_hit_speedup": round(cold["ttft_ms"] / summary(by_kind["ram_hit"])["ttft_ms"], 2),
        "checks": checks, "checks_ok": all(checks.values()),
        "save_mb_s": mb_per_s(saved, "save"), "load_mb_s": mb_per_s(loaded, "load"),
        "saves": {k: v for k, v in saved.items() if k.startswith("saves_") or k in ("save_bytes", "rows")},
        "save_seconds": round(saved["save_seconds"], 3),
        "row_mb": round(saved["bytes"] / max(saved["rows"], 1) / 1e6, 2),
        "loads": loaded["loads"], "hits_disk": loaded.get("hits_disk", 0),
        "save_errors": saved["save_errors"], "saves_dropped": saved.get("saves_dropped", 0),
        "load_s_per_process": [first["load_s"], second["load_s"]],
    }
    if unaligned:
        ram, disk_run = runs["ram_hit/unaligned"], runs["disk_hit/unaligned"]
        report["unaligned_prompt"] = {
            "prompt_tokens": unaligned,
            "ram_hit": {"cache_hit_kind": ram["cache_hit_kind"], "cached_tokens": ram["cached_tokens"]},
            "disk_hit": {"cache_hit_kind": disk_run["cache_hit_kind"], "cached_tokens": disk_run["cached_tokens"],
                         "hits_disk_delta": disk_run["hits_disk_delta"], "ttft_ms": disk_run["ttft_ms"]},
            "cold_ttft_ms": runs["cold/unaligned"]["ttft_ms"],
        }
    return report


# save points against decode throughput -------------------------------------------------------------------------

async def decode(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s from the first token's event to the last's, tokens/s from submit to the final event)."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    started = time.perf_counter()
    times = [time.perf_counter() async for event in engine.submit(prompt, params) if event.token_ids]
    ended = time.perf_counter()
    assert len(times) == new_tokens
    return (new_tokens - 1) / (times[-1] - times[0]), new_tokens / (ended - started)


def settle(engine: Engine, timeout: float = 30.0) -> None:
    """Wait for the writer to land every queued save, so none of it runs into the next measured run."""
    saver, deadline = engine.saver, time.monotonic() + timeout
    assert saver is not None
    while (saver.stats()["save_queue"] or saver._inflight) and time.monotonic() < deadline:
        time.sleep(0.002)


def time_save_points(engine: Engine) -> list[float]:
    """Wrap the engine's save points so the seconds its model thread spends in them add up in the returned list."""
    saver, spent = engine.saver, [0.0]
    assert saver is not None

    def clocked(call):
        def timed_call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started
        return timed_call

    saver.after_token, saver.finish = clocked(saver.after_token), clocked(saver.finish)
    return spent


def save_overhead(path: Path, disk: Path, repeats: int, new_tokens: int, prompt_len: int = 128,
                  every: int = 64) -> dict:
    model, tokenizer = load_model(path), Tokenizer.from_dir(path)
    vocab = model.config.vocab_size
    engines = {"off": Engine(model, tokenizer, EngineConfig(kv_cache_mb=64)),
               "on": Engine(model, tokenizer, EngineConfig(kv_cache_mb=64, kv_disk_dir=str(disk),
                                                           continued_every=every))}
    runs: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    seeds = iter(range(1000, 2000))
    spent, model_thread = time_save_points(engines["on"]), []
    try:
        for engine in engines.values():  # a whole run each, discarded
            asyncio.run(decode(engine, random_prompt(vocab, prompt_len, next(seeds)), new_tokens))
        settle(engines["on"])
        spent[0], base = 0.0, engines["on"].saver.stats()
        for i in range(repeats):
            for arm in ("off", "on") if i % 2 == 0 else ("on", "off"):
                gc.collect()
                before = spent[0]
                runs[arm].append(asyncio.run(decode(engines[arm], random_prompt(vocab, prompt_len, next(seeds)),
                                                    new_tokens)))
                if arm == "on":
                    model_thread.append(spent[0] - before)
                    settle(engines[arm])
            progress(f"save overhead: repeat {i + 1}/{repeats}: off {runs['off'][-1][0]:.1f}, "
                     f"on {runs['on'][-1][0]:.1f} tokens/s")
        stats = {k: v - base.get(k, 0) for k, v in engines["on"].saver.stats().items()}
    finally:
        for engine in engines.values():
            engine.close()
    off, on = (statistics.median(r[0] for r in runs[arm]) for arm in ("off", "on"))
    off_e2e, on_e2e = (statistics.median(r[1] for r in runs[arm]) for arm in ("off", "on"))
    overhead = 1 - on / off
    paired = [1 - b[0] / a[0] for a, b in zip(runs["off"], runs["on"], strict=True)]
    run_s = statistics.median(new_tokens / r[1] for r in runs["on"])
    return {
        "prompt_tokens": prompt_len, "new_tokens": new_tokens, "continued_every": every, "repeats": repeats,
        "decode_tok_s_without_disk": round(off, 2), "decode_tok_s_with_disk": round(on, 2),
        "runs_tok_s_without_disk": [round(r[0], 1) for r in runs["off"]],
        "runs_tok_s_with_disk": [round(r[0], 1) for r in runs["on"]],
        "save_overhead": round(overhead, 4), "target": TARGET_OVERHEAD, "meets_target": overhead < TARGET_OVERHEAD,
        "save_overhead_end_to_end": round(1 - on_e2e / off_e2e, 4),
        "save_overhead_paired": {"median": round(statistics.median(paired), 4), "min": round(min(paired), 4),
                                 "max": round(max(paired), 4)},
        "noise_without_disk": round((max(r[0] for r in runs["off"]) - min(r[0] for r in runs["off"])) / off, 4),
        "model_thread_save_ms_per_run": round(1000 * statistics.median(model_thread), 2),
        "model_thread_save_share": round(statistics.median(model_thread) / run_s, 4),
        "writer_seconds_per_run": round(stats["save_seconds"] / repeats, 4),
        "writer_share_of_run": round(stats["save_seconds"] / repeats / run_s, 4),
        "saves_per_run": {k.removeprefix("saves_"): round(v / repeats, 2) for k, v in stats.items()
                          if k.startswith("saves_") and v},
        "save_mb_s": mb_per_s(stats, "save"), "save_errors": stats["save_errors"],
    }


# the run ---------------------------------------------------------------------------------------------------------

def qwen_dir(tmp: Path) -> Path:
    from model import random_qwen  # bench/model.py; imported here so engine processes need no transformers

    path = random_qwen(tmp / "qwen-0.5b-random")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_PATH / name, path / name)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="demo model only, fewer repeats (under a minute)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one engine process, spec as JSON
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(json.loads(args.child)))))
        return
    setup = QUICK if args.quick else FULL
    report = {"mode": "quick" if args.quick else "full", "threads": torch.get_num_threads(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "block_size": BLOCK_SIZE,
              "disk_note": "rows are read back right after being written: the page cache, not a cold device"}
    with tempfile.TemporaryDirectory(prefix="shoal-kvbench-") as tmp_name:
        tmp = Path(tmp_name)
        demo_context = json.loads((DEMO_PATH / "config.json").read_text())["max_position_embeddings"]
        demo_len = (demo_context - 2) // BLOCK_SIZE * BLOCK_SIZE + 1  # room for the one new token
        report["demo"] = ttft_section(DEMO_PATH, tmp / "disk-demo", {"kv_cache_mb": 64}, demo_len,
                                      setup["demo_prompts"], unaligned=demo_len - 1)
        report["demo"]["prompt_note"] = (f"the model's context is {demo_context} tokens: {demo_len} is the longest "
                                         "prompt of 16k + 1 tokens that fits with one new token")
        progress("demo: save overhead on decode")
        report["save_overhead"] = {"model": "demo", **save_overhead(DEMO_PATH, tmp / "disk-overhead",
                                                                    setup["overhead_repeats"], setup["new_tokens"])}
        if setup["qwen_prompts"]:
            progress("building a random Qwen2-0.5B-shaped model")
            path = qwen_dir(tmp)
            report["qwen_0_5b_random"] = ttft_section(path, tmp / "disk-qwen", {"kv_cache_mb": 512},
                                                      2 * 1024 + 1, setup["qwen_prompts"])
            report["qwen_0_5b_random"]["prompt_note"] = "a 2,048-token prefix and one token more, so 2,048 can hit"
        else:
            report["qwen_0_5b_random"] = "skipped in --quick"
    summary_keys = {"demo_disk_hit_speedup": report["demo"]["disk_hit_speedup"],
                    "save_overhead": report["save_overhead"]["save_overhead"],
                    "save_overhead_paired_median": report["save_overhead"]["save_overhead_paired"]["median"],
                    "model_thread_save_share": report["save_overhead"]["model_thread_save_share"],
                    "writer_share_of_run": report["save_overhead"]["writer_share_of_run"],
                    "demo_save_mb_s": report["demo"]["save_mb_s"], "demo_checks_ok": report["demo"]["checks_ok"]}
    if isinstance(report["qwen_0_5b_random"], dict):
        summary_keys["qwen_0_5b_disk_hit_speedup"] = report["qwen_0_5b_random"]["disk_hit_speedup"]
        summary_keys["qwen_0_5b_save_mb_s"] = report["qwen_0_5b_random"]["save_mb_s"]
        summary_keys["qwen_0_5b_checks_ok"] = report["qwen_0_5b_random"]["checks_ok"]
    progress(f"done: {summary_keys}")
    print(json.dumps({**report, "summary": summary_keys}, indent=2))


if __name__ == "__main__":
    main()
