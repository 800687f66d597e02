"""Fail-closed validation of a plan artifact: anything unknown or ill-typed is refused, with its cause."""

import math
import re
from typing import Any

from shoal.plans import ops
from shoal.plans.evaluate import CMPS
from shoal.plans.registry import PlanError, load

FIELDS = {"schema_version", "plan_name", "nodes", "outputs", "expr_table", "pred_table", "built_by"}
NODE_FIELDS = {"node_id", "op", "inputs", "params"}
NAME = re.compile(r"[A-Za-z0-9_]+")
ARITHMETIC = ("add", "sub", "mul", "coalesce")


def validate(artifact: Any) -> None:
    if not isinstance(artifact, dict):
        raise PlanError("a plan is a JSON object")
    if unknown := set(artifact) - FIELDS:
        raise PlanError(f"unknown plan field(s): {', '.join(sorted(unknown))}")
    if artifact.get("schema_version") != 1:
        raise PlanError(f"schema_version must be 1, got {artifact.get('schema_version')!r}")
    if not isinstance(artifact.get("plan_name"), str) or not NAME.fullmatch(artifact["plan_name"]):
        raise PlanError(f"plan_name must be letters, digits and _, got {artifact.get('plan_name')!r}")
    nodes, exprs, preds = artifact.get("nodes"), artifact.get("expr_table", {}), artifact.get("pred_table", {})
    if not isinstance(nodes, list) or not nodes:
        raise PlanError("nodes must be a non-empty list")
    if not isinstance(exprs, dict) or not isinstance(preds, dict):
        raise PlanError("expr_table and pred_table must be objects")
    ids = [node.get("node_id") if isinstance(node, dict) else None for node in nodes]
    if not all(isinstance(i, str) for i in ids):
        raise PlanError(f"every node needs a string node_id, got {ids}")
    if len(set(ids)) != len(ids):
        raise PlanError(f"node_id must be unique, got {ids}")
    for expr_id, ir in exprs.items():
        _expr(ir, f"expr {expr_id}")
    for pred_id, ir in preds.items():
        _pred(ir, f"pred {pred_id}")
    for node in nodes:
        _node(node, set(ids), exprs, preds)
    outputs = artifact.get("outputs")
    if not isinstance(outputs, list) or not outputs or any(o not in ids for o in outputs):
        raise PlanError(f"outputs must list existing nodes, got {outputs!r}")
    _acyclic(nodes)


def deps(node: dict) -> list[str]:
    """What a node waits for: its inputs, then the nodes its params refer to (concat's rhs)."""
    spec = ops.get(node["op"])
    return [*node["inputs"], *(node["params"][k] for k, p in spec.params.items()
                               if p.type == "node" and k in node["params"])]


def _node(node: Any, ids: set, exprs: dict, preds: dict) -> None:
    if not isinstance(node, dict) or set(node) != NODE_FIELDS:
        raise PlanError(f"a node has exactly the fields {sorted(NODE_FIELDS)}, got {node!r}")
    where = f"node {node['node_id']}"
    if not isinstance(node["node_id"], str) or not NAME.fullmatch(node["node_id"]):
        raise PlanError(f"{where}: node_id must be letters, digits and _")
    spec = ops.get(node["op"])
    where = f"{where} ({spec.name})"
    inputs, params = node["inputs"], node["params"]
    if not isinstance(inputs, list) or len(inputs) != spec.inputs or not all(isinstance(i, str) for i in inputs):
        raise PlanError(f"{where}: takes {spec.inputs} input(s), got {inputs!r}")
    if missing := [i for i in inputs if i not in ids]:
        raise PlanError(f"{where}: missing input node(s) {missing}")
    if not isinstance(params, dict):
        raise PlanError(f"{where}: params must be an object")
    if unknown := set(params) - set(spec.params):
        raise PlanError(f"{where}: unknown param(s) {sorted(unknown)} (known: {sorted(spec.params)})")
    for name, param in spec.params.items():
        if name in params:
            _param(params[name], param, f"{where}: param {name}", ids, exprs, preds)
        elif param.required:
            raise PlanError(f"{where}: missing param {name}")


def _param(value: Any, param: ops.Param, where: str, ids: set, exprs: dict, preds: dict) -> None:
    registry, kind = load(), param.type
    if not _typed(value, param, {"expr": exprs, "pred": preds, "node": ids}):
        expected = f"one of {param.choices}" if kind == "choice" else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
        raise PlanError(f"{where} must be {expected}, got {value!r}")
    if param.minimum is not None and value < param.minimum:
        raise PlanError(f"{where} must be at least {param.minimum}, got {value!r}")
    if kind in ("key", "out_key"):
        key = _named(registry.key, value, where)
        if kind == "out_key" and (not key.writable or key.type != "float"):
            raise PlanError(f"{where}: key {value!r} is not a writable float key")
    if kind == "endpoint":
        _named(registry.endpoint, value, where)
    if kind == "expr" and _expr(exprs[value], where) == "string":
        raise PlanError(f"{where}: expression {value} gives a string; only numbers can be written")


def _typed(value: Any, param: ops.Param, tables: dict) -> bool:
    kind = param.type
    if isinstance(value, bool) or kind == "object":
        return kind == "object" and isinstance(value, dict)
    if kind in tables:
        return isinstance(value, str) and value in tables[kind]
    if kind == "choice":
        return isinstance(value, str | int | float) and value in param.choices
    return isinstance(value, {"int": int, "float": int | float}.get(kind, str))


def _named(lookup, name: str, where: str):
    try:
        return lookup(name)
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from None


def _expr(ir: Any, where: str) -> str:
    """Check an expression; returns its type: float, string or null."""
    op = ir.get("op") if isinstance(ir, dict) else None
    if op == "const" and isinstance(ir.get("value"), int | float | str) and not isinstance(ir["value"], bool):
        if isinstance(ir["value"], float) and not math.isfinite(ir["value"]):
            raise PlanError(f"{where}: constants must be finite, got {ir['value']}")
        return "string" if isinstance(ir["value"], str) else "float"
    if op == "null":
        return "null"
    if op == "key_ref":
        return "string" if _named(load().key, ir.get("key"), where).type == "string" else "float"
    if op == "param_ref":
        return "string" if _named(load().param, ir.get("param"), where).type == "string" else "float"
    if op in ARITHMETIC or op == "neg":
        for side in ("x",) if op == "neg" else ("a", "b"):
            if _expr(ir.get(side), where) == "string":
                raise PlanError(f"{where}: {op} takes numbers, not strings")
        return "float"
    raise PlanError(f"{where}: unknown or malformed expression {ir!r}")


def _pred(ir: Any, where: str) -> None:
    op = ir.get("op") if isinstance(ir, dict) else None
    if op in ("and", "or"):
        _pred(ir.get("a"), where), _pred(ir.get("b"), where)
    elif op == "not":
        _pred(ir.get("x"), where)
    elif op == "is_null":
        _expr(ir.get("x"), where)
    elif op == "cmp" and ir.get("cmp") in CMPS:
        types = {_expr(ir.get("a"), where), _expr(ir.get("b"), where)} - {"null"}
        if len(types) > 1:
            raise PlanError(f"{where}: cannot compare a number with a string")
    elif op == "in" and isinstance(ir.get("values"), list) and ir["values"]:
        kind = _expr(ir.get("x"), where)
        wanted = str if kind == "string" else int | float
        if any(isinstance(v, bool) or not isinstance(v, wanted) for v in ir["values"]):
            raise PlanError(f"{where}: in needs {kind} values, got {ir['values']!r}")
    elif op == "regex" and ir.get("flags", "") in ("", "i"):
        if _named(load().key, ir.get("key"), where).type != "string":
            raise PlanError(f"{where}: regex needs a string key, got {ir.get('key')!r}")
        pattern = ir.get("pattern")
        if not isinstance(pattern, str) and (not isinstance(pattern, dict) or _expr(pattern, where) != "string"
                                             or pattern.get("op") != "param_ref"):
            raise PlanError(f"{where}: a regex pattern is a string or a string param, got {pattern!r}")
        if isinstance(pattern, str):
            try:
                re.compile(pattern)
            except re.error as e:
                raise PlanError(f"{where}: bad regex {pattern!r}: {e}") from None
    else:
        raise PlanError(f"{where}: unknown or malformed predicate {ir!r}")


def _acyclic(nodes: list[dict]) -> None:
    """Kahn's algorithm over inputs and node-ref params; of what is never freed, the nodes that only
    follow a cycle are peeled off, so the error names the cycle itself."""
    waiting = {n["node_id"]: set(deps(n)) for n in nodes}
    ready = [i for i, d in waiting.items() if not d]
    while ready:
        done = ready.pop()
        for node_id, d in waiting.items():
            if done in d:
                d.discard(done)
                if not d:
                    ready.append(node_id)
    stuck = {i: d for i, d in waiting.items() if d}
    while tails := [i for i in stuck if not any(i in d for d in stuck.values())]:
        for i in tails:
            del stuck[i]
    if stuck:
        raise PlanError(f"the plan has a cycle through nodes {sorted(stuck)}")
