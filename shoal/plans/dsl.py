"""Authoring plans: `define_plan(name, build)` and the fluent builder that records nodes (seed 004).

    plan = define_plan(name="top", build=lambda ctx: ctx.viewer(endpoint=EP.redis.default)
                       .follow(endpoint=EP.redis.default).take(count=10))

Each call adds a node n0, n1, ...; expressions go to expr_table (e0, ...) and predicates to
pred_table (p0, ...). Any op in the catalogue is a method: sources on the context, the others on
a node, with the node as their input.
"""

import hashlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shoal
from shoal.plans import ops
from shoal.plans.expr import Expr, Pred, lift
from shoal.plans.registry import PlanError
from shoal.plans.validate import NAME, validate

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PlanDef:
    name: str
    build: Callable[["PlanCtx"], "Node"]


def define_plan(name: str, build: Callable[["PlanCtx"], "Node"]) -> PlanDef:
    if not NAME.fullmatch(name):
        raise PlanError(f"a plan name is letters, digits and _, got {name!r}")
    return PlanDef(name, build)


@dataclass
class PlanCtx:
    nodes: list[dict] = field(default_factory=list)
    exprs: dict[str, dict] = field(default_factory=dict)
    preds: dict[str, dict] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Callable[..., "Node"]:
        op = _op(name, source=True)
        return lambda **params: self.add(op, [], params)

    def add(self, op: ops.Op, inputs: list[str], params: dict[str, Any]) -> "Node":
        node_id = f"n{len(self.nodes)}"
        fields = {k: self._param(op, k, v) for k, v in params.items()}
        self.nodes.append({"node_id": node_id, "op": op.name, "inputs": inputs, "params": fields})
        return Node(self, node_id)

    def _param(self, op: ops.Op, name: str, value: Any) -> Any:
        kind = op.params[name].type if name in op.params else None
        if kind in ("key", "out_key") and isinstance(value, Expr) and value.ir["op"] == "key_ref":
            return value.ir["key"]
        if kind == "expr" and isinstance(value, Expr | int | float):
            return self._table(self.exprs, "e", lift(value).ir)
        if kind == "pred" and isinstance(value, Pred):
            return self._table(self.preds, "p", value.ir)
        if kind == "node" and isinstance(value, Node):
            if value.ctx is not self:
                raise PlanError(f"{op.name}.{name}: the node belongs to another plan")
            return value.node_id
        if isinstance(value, Expr | Pred | Node):
            raise PlanError(f"{op.name}.{name}: expected {kind or 'no such param'}, got {value!r}")
        return value  # plain values are checked by validate()

    @staticmethod
    def _table(table: dict[str, dict], prefix: str, ir: dict) -> str:
        table_id = f"{prefix}{len(table)}"
        table[table_id] = ir
        return table_id


@dataclass(frozen=True)
class Node:
    ctx: PlanCtx
    node_id: str

    def __getattr__(self, name: str) -> Callable[..., "Node"]:
        op = _op(name, source=False)
        return lambda **params: self.ctx.add(op, [self.node_id], params)


def _op(name: str, source: bool) -> ops.Op:
    if name.startswith("__"):
        raise AttributeError(name)
    op = ops.get(name)
    if (op.inputs == 0) != source:
        where = "the plan context (ctx.viewer(...))" if op.inputs == 0 else "a node (ctx.viewer(...).follow(...))"
        raise PlanError(f"{name} is called on {where}")
    return op


def build(plan: PlanDef, source_digest: str = "") -> dict:
    """The plan's artifact, validated."""
    ctx = PlanCtx()
    out = plan.build(ctx)
    if not isinstance(out, Node):
        raise PlanError(f"plan {plan.name}: build must return a node, got {out!r}")
    artifact = {"schema_version": SCHEMA_VERSION, "plan_name": plan.name, "nodes": ctx.nodes,
                "outputs": [out.node_id], "expr_table": ctx.exprs, "pred_table": ctx.preds,
                "built_by": {"tool": "shoal", "version": shoal.__version__, "source_digest": source_digest}}
    validate(artifact)
    return artifact


def compile_file(source: Path) -> dict:
    """Load a plan source file (one define_plan named like the file) and build its artifact."""
    try:
        text = source.read_bytes()
    except OSError as e:
        raise PlanError(f"cannot read plan source {source}: {e.strerror}") from e
    spec = importlib.util.spec_from_file_location(f"shoal_plan_{source.stem}", source)
    if spec is None or spec.loader is None:
        raise PlanError(f"{source} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except PlanError:
        raise
    except Exception as e:  # the plan's own Python: its error, named, instead of a traceback
        raise PlanError(f"{source}: {type(e).__name__}: {e}") from e
    plans = [v for v in vars(module).values() if isinstance(v, PlanDef)]
    if len(plans) != 1:
        raise PlanError(f"{source}: expected one define_plan(...), found {len(plans)}")
    if plans[0].name != source.stem:
        raise PlanError(f"{source}: the plan is named {plans[0].name!r}; its file must be {plans[0].name}.py")
    return build(plans[0], hashlib.sha256(text).hexdigest()[:16])


def dumps(artifact: dict) -> str:
    """Stable bytes: the same source always gives the same file."""
    return json.dumps(artifact, sort_keys=True, indent=2) + "\n"
