"""Remote workers on this machine: throughput with 1, 2 and 4 worker processes, the coordinator's CPU
cost per 1,000 tokens served, and failover_s (a worker's death to its stream moving again elsewhere).

Each level sends the same concurrent non-streamed requests (demo model, ignore_eos) through one
coordinator; workers split the machine's cores between them. Prints one JSON object.
Usage: python bench/workers.py [--levels 1,2,4] [--requests 32] [--tokens 64]
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import start_server

SHOAL = str(Path(sys.executable).with_name("shoal"))
TOKEN = "bench-token"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_workers(url: str, n: int) -> list[subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)))
    return [subprocess.Popen([SHOAL, "worker", "--coordinator", url, "--token", TOKEN, "--name", f"w{i}"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(n)]


def wait_workers(url: str, n: int) -> None:
    while sum(m["workers"] for m in httpx.get(f"{url}/v1/models").json()["data"]) != n:
        time.sleep(0.1)


async def load(url: str, requests: int, tokens: int) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def one(i: int) -> int:
            body = {"model": "demo", "messages": [{"role": "user", "content": f"What is {i} + 7?"}],
                    "max_tokens": tokens, "ignore_eos": True, "temperature": 0.7, "seed": i}
            response = await http.post("/v1/chat/completions", json=body)
            return response.json()["usage"]["completion_tokens"]

        return sum(await asyncio.gather(*(one(i) for i in range(requests))))


def level(url: str, pid: int, n: int, requests: int, tokens: int) -> dict:
    workers = start_workers(url, n)
    try:
        wait_workers(url, n)
        asyncio.run(load(url, n, 4))
        cpu, started = cpu_seconds(pid), time.perf_counter()
        served = asyncio.run(load(url, requests, tokens))
        wall, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
    finally:
        for w in workers:
            w.kill()
            w.wait()
    wait_workers(url, 0)
    return {"tok_s": round(served / wall, 1), "coordinator_cpu_s_per_1k_tokens": round(1000 * cpu / served, 3)}


async def failover(url: str) -> float:
    """Stop the worker streaming a job, let what it already sent arrive, start a second worker, then kill the
    first: the time from its death to new text on the same stream."""
    first, second = start_workers(url, 1)[0], None
    wait_workers(url, 1)
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 400,
            "ignore_eos": True, "stream": True, "temperature": 0.7, "seed": 1}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http, \
                http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines: asyncio.Queue[str] = asyncio.Queue()

            async def read() -> None:
                async for line in response.aiter_lines():
                    if '"content"' in line:
                        await lines.put(line)

            reader = asyncio.create_task(read())
            await lines.get()
            first.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                while True:
                    await asyncio.wait_for(lines.get(), 0.3)
            except TimeoutError:
                pass
            second = start_workers(url, 1)[0]
            while sum(m["workers"] for m in (await http.get("/v1/models")).json()["data"]) < 2:
                await asyncio.sleep(0.05)
            assert time.monotonic() - stopped < 5, "the stopped worker would be dropped for silence first"
            first.send_signal(signal.SIGKILL)
            killed = time.perf_counter()
            await lines.get()
            elapsed = time.perf_counter() - killed
            reader.cancel()
            return elapsed
    finally:
        for w in (first, second):
            if w is not None:
                w.kill()
                w.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="1,2,4")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    url, proc = start_server("--no-local-worker", "--worker-token", TOKEN, "--rpm", "0", "--streams", "0",
                             "--tpm", "0", "--private", ready=("ok", "no_workers"))
    try:
        report = {"model": "demo", "cores": os.cpu_count(), "requests": args.requests, "tokens": args.tokens,
                  "workers": {n: level(url, proc.pid, int(n), args.requests, args.tokens)
                              for n in args.levels.split(",")},
                  "failover_s": round(asyncio.run(failover(url)), 3)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
