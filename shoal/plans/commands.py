"""`shoal plan compile | run | list | seed-demo`."""

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from shoal.plans.registry import PlanError

app = typer.Typer(help="Plans (seed 004): compile, list and run DAG plans.", no_args_is_help=True)
err = Console(stderr=True)

DirOpt = Annotated[Path | None, typer.Option(
    "--plan-dir", help="Compiled plans (default: artifacts/plans, or SHOAL_PLAN_DIR).")]
RedisOpt = Annotated[str | None, typer.Option(
    "--redis", envvar="SHOAL_REDIS", help="Redis URL for every redis endpoint (default: the registry's, per --env).")]
EnvOpt = Annotated[str | None, typer.Option("--env", help="Endpoint environment: dev, test or prod (SHOAL_PLAN_ENV).")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(2)


@app.command()
def compile(
    sources: Annotated[list[Path], typer.Argument(help="Plan sources, e.g. plans/complex_dag.py.")],
    out: Annotated[Path, typer.Option("--out", help="Where artifacts go.")] = Path("artifacts/plans"),
) -> None:
    """Compile plan sources to <out>/<name>.plan.json (the same source gives the same bytes)."""
    from shoal.plans.dsl import compile_file, dumps

    for source in sources:
        try:
            artifact = compile_file(source)
        except PlanError as e:
            raise _fail(f"{source}: {e}") from e
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{artifact['plan_name']}.plan.json"
        path.write_text(dumps(artifact))
        print(path)


@app.command("list")
def list_plans(plan_dir: DirOpt = None) -> None:
    """The compiled plans: name, nodes and source digest, one JSON object per line."""
    from shoal.plans.runtime import default_dir, names, read

    directory = plan_dir or default_dir()
    for name in names(directory):
        try:
            artifact = read(directory, name)
        except PlanError as e:
            raise _fail(f"{name}: {e}") from e
        print(json.dumps({"name": name, "nodes": len(artifact["nodes"]),
                          "source_digest": artifact["built_by"].get("source_digest")}))


@app.command()
def run(
    name: Annotated[str, typer.Argument(help="A compiled plan's name.")],
    request: Annotated[str, typer.Option("--request", help='The request, e.g. \'{"user_id": 123}\'.')],
    redis_url: RedisOpt = None,
    env: EnvOpt = None,
    deadline_ms: Annotated[float | None, typer.Option("--deadline-ms", help="Deadline for the whole request.")] = None,
    node_timeout_ms: Annotated[float | None, typer.Option("--node-timeout-ms", help="Deadline per node.")] = None,
    plan_dir: DirOpt = None,
    url: Annotated[str | None, typer.Option("--url", envvar="SHOAL_URL", help=(
        "Run it on this shoal server instead (POST /v1/plans/NAME): its plans, its Redis, its models, which "
        "plans with generate need."))] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SHOAL_API_KEY", help="With --url.")] = None,
) -> None:
    """Run a plan once and print {"request_id", "candidates"}, or {"error"} (exit 1)."""
    from shoal.plans.context import Services
    from shoal.plans.runtime import Plans, default_dir
    from shoal.plans.scheduler import NodeError

    try:
        body = json.loads(request)
    except json.JSONDecodeError as e:
        raise _fail(f"--request is not JSON: {e}") from e
    if url is not None:
        _remote(url, api_key, name, body, deadline_ms, node_timeout_ms)
        return

    async def go() -> dict:
        plans = Plans(plan_dir or default_dir(), Services(env, redis_url))
        try:
            return await plans.run(name, body, deadline_ms, node_timeout_ms)
        finally:
            await plans.close()

    try:
        print(json.dumps(asyncio.run(go())))
    except (PlanError, LookupError) as e:
        raise _fail(str(e).strip("'\"")) from e
    except NodeError as e:
        print(json.dumps({"error": str(e)}))
        raise typer.Exit(1) from e


def _remote(url: str, api_key: str | None, name: str, body: object, deadline_ms: float | None,
            node_timeout_ms: float | None) -> None:
    import httpx

    limits = {k: v for k, v in (("deadline_ms", deadline_ms), ("node_timeout_ms", node_timeout_ms)) if v is not None}
    payload = {**body, **limits} if isinstance(body, dict) else body
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.post(f"{url.rstrip('/')}/v1/plans/{name}", json=payload, headers=headers, timeout=600)
    except httpx.HTTPError as e:
        raise _fail(f"cannot reach {url}: {e}") from e
    if answer.status_code in (502, 504):  # the plan ran and failed: {"error": ...}, as a local run prints it
        print(answer.text)
        raise typer.Exit(1)
    if answer.status_code != 200:
        error = answer.json().get("error", {}) if "json" in answer.headers.get("content-type", "") else {}
        raise _fail(error.get("message") or f"HTTP {answer.status_code}: {answer.text}")
    print(answer.text)


@app.command("seed-demo")
def seed_demo(redis_url: Annotated[str, typer.Option("--redis", envvar="SHOAL_REDIS", help="Redis URL.")]) -> None:
    """Load the demo data the example plans read (user 123, follows, recommendations, media)."""
    from redis.exceptions import RedisError

    from shoal.plans.demo import seed

    try:
        print(f"wrote {asyncio.run(seed(redis_url))} keys")
    except (RedisError, OSError, ValueError) as e:
        raise _fail(f"redis {redis_url}: {e}") from e
