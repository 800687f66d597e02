"""The operator catalogue: each op's inputs, params schema and implementation (seed 004).

The compiler checks plans against these schemas and the scheduler runs `run`: I/O ops are coroutines
on the event loop, the others run on the CPU pool. Param types: int, float, string, choice, key (a
registry key), out_key (a writable float key), expr, pred, node (another node, a dependency as
much as an input), endpoint, object (a JSON object).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.plans import cpu_ops, llm_ops, redis_ops
from shoal.plans.registry import PlanError


@dataclass(frozen=True)
class Param:
    type: str
    required: bool = True
    default: Any = None
    choices: tuple = ()
    minimum: float | None = None


@dataclass(frozen=True)
class Op:
    name: str
    inputs: int  # 0 for a source
    params: dict[str, Param] = field(default_factory=dict)
    io: bool = False
    run: Callable[..., Any] | None = None
    doc: str = ""


FANOUT = Param("int", required=False, default=100, minimum=1)
ENDPOINT = Param("endpoint")

OPS: dict[str, Op] = {op.name: op for op in [
    Op("viewer", 0, {"endpoint": ENDPOINT}, io=True, run=redis_ops.viewer,
       doc="The requesting user: HGETALL user:{user_id}, one row with its country."),
    Op("follow", 1, {"endpoint": ENDPOINT, "fanout": FANOUT}, io=True, run=redis_ops.follow,
       doc="Users each row follows (LRANGE follow:{id}), hydrated with HGETALL user:{x}."),
    Op("recommendation", 1, {"endpoint": ENDPOINT, "fanout": FANOUT}, io=True, run=redis_ops.recommendation,
       doc="Users recommended to each row (LRANGE recommendation:{id}), hydrated."),
    Op("media", 1, {"endpoint": ENDPOINT, "fanout": FANOUT}, io=True, run=redis_ops.media,
       doc="Media of each row (LRANGE media:{id}): ids only."),
    Op("vm", 1, {"out_key": Param("out_key"), "expr": Param("expr")}, run=cpu_ops.vm,
       doc="Writes expr, evaluated per row, to out_key."),
    Op("filter", 1, {"pred": Param("pred")}, run=cpu_ops.filter_rows, doc="Keeps the rows where pred holds."),
    Op("sort", 1, {"key": Param("key"), "order": Param("choice", False, "asc", ("asc", "desc"))}, run=cpu_ops.sort,
       doc="Stable sort by key, nulls last; reorders, copies nothing."),
    Op("take", 1, {"count": Param("int", minimum=1)}, run=cpu_ops.take, doc="The first count rows; copies nothing."),
    Op("concat", 1, {"rhs": Param("node")}, run=cpu_ops.concat, doc="The input's rows, then rhs's, in a new batch."),
    Op("request", 0, run=cpu_ops.request, doc="The request itself as one row (id = user_id, or 0)."),
    Op("generate", 1, {"samples": Param("int", False, 1, minimum=1), "template": Param("string", False),
                       "model": Param("string", False), "params": Param("object", False, {})},
       io=True, run=llm_ops.generate,
       doc="Per row, `samples` generations of template (filled from the row) or of the request's prompt, "
           "through the coordinator's queue; params are sampling params (temperature, max_tokens, seed, ...)."),
    Op("score", 1, {"out_key": Param("out_key"), "length_penalty": Param("float", False, 1.0)}, run=llm_ops.score,
       doc="Ranks generations: summed logprob / completion_tokens ** length_penalty."),
]}


def get(name: str) -> Op:
    if not isinstance(name, str) or name not in OPS:
        raise PlanError(f"unknown op {name!r} (known: {', '.join(sorted(OPS))})")
    return OPS[name]


def register(op: Op) -> None:
    """Add an op (the LLM operators, or a test's)."""
    OPS[op.name] = op
