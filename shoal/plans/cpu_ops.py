"""The CPU operators (seed 004): vm, filter, sort, take, concat. Only vm and concat build columns;
filter, sort and take return new index vectors over the same batch."""

import numpy as np

from shoal.plans.context import Context
from shoal.plans.evaluate import evaluate, test
from shoal.plans.registry import PlanError
from shoal.plans.rowset import Batch, Column, RowSet


def vm(ctx: Context, params: dict, rows: list[RowSet]) -> RowSet:
    """Writes params["expr"] (an IR), evaluated on the active rows, to out_key."""
    out = evaluate(params["expr"], rows[0], ctx.request.params)
    values = np.asarray(out.values, dtype=np.float64)
    if not np.isfinite(values[out.valid]).all():
        raise PlanError(f"vm: {params['out_key']} is not finite on some rows")
    return rows[0].with_column(params["out_key"], Column(values, out.valid))


def filter_rows(ctx: Context, params: dict, rows: list[RowSet]) -> RowSet:
    return rows[0].filter(test(params["pred"], rows[0], ctx.request.params))


def sort(ctx: Context, params: dict, rows: list[RowSet]) -> RowSet:
    return rows[0].sort(params["key"], descending=params.get("order", "asc") == "desc")


def take(ctx: Context, params: dict, rows: list[RowSet]) -> RowSet:
    return rows[0].take(params["count"])


def concat(ctx: Context, params: dict, rows: list[RowSet]) -> RowSet:
    return rows[0].concat(rows[1])


def request(ctx: Context, params: dict, rows: list[RowSet]) -> RowSet:
    return RowSet(Batch.build([ctx.request.user_id or 0]))
