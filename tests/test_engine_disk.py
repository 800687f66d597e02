"""The prefix cache's disk tier through real engine processes: restarts, resumes, private mode."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import start_server

AUDITED = Path(__file__).with_name("audited_shoal.py")
RUN = """
import asyncio, json, sys
from shoal.engine import Engine, EngineConfig, SamplingParams
from shoal.model import DEMO_PATH

prompt, parent_key, disk = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]

async def main():
    engine = Engine.from_dir(DEMO_PATH, EngineConfig(kv_disk_dir=disk, kv_cache_mb=8, save_min_tokens=32))
    try:
        text, ids, stats = await engine.submit(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                                               parent_key=parent_key).result()
        print(json.dumps({"ids": ids, "stats": stats.to_dict(), "snapshot": engine.snapshot()}))
    finally:
        engine.close()

asyncio.run(main())
"""


def generate(prompt: list[int], disk: Path, parent_key: str | None = None) -> dict:
    """One request in a fresh engine process with its disk tier at `disk`."""
    out = subprocess.run([sys.executable, "-c", RUN, json.dumps(prompt), json.dumps(parent_key), str(disk)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_new_engine_process_gets_an_exact_hit_from_disk_and_the_same_output(tmp_path):
    prompt = list(range(10, 91))  # 81 tokens: 80 of them fill 5 blocks, the last is recomputed
    first = generate(prompt, tmp_path)
    assert first["stats"]["cache_hit_kind"] == "cold"
    second = generate(prompt, tmp_path)
    assert second["stats"]["cache_hit_kind"] == "exact" and second["stats"]["cache_delta"]["read"] == 80
    assert second["ids"] == first["ids"]
    assert second["snapshot"]["kv_disk"]["hits_disk"] == 1


def test_a_finished_context_resumes_from_disk_by_its_finish_key(tmp_path):
    prompt = list(range(10, 60))
    first = generate(prompt, tmp_path)
    context = prompt + first["ids"]
    follow_up = [*context, 5, 6, 7]
    resumed = generate(follow_up, tmp_path, parent_key=first["stats"]["finish_key"])
    assert resumed["stats"]["cache_delta"]["read"] == len(context) - 1  # all but the never-fed last token
    cold = generate(follow_up, tmp_path / "elsewhere")
    assert resumed["ids"] == cold["ids"]


def test_private_mode_writes_nothing_of_a_request_to_disk(tmp_path):
    from conftest import free_port

    disk, port = tmp_path / "kv", free_port()
    disk.mkdir()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen([sys.executable, str(AUDITED), "serve", "--private", "--kv-disk-dir", str(disk), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        serving = time.monotonic()  # torch probes the temp directory as it is imported: before any request
        body = {"model": "demo", "prompt": "x" * 400, "max_tokens": 8}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert list(disk.iterdir()) == []
    opened = [line for line in stderr.splitlines() if line.startswith("OPENED FOR WRITING")]
    assert [line for line in opened if float(line.split()[4].rstrip(":")) > serving] == []


def wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).json()["status"] == "ok":
                return
        except (httpx.HTTPError, ValueError):
            time.sleep(0.2)
    raise AssertionError("the audited server did not come up")


def test_the_disk_tier_is_counted_in_metrics(tmp_path):
    url, proc = start_server("--kv-disk-dir", str(tmp_path))
    try:
        body = {"model": "demo", "prompt": "x" * 400, "max_tokens": 8}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        deadline, metrics = time.monotonic() + 10, ""
        while 'shoal_kv_disk{stat="saves_finish"} 1.0' not in metrics and time.monotonic() < deadline:
            time.sleep(0.5)
            metrics = httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert 'shoal_kv_disk{stat="saves_finish"} 1.0' in metrics and 'shoal_kv_disk{stat="rows"}' in metrics
    assert list(tmp_path.glob("*/*.kv"))


def test_a_reclaimed_session_is_saved_as_evict_and_pinned_ones_at_shutdown(make_engine, tmp_path):
    """Only what is not on disk yet: here no finish save lands, as if the writer's queue had been full."""
    import asyncio

    from shoal.engine import SamplingParams

    engine = make_engine(kv_disk_dir=str(tmp_path), kv_cache_mb=2, save_min_tokens=16)  # 32 blocks of 16 tokens
    save = engine.saver.save
    engine.saver.save = lambda seq, n, reason, key=None, now=False: (
        None if reason == "finish" else save(seq, n, reason, key, now))
    engine.blocks.on_evict = None  # block reuse writes evicts too, as often as the clock allows: tested below
    params = SamplingParams(temperature=0, max_tokens=4)

    async def go() -> None:
        await engine.submit(list(range(10, 310)), params, session_id="a").result()  # pins 19 blocks
        await engine.submit(list(range(20, 320)), params).result()  # needs them back
        await engine.submit(list(range(30, 130)), params, session_id="b").result()

    asyncio.run(go())
    assert engine.snapshot()["kv_disk"]["saves_evict"] == 1
    engine.close()
    assert engine.saver.stats()["saves_shutdown"] == 1


def test_a_resume_that_ram_already_holds_reads_nothing_from_disk(make_engine, tmp_path):
    import asyncio

    from shoal.engine import SamplingParams

    engine = make_engine(kv_disk_dir=str(tmp_path), save_min_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def go() -> tuple:
        prompt = list(range(10, 110))
        _, ids, first = await engine.submit(prompt, params).result()
        return await engine.submit([*prompt, *ids, 5, 6], params, parent_key=first.finish_key).result()

    _, _, stats = asyncio.run(go())
    assert stats.cache_delta["read"] == 119 and engine.snapshot()["kv_disk"]["hits_disk"] == 0


def test_a_request_cut_short_in_prefill_saves_only_what_it_computed_under_its_own_key(make_engine, tmp_path):
    import asyncio

    from shoal.engine import SamplingParams

    engine = make_engine(kv_disk_dir=str(tmp_path), save_min_tokens=16, prefill_chunk_size=64)
    prompt = list(range(10, 410))

    async def go() -> None:
        stream = engine.submit(prompt, SamplingParams(max_tokens=4))
        while engine.snapshot()["phase"] != "prefilling":
            await asyncio.sleep(0.001)
        stream.cancel()
        await stream.result()

    asyncio.run(go())
    engine.close()
    rows = [engine.saver.disk.load(path.stem) for path in tmp_path.glob("*/*.kv")]
    assert rows and all(len(row.tokens) % 16 == 0 and len(row.tokens) < 399 for row in rows)
    assert not engine.saver.disk.has(engine.blocks.keys(prompt)[-1])


def test_a_cached_block_about_to_be_reused_writes_its_context_down(make_engine, tmp_path):
    import asyncio

    from shoal.engine import SamplingParams

    engine = make_engine(kv_disk_dir=str(tmp_path), kv_cache_mb=2, save_min_tokens=16)  # 32 blocks of 16 tokens
    save = engine.saver.save
    engine.saver.save = lambda seq, n, reason, key=None, now=False: (
        None if reason in ("cold", "finish") else save(seq, n, reason, key, now))
    params = SamplingParams(temperature=0, max_tokens=4)
    first = list(range(10, 210))

    async def go() -> None:
        await engine.submit(first, params).result()  # 12 full blocks stay cached when it ends
        await engine.submit(list(range(300, 700)), params).result()  # needs 26 blocks: some of those

    asyncio.run(go())
    assert engine.snapshot()["kv_disk"]["saves_evict"] >= 1
    assert engine.saver.disk.has(engine.blocks.keys(first[:192])[-1])
