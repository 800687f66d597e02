"""Running compiled plans: load an artifact by name, bind its nodes to operators, schedule them."""

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

from shoal.plans import ops
from shoal.plans.context import Context, Generate, PlanRequest, Services
from shoal.plans.registry import PlanError
from shoal.plans.scheduler import Executor, Step
from shoal.plans.validate import NAME, deps, validate


def default_dir() -> Path:
    return Path(os.environ.get("SHOAL_PLAN_DIR", "artifacts/plans"))


def bind(artifact: dict, ctx: Context) -> list[Step]:
    """One step per node: its op's run with the node's params (defaults filled, expr and pred ids
    replaced by their IR), and its dependencies' results as rows."""
    steps = []
    for node in artifact["nodes"]:
        op = ops.get(node["op"])
        params = {k: p.default for k, p in op.params.items() if not p.required} | node["params"]
        for name, param in op.params.items():
            if param.type in ("expr", "pred") and name in params:
                params[name] = artifact[f"{param.type}_table"][params[name]]
        steps.append(Step(node["node_id"], tuple(deps(node)), op.io, partial(op.run, ctx, params)))
    return steps


def names(directory: Path) -> list[str]:
    return sorted(p.name.removesuffix(".plan.json") for p in directory.glob("*.plan.json"))


def read(directory: Path, name: str) -> dict:
    """A compiled plan, validated; LookupError when there is none of that name."""
    path = _path(directory, name)
    try:
        artifact = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not JSON: {e}") from None
    validate(artifact)
    return artifact


def _path(directory: Path, name: str) -> Path:
    if not NAME.fullmatch(name):
        raise PlanError(f"a plan name is letters, digits and _, got {name!r}")
    path = directory / f"{name}.plan.json"
    if not path.is_file():
        raise LookupError(f"no plan {name!r} in {directory} (have: {', '.join(names(directory)) or 'none'})")
    return path


def needs(artifact: dict) -> tuple[str, ...]:
    """The request fields the plan's operators read: viewer the user, a generate without a template the prompt."""
    ops_used = {(n["op"], "template" in n["params"]) for n in artifact["nodes"]}
    return (*(("user_id",) if any(op == "viewer" for op, _ in ops_used) else ()),
            *(("prompt",) if ("generate", False) in ops_used else ()))


class Plans:
    """The compiled plans in one directory, and what runs them (shared by every request)."""

    def __init__(self, directory: Path, services: Services, cpu_threads: int = 4, on_late: Any = None):
        self.directory, self.services = directory, services
        self.executor = Executor(cpu_threads, on_late)
        self._cache: dict[str, tuple[float, dict]] = {}

    def get(self, name: str) -> dict:
        """The validated artifact (read again when its file changes)."""
        mtime = _path(self.directory, name).stat().st_mtime
        if name not in self._cache or self._cache[name][0] != mtime:
            self._cache[name] = (mtime, read(self.directory, name))
        return self._cache[name][1]

    async def run(self, name: str, body: Any, deadline_ms: float | None = None,
                  node_timeout_ms: float | None = None, generate: Generate | None = None) -> dict:
        """{"request_id", "candidates"}; PlanError for a bad request, NodeError when a node fails or overruns."""
        return await self.run_artifact(self.get(name), body, deadline_ms, node_timeout_ms, generate)

    async def run_artifact(self, artifact: dict, body: Any, deadline_ms: float | None = None,
                           node_timeout_ms: float | None = None, generate: Generate | None = None) -> dict:
        request = PlanRequest.parse(body, needs(artifact))
        for limit, value in (("deadline_ms", deadline_ms), ("node_timeout_ms", node_timeout_ms)):
            if value is not None and not value > 0:
                raise PlanError(f"{limit} must be positive, got {value}")
        steps = bind(artifact, Context(request, self.services, generate))
        results = await self.executor.run(steps, artifact["outputs"], deadline_ms, node_timeout_ms)
        return {"request_id": request.request_id, "candidates": results[artifact["outputs"][0]].records()}

    async def close(self) -> None:
        """Drain: late work lands and the CPU pool empties while the loop still runs, then the clients close."""
        await self.executor.drain()
        self.executor.close()
        await self.services.close()
