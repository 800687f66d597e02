import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from shoal.model import DEMO_PATH, Transformer, load_model
from shoal.model.detokenize import StreamDecoder
from shoal.model.errors import ModelError
from shoal.model.generate import generate as generate_ids
from shoal.model.tokenizer import Tokenizer

app = typer.Typer(help="shoal: a distributed LLM inference network.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

ModelOpt = Annotated[Path, typer.Option("--model", help="HF model directory (default: the shipped demo model).")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1, help="Most new tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")]


def _load(path: Path) -> tuple[Transformer, Tokenizer]:
    try:
        with err.status(f"Loading {path} ..."):
            return load_model(path), Tokenizer.from_dir(path)
    except ModelError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e


def _stream(model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int], max_tokens: int,
            temperature: float, seed: int | None):
    """Yield (token_id, text_delta) for each generated token, the stop token excluded."""
    stop = tokenizer.eos_token_ids
    decoder = StreamDecoder(tokenizer)
    for token in generate_ids(model, prompt_ids, max_tokens, temperature, seed, stop):
        if token in stop:
            return
        yield token, decoder.push(token)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt text (raw unless --chat).")],
    model: ModelOpt = DEMO_PATH,
    use_chat: Annotated[bool, typer.Option("--chat", help="Use the chat template.")] = False,
    max_tokens: MaxTokensOpt = 64,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print text and token ids as JSON.")] = False,
) -> None:
    """Generate one completion and exit."""
    net, tokenizer = _load(model)
    ids = []
    try:
        prompt_ids = (tokenizer.encode_chat([{"role": "user", "content": prompt}]) if use_chat
                      else tokenizer.encode(prompt))
        for token, delta in _stream(net, tokenizer, prompt_ids, max_tokens, temperature, seed):
            ids.append(token)
            if not as_json:
                console.out(delta, end="", highlight=False)
    except (ModelError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    if as_json:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        print(json.dumps({"text": text, "token_ids": ids, "prompt_token_ids": prompt_ids}))
    else:
        console.out("")


@app.command()
def chat(
    model: ModelOpt = DEMO_PATH,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    max_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
) -> None:
    """Chat with a model in the terminal; replies stream as they are generated.

    /reset forgets the conversation; Ctrl-D or /exit quits.
    """
    net, tokenizer = _load(model)
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
            continue
        if not text:
            continue
        console.print("[bold blue]shoal>[/bold blue] ", end="")
        reply = []
        try:
            prompt_ids = tokenizer.encode_chat([*messages, {"role": "user", "content": text}])
            for _, delta in _stream(net, tokenizer, prompt_ids, max_tokens, temperature, seed):
                console.out(delta, end="", highlight=False)
                reply.append(delta)
        except (ModelError, ValueError) as e:
            err.print(f"[red]error:[/red] {e}; this message was not added to the conversation (/reset starts afresh)")
            continue
        console.out("")
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(reply)}]
