import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from shoal.engine import Engine, EngineConfig, EngineError, SamplingParams, Stats
from shoal.model import DEMO_PATH
from shoal.model.errors import ModelError

app = typer.Typer(help="shoal: a distributed LLM inference network.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

ModelOpt = Annotated[Path, typer.Option("--model", help="HF model directory (default: the shipped demo model).")]
MaxTokensOpt = Annotated[int | None, typer.Option(
    "--max-tokens", min=1, help="Most new tokens to generate (default: until the context is full).")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")]
KVOpt = Annotated[float, typer.Option("--kv-cache-mb", min=1, help="Memory for the paged KV cache, in MiB.")]


def _engine(path: Path, kv_cache_mb: float) -> Engine:
    try:
        with err.status(f"Loading {path} ..."):
            return Engine.from_dir(path, EngineConfig(kv_cache_mb=kv_cache_mb, n_seq_max=1))
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
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    kv_cache_mb: KVOpt = 64,
) -> None:
    """Chat with a model in the terminal; replies stream as they are generated.

    /reset forgets the conversation; Ctrl-D or /exit quits.
    """
    engine = _engine(model, kv_cache_mb)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    messages = [{"role": "system", "content": system}] if system else []
    console.print(f"[bold]shoal chat[/bold] — {model.name}. Type /reset to start afresh, /exit or Ctrl-D to quit.")
    while True:
        try:
            text = console.input("[bold green]you>[/bold green] ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = messages[:1] if system else []
            engine.end_session("chat")
            continue
        if not text:
            continue
        console.print("[bold blue]shoal>[/bold blue] ", end="")
        turn = [*messages, {"role": "user", "content": text}]
        try:
            reply, *_ = asyncio.run(_stream(engine, turn, params, echo=True, session_id="chat"))
        except EngineError as e:
            err.print(f"[red]error:[/red] {e}; this message was not added to the conversation (/reset starts afresh)")
            continue
        console.out("")
        messages = [*turn, {"role": "assistant", "content": reply}]
    engine.close()
