import asyncio
import json
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from shoal.client import ClientError, RemoteChat
from shoal.coordinator.admission import AuthError, Limits
from shoal.engine import Engine, EngineConfig, EngineError, SamplingParams, Stats
from shoal.model import DEMO_PATH
from shoal.model.errors import ModelError
from shoal.plans.commands import app as plans_app

app = typer.Typer(help="shoal: a distributed LLM inference network.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

ModelOpt = Annotated[Path, typer.Option("--model", help="HF model directory (default: the shipped demo model).")]
MaxTokensOpt = Annotated[int | None, typer.Option(
    "--max-tokens", min=1, help="Most new tokens to generate (default: until the context is full).")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")]
KVOpt = Annotated[float, typer.Option("--kv-cache-mb", min=1, help="Memory for the paged KV cache, in MiB.")]
DiskOpt = Annotated[Path | None, typer.Option("--kv-disk-dir", envvar="SHOAL_KV_DISK_DIR", help=(
    "Keep the prefix cache on disk here too: it survives restarts and grows past RAM (off with --private)."))]
DiskGBOpt = Annotated[float, typer.Option("--kv-disk-gb", min=0.001, help="Disk budget of the prefix cache, in GB.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help=(
    "The model's dtype: float32, bfloat16 or float16 (default: bfloat16 on a GPU; on a CPU, a bfloat16 checkpoint "
    "stays bfloat16 where the CPU has bfloat16 instructions, AVX512-BF16 or AMX, and everything else is float32)."))]
CopiesOpt = Annotated[bool, typer.Option("--packed-copies/--no-packed-copies", help=(
    "On a CPU, keep packed copies of the weights (oneDNN's layout, or tiles' panels) whose batched "
    "products they speed up (default), while the weights "
    "and copies fit in half the free memory (a worker's --max-memory-gb turns them off); --no-packed-copies gives "
    "that memory back for slower batches."))]
DbOpt = Annotated[str, typer.Option("--db", envvar="SHOAL_DB", help="The kudos ledger: an SQLAlchemy URL.")]


def _engine(path: Path, kv_cache_mb: float, n_seq_max: int = 1) -> Engine:
    try:
        with err.status(f"Loading {path} ..."):
            return Engine.from_dir(path, EngineConfig(kv_cache_mb=kv_cache_mb, n_seq_max=n_seq_max))
    except (ModelError, EngineError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e


async def _stream(engine: Engine, prompt: str | list[dict], params: SamplingParams, echo: bool,
                  session_id: str | None = None) -> tuple[str, list[int], list[int], Stats]:
    """Run one request, printing text as it streams when echo; returns (text, ids, prompt ids, stats)."""
    stream = engine.submit(prompt, params, session_id=session_id)
    text, ids = [], []
    async for event in stream:
        ids += event.token_ids
        if event.kind == "text":
            text.append(event.text)
            if echo:
                console.out(event.text, end="", highlight=False)
    assert stream.stats is not None
    if stream.stats.finish_reason == "error":
        raise EngineError(stream.stats.error)
    return "".join(text), ids, stream.prompt_ids, stream.stats


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt text (raw unless --chat).")],
    model: ModelOpt = DEMO_PATH,
    use_chat: Annotated[bool, typer.Option("--chat", help="Use the chat template.")] = False,
    max_tokens: MaxTokensOpt = 64,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    kv_cache_mb: KVOpt = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print text, token ids and stats as JSON.")] = False,
) -> None:
    """Generate one completion and exit."""
    engine = _engine(model, kv_cache_mb)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    try:
        text, ids, prompt_ids, stats = asyncio.run(
            _stream(engine, [{"role": "user", "content": prompt}] if use_chat else prompt, params, not as_json))
    except EngineError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    finally:
        engine.close()
    if as_json:
        print(json.dumps({"text": text, "token_ids": ids, "prompt_token_ids": prompt_ids,
                          "finish_reason": stats.finish_reason}))
    else:
        console.out("")


@app.command()
def chat(
    model: ModelOpt = DEMO_PATH,
    url: Annotated[str | None, typer.Option("--url", help="Talk to a running `shoal serve` at this URL.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SHOAL_API_KEY", help="Key for --url.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    kv_cache_mb: KVOpt = 64,
) -> None:
    """Chat with a model in the terminal; replies stream as they are generated.

    /reset forgets the conversation; Ctrl-D or /exit quits.
    """
    session = uuid.uuid4().hex
    if url:
        remote = RemoteChat(url, api_key)
        try:
            name = remote.models()[0]
        except (ClientError, IndexError) as e:
            err.print(f"[red]error:[/red] {e or 'the server serves no model'}")
            raise typer.Exit(2) from e
        params = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}

        def say(turn: list[dict]) -> str:
            parts = []
            for delta in remote.stream(name, turn, session_id=session, **params):
                console.out(delta, end="", highlight=False)
                parts.append(delta)
            return "".join(parts)
    else:
        engine, name = _engine(model, kv_cache_mb), model.name
        local = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)

        def say(turn: list[dict]) -> str:
            return asyncio.run(_stream(engine, turn, local, echo=True, session_id=session))[0]

    messages = [{"role": "system", "content": system}] if system else []
    console.print(f"[bold]shoal chat[/bold] — {name}. Type /reset to start afresh, /exit or Ctrl-D to quit.")
    while True:
        try:
            text = console.input("[bold green]you>[/bold green] ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages, session = messages[:1] if system else [], uuid.uuid4().hex
            continue
        if not text:
            continue
        console.print("[bold blue]shoal>[/bold blue] ", end="")
        turn = [*messages, {"role": "user", "content": text}]
        try:
            reply = say(turn)
        except (EngineError, ClientError) as e:
            err.print(f"[red]error:[/red] {e}; this message was not added to the conversation (/reset starts afresh)")
            continue
        console.out("")
        messages = [*turn, {"role": "assistant", "content": reply}]
    if not url:
        engine.close()


@app.command()
def serve(
    model: ModelOpt = DEMO_PATH,
    model_name: Annotated[str | None, typer.Option("--model-name", help="Name clients use (default: the directory "
                                                                         "name).")] = None,
    host: Annotated[str, typer.Option("--host", envvar="SHOAL_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", envvar="SHOAL_PORT", min=1, max=65535)] = 8000,
    kv_cache_mb: KVOpt = 256,
    kv_disk_dir: DiskOpt = None,
    kv_disk_gb: DiskGBOpt = 4.0,
    n_seq_max: Annotated[int, typer.Option("--n-seq-max", min=1, help="Sequences decoded together.")] = 16,
    dtype: DtypeOpt = None,
    packed_copies: CopiesOpt = True,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help=(
        "CPU threads for the local worker's model, which runs in a process of its own (default: one per core less "
        "one, which the HTTP server needs: math threads that share its core spin and stall)."))] = None,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", help="Require this key (repeatable).")] = None,
    api_keys_file: Annotated[Path | None, typer.Option("--api-keys-file", help="Required keys, one a line.")] = None,
    rpm: Annotated[float, typer.Option("--rpm", help="Requests a minute per client (0: no limit).")] = 60,
    streams: Annotated[int, typer.Option("--streams", help="Concurrent streams per client (0: no limit).")] = 4,
    tpm: Annotated[float, typer.Option("--tpm", help="Tokens a minute per client (0: no limit).")] = 40_000,
    private: Annotated[bool, typer.Option("--private", envvar="SHOAL_PRIVATE",
                                          help="No prompt text in logs, no access log, nothing written to disk.")]
    = False,
    local_worker: Annotated[bool, typer.Option("--local-worker/--no-local-worker",
                                               help="Run a local worker (default) or only coordinate.")]
    = True,
    worker_token: Annotated[list[str] | None, typer.Option("--worker-token", envvar="SHOAL_WORKER_TOKEN",
                                                           help="Token remote workers connect with (repeatable).")]
    = None,
    db: DbOpt = "sqlite:///shoal.db",
    verify_rate: Annotated[float, typer.Option("--verify-rate", min=0.0, max=1.0,
                                               help="Share of route steps a second replica recomputes to check.")]
    = 0.0,
    plan_dir: Annotated[Path, typer.Option("--plan-dir", envvar="SHOAL_PLAN_DIR",
                                           help="Compiled plans served at POST /v1/plans/{name}.")]
    = Path("artifacts/plans"),
    redis_url: Annotated[str | None, typer.Option("--redis", envvar="SHOAL_REDIS",
                                                  help="Redis URL for the redis endpoints plans call.")]
    = None,
) -> None:
    """Serve the OpenAI-compatible API and the web chat page at http://HOST:PORT/."""
    import torch

    from shoal.serve import ServeSettings
    from shoal.serve import serve as run_server

    threads = threads or max(1, torch.get_num_threads() - 1)
    disk = None if private or kv_disk_dir is None else str(kv_disk_dir)  # private: nothing of a request on disk
    config = EngineConfig(n_seq_max=n_seq_max, kv_cache_mb=kv_cache_mb, kv_disk_dir=disk, kv_disk_gb=kv_disk_gb,
                          dtype=dtype, packed_copies=packed_copies)
    settings = ServeSettings(model, model_name, host, port, config,
                             Limits(rpm, streams, tpm), api_key or [], api_keys_file, private, local_worker,
                             worker_token or [], db, verify_rate, plan_dir, redis_url)
    try:
        run_server(settings, threads)
    except (ModelError, EngineError, AuthError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e


@app.command()
def worker(
    coordinator: Annotated[str, typer.Option("--coordinator", envvar="SHOAL_COORDINATOR",
                                             help="The coordinator's URL, e.g. http://10.0.0.5:8000.")],
    token: Annotated[str, typer.Option("--token", envvar="SHOAL_WORKER_TOKEN", help="This worker's token.")],
    model: ModelOpt = DEMO_PATH,
    model_name: Annotated[str | None, typer.Option("--model-name", help="Name clients use (default: the directory "
                                                                         "name).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="This worker's name (default: the host name).")] = None,
    kv_cache_mb: KVOpt = 256,
    kv_disk_dir: DiskOpt = None,
    kv_disk_gb: DiskGBOpt = 4.0,
    n_seq_max: Annotated[int, typer.Option("--n-seq-max", min=1, help="Sequences decoded together.")] = 16,
    layers: Annotated[str | None, typer.Option("--layers", help="Hold only layers START:END and serve them as a "
                                                                "pipeline stage (default: the whole model).")] = None,
    dtype: DtypeOpt = None,
    packed_copies: CopiesOpt = True,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help=(
        "CPU threads for the model (default: torch's, one per core). Give each of several workers on one machine "
        "its share: idle math threads spin and steal the cores a busy worker needs."))] = None,
    max_memory_gb: Annotated[float | None, typer.Option("--max-memory-gb", min=0.0, help=(
        "Without --layers: hold as many layers as fit in this much memory, the range the swarm covers worst."))]
    = None,
    push: Annotated[bool, typer.Option("--push/--no-push", help=(
        "As a stage, listen for the previous hop's output pushed straight to it (default), or take every hop's "
        "input from the coordinator (for a stage other stages cannot reach)."))] = True,
    peer_host: Annotated[str | None, typer.Option("--peer-host", help=(
        "Address other stages push to (default: the one this worker reaches the coordinator from)."))] = None,
    peer_port: Annotated[int, typer.Option("--peer-port", min=0, max=65535, help=(
        "Port to listen for pushes on (default: any free one)."))] = 0,
) -> None:
    """Serve a model (or a range of its layers) to a coordinator over one outgoing connection; SIGTERM drains."""
    import socket

    import httpx
    import torch

    from shoal import logs
    from shoal.engine.process import EngineProcess
    from shoal.engine.stage import StageEngine
    from shoal.model.matmul import set_threads
    from shoal.model.weights import weights_fingerprint
    from shoal.worker.remote import run_worker

    logs.configure()
    # torch's count honours OMP_NUM_THREADS; numba's pool would take every core, and its workers spin between ops
    # (shoal/__init__.py): two workers sharing 2 cores each so ran 16-33% fewer tokens/s
    threads = threads or torch.get_num_threads()
    set_threads(threads)
    config = EngineConfig(kv_cache_mb=kv_cache_mb, n_seq_max=n_seq_max, kv_disk_dir=kv_disk_dir and str(kv_disk_dir),
                          kv_disk_gb=kv_disk_gb, dtype=dtype,
                          packed_copies=packed_copies and max_memory_gb is None)  # its budget counts weights once
    try:
        fingerprint = weights_fingerprint(model)
        if layers is None and max_memory_gb is not None:
            layers = _pick_layers(coordinator, token, model, model_name or model.resolve().name, fingerprint,
                                  max_memory_gb, dtype)
        with err.status(f"Loading {model} ..."):
            engine = (StageEngine.from_dir(model, _layers(layers), config) if layers
                      else EngineProcess(model, config, threads))
    except (ModelError, EngineError, ValueError, OSError, httpx.HTTPError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    try:
        _run_fast(run_worker(coordinator, token, engine, model_name or model.resolve().name,
                             name or socket.gethostname(), fingerprint, peer_host=peer_host,
                             peer_port=peer_port if push else None))
    finally:
        engine.close()


def _run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed: a route step crosses the worker's loop twice, and uvloop's
    wake-ups and socket reads are several times cheaper than asyncio's."""
    try:
        import uvloop
    except ImportError:  # Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


def _pick_layers(coordinator: str, token: str, model: Path, name: str, fingerprint: str,
                 max_memory_gb: float, dtype: str | None) -> str | None:
    """The range this worker should hold (None: the whole model fits), by Petals' rule over what the swarm has."""
    import httpx

    from shoal.coordinator.routes import Offer, choose_range
    from shoal.model import ModelConfig
    from shoal.model.weights import default_device, layer_sizes, resolve_dtype

    # what the layers take in memory, in the dtype they will load in: a bfloat16 checkpoint loaded as float32 doubles
    n_layers, per_layer, other = layer_sizes(model, resolve_dtype(ModelConfig.from_dir(model), default_device(), dtype))
    fits = int((max_memory_gb * 2**30 - other) // per_layer)
    if fits < 1:
        raise ValueError(f"--max-memory-gb {max_memory_gb} holds no layer of {name} (one layer and the embedding "
                         f"take {(per_layer + other) / 2**30:.2f} GB)")
    if fits >= n_layers:
        return None
    reply = httpx.get(f"{coordinator.rstrip('/')}/v1/workers/ranges", params={"model": name,
                      "fingerprint": fingerprint}, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    reply.raise_for_status()
    start, end = choose_range([Offer(**o) for o in reply.json()["offers"]], n_layers, fits)
    err.print(f"holding layers {start}:{end} of {n_layers} ({fits} fit in {max_memory_gb} GB)")
    return f"{start}:{end}"


def _layers(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    if not (sep and start.strip().isdigit() and end.strip().isdigit()):
        raise ValueError(f"--layers takes START:END, e.g. 0:12, not {text!r}")
    return int(start), int(end)


tokens = typer.Typer(help="Worker tokens and user API keys in the kudos ledger.", no_args_is_help=True)
app.add_typer(tokens, name="token")
app.add_typer(plans_app, name="plan")


@tokens.command("create")
def token_create(
    worker_name: Annotated[str | None, typer.Option("--worker", help="Create a token for this worker.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Create a user and print its API key; with --worker, "
                                                              "the worker's owner.")] = None,
    db: DbOpt = "sqlite:///shoal.db",
) -> None:
    """Print a new secret; the ledger keeps only its hash, so it cannot be shown again."""
    from shoal.store.ledger import Ledger

    if not worker_name and not user:
        err.print("[red]error:[/red] give --worker NAME or --user NAME")
        raise typer.Exit(2)
    ledger = Ledger(db)
    try:
        print(ledger.create_worker_token(worker_name, user) if worker_name else ledger.create_user(user))
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
