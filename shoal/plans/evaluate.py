"""The interpreter for the plan expression IR (expr.py builds it): whole columns at a time, no eval.

`evaluate` turns a value expression into a Column and `test` a predicate into a bool mask, both
aligned to rows.active(). Nulls propagate through arithmetic; a comparison with a null is False,
except `x == null` / `x != null`, which mean "x is null" / "x is not null".
"""

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.plans.rowset import STRING, Column, RowSet

CMPS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
ARITHMETIC = {"add": np.add, "sub": np.subtract, "mul": np.multiply}
NULL = {"op": "null"}


@dataclass(frozen=True)
class _Scope:
    rows: RowSet
    params: Mapping[str, Any]
    active: np.ndarray

    @property
    def n(self) -> int:
        return len(self.active)


def evaluate(expr: dict, rows: RowSet, params: Mapping[str, Any]) -> Column:
    """The value of expr for each active row."""
    return _value(expr, _Scope(rows, params, rows.active()))


def test(pred: dict, rows: RowSet, params: Mapping[str, Any]) -> np.ndarray:
    """A bool mask over the active rows: True where pred holds."""
    return _test(pred, _Scope(rows, params, rows.active()))


test.__test__ = False  # pytest would otherwise collect it from any test module that imports it


def _constant(value: Any, n: int) -> Column:
    if value is None:
        return Column.nulls(n)
    values = np.full(n, value, dtype=STRING) if isinstance(value, str) else np.full(n, float(value))
    return Column(values, np.ones(n, dtype=bool))


def _key(key: str, scope: _Scope) -> Column:
    if key == "id":
        ids = scope.rows.batch.ids[scope.active]
        return Column(ids.astype(np.float64), np.ones(scope.n, dtype=bool))
    return scope.rows.column(key)


def _value(expr: dict, scope: _Scope) -> Column:
    op = expr.get("op")
    if op == "const":
        return _constant(expr["value"], scope.n)
    if op == "null":
        return Column.nulls(scope.n)
    if op == "key_ref":
        return _key(expr["key"], scope)
    if op == "param_ref":
        return _constant(scope.params.get(expr["param"]), scope.n)
    if op in ARITHMETIC:
        a, b = _value(expr["a"], scope), _value(expr["b"], scope)
        return Column(ARITHMETIC[op](a.values, b.values), a.valid & b.valid)
    if op == "neg":
        x = _value(expr["x"], scope)
        return Column(np.negative(x.values), x.valid)
    if op == "coalesce":
        a, b = _value(expr["a"], scope), _value(expr["b"], scope)
        return Column(np.where(a.valid, a.values, b.values), a.valid | b.valid)
    raise ValueError(f"unknown value op {op!r}")


def _test(pred: dict, scope: _Scope) -> np.ndarray:
    op = pred.get("op")
    if op == "cmp":
        return _compare(pred, scope)
    if op == "and":
        return _test(pred["a"], scope) & _test(pred["b"], scope)
    if op == "or":
        return _test(pred["a"], scope) | _test(pred["b"], scope)
    if op == "not":
        return ~_test(pred["x"], scope)
    if op == "is_null":
        return ~_value(pred["x"], scope).valid
    if op == "in":
        return _isin(_value(pred["x"], scope), pred["values"])
    if op == "regex":
        return _regex(pred, scope)
    raise ValueError(f"unknown predicate op {op!r}")


def _compare(pred: dict, scope: _Scope) -> np.ndarray:
    cmp = pred["cmp"]
    if cmp not in CMPS:
        raise ValueError(f"unknown comparison {cmp!r}")
    if cmp in ("==", "!=") and NULL in (pred["a"], pred["b"]):
        x = _value(pred["b"] if pred["a"] == NULL else pred["a"], scope)
        return ~x.valid if cmp == "==" else x.valid.copy()
    a, b = _value(pred["a"], scope), _value(pred["b"], scope)
    both = a.valid & b.valid
    out = np.zeros(scope.n, dtype=bool)
    # Compare only rows where both sides are valid: null placeholders must not reach string comparisons.
    out[both] = CMPS[cmp](a.values[both], b.values[both])
    return out


def _per_distinct(x: Column, match: Callable[[Any], bool]) -> np.ndarray:
    """match applied once per distinct valid value, spread back over the rows; nulls are False."""
    out = np.zeros(len(x.valid), dtype=bool)
    distinct, inverse = np.unique(x.values[x.valid], return_inverse=True)
    out[x.valid] = np.array([match(value) for value in distinct], dtype=bool)[inverse]
    return out


def _isin(x: Column, values: list) -> np.ndarray:
    if x.is_string:
        wanted = {v for v in values if isinstance(v, str)}
        return _per_distinct(x, wanted.__contains__)
    numbers = np.array([v for v in values if not isinstance(v, str)], dtype=np.float64)
    return x.valid & np.isin(x.values, numbers)


def _regex(pred: dict, scope: _Scope) -> np.ndarray:
    flags = pred.get("flags", "")
    if flags not in ("", "i"):
        raise ValueError(f"unknown regex flags {flags!r}")
    pattern = pred["pattern"]
    if isinstance(pattern, dict):
        if pattern.get("op") != "param_ref":
            raise ValueError(f"a regex pattern is a string or a param_ref, not {pattern.get('op')!r}")
        pattern = scope.params.get(pattern["param"])
    if pattern is None:
        return np.zeros(scope.n, dtype=bool)
    compiled = re.compile(pattern, re.IGNORECASE if flags == "i" else 0)
    return _per_distinct(_key(pred["key"], scope), lambda value: compiled.search(value) is not None)
