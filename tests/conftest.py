import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

# `tune`'s choices (model/tunings.py) are kept in a directory of this run's own, for its servers and workers too:
# none remembered by an earlier run, or in the user's cache, stands in for the choosing a test means to exercise
os.environ["SHOAL_CACHE_DIR"] = tempfile.mkdtemp(prefix="shoal-tests-cache-")

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        attention_bias=True, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=7, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
}


def make_hf_model(arch: str, seed: int = 0, **overrides):
    import transformers

    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**TINY, **overrides}, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_hf_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """arch -> (transformers model, directory it was saved to)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model = make_hf_model(arch)
            cache[arch] = model, save_hf_model(model, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """arch -> directory of a tiny random model that speaks the demo model's tokenizer."""
    from shoal.model import DEMO_PATH

    cache = {}

    def get(arch: str, vocab_size: int = 1024) -> Path:
        if (arch, vocab_size) not in cache:
            model = make_hf_model(arch, vocab_size=vocab_size)
            path = save_hf_model(model, tmp_path_factory.mktemp(f"{arch}-{vocab_size}"))
            for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                shutil.copy(DEMO_PATH / name, path / name)
            cache[arch, vocab_size] = path
        return cache[arch, vocab_size]

    return get


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHOAL = str(Path(sys.executable).with_name("shoal"))
TOKEN = "worker-secret"


@pytest.fixture(scope="session", autouse=True)
def no_stray_shoal_processes():
    """Fails the run where a `shoal` process that a test started outlives the suite: a worker left serving would
    hold its memory and keep calling a coordinator that is gone (stop 30 found one)."""
    started = psutil.Process().create_time()
    yield
    ours = [p for p in psutil.process_iter(["cmdline", "create_time"])
            if SHOAL in (p.info["cmdline"] or [])[:2] and p.info["create_time"] >= started]
    _, alive = psutil.wait_procs(ours, timeout=5)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    names = [" ".join(p.info["cmdline"][1:]) for p in alive]  # as read before: a process may end meanwhile
    for p in alive:
        p.kill()
    assert not alive, f"processes left running after the tests: {names}"


def start_worker(url: str, name: str, token: str = TOKEN, *args: str) -> subprocess.Popen:
    """A real `shoal worker` subprocess connecting to `url`; extra args go to its command line."""
    log = tempfile.NamedTemporaryFile("w+", prefix=f"shoal-{name}-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([SHOAL, "worker", "--coordinator", url, "--token", token, "--name", name, *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = Path(log.name)
    return proc


def wait_workers(url: str, n: int, timeout: float = 60, kind: str = "workers") -> None:
    """Until `n` workers serve whole models (kind "workers") or layer ranges (kind "stages")."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = httpx.get(f"{url}/v1/models").json()["data"]
        if sum(m[kind] for m in models) == n:
            return
        time.sleep(0.1)
    raise AssertionError(f"expected {n} {kind}, have {models}")


def start_server(*args: str, ready: tuple[str, ...] = ("ok",)) -> tuple[str, subprocess.Popen]:
    """A real `shoal serve` subprocess on a free port; returns its URL once /health answers a `ready` status."""
    import httpx

    port = free_port()
    shoal = str(Path(sys.executable).with_name("shoal"))
    log = tempfile.NamedTemporaryFile("w+", prefix="shoal-serve-", suffix=".log", delete=False)  # noqa: SIM115
    db = () if "--db" in args else ("--db", "sqlite://")
    proc = subprocess.Popen([shoal, "serve", "--port", str(port), *db, *args], stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    proc.log_path = Path(log.name)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"shoal serve exited: {proc.log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).json()["status"] in ready:
                return url, proc
        except (httpx.HTTPError, ValueError):
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("shoal serve did not come up in 60 s")


@pytest.fixture(scope="session")
def server_url():
    """`shoal serve` on the demo model with fair-use limits off."""
    url, proc = start_server("--rpm", "0", "--streams", "0", "--tpm", "0")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def make_engine():
    """Engines on the demo model (or a given directory), closed after the test."""
    from shoal.engine import Engine, EngineConfig
    from shoal.model import DEMO_PATH

    engines = []

    def make(path=DEMO_PATH, **config) -> Engine:
        engines.append(Engine.from_dir(path, EngineConfig(**config)))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def start_redis() -> tuple[subprocess.Popen, str]:
    """A real `redis-server` on a free port, nothing saved; (process, URL) once it answers PING."""
    import redis

    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client, deadline = redis.Redis(port=port), time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return proc, f"redis://127.0.0.1:{port}/0"
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url():
    """The set-up installs redis-server, so it must be there."""
    proc, url = start_redis()
    yield url
    proc.terminate()
    proc.wait(timeout=10)
