"""The plan expression language: Python operators build an IR of plain dicts (seed 004).

`Key.id * coalesce(P.weight, 0.1)` becomes {"op": "mul", "a": {"op": "key_ref", "key": "id"}, ...};
comparisons, `&`, `|` and `~` build predicates. Nothing is evaluated here (evaluate.py runs the IR),
and there is no division: the language has + - * and unary minus only.
"""

import math
from typing import Any

from shoal.plans.registry import PlanError, load

CMPS = {"__eq__": "==", "__ne__": "!=", "__lt__": "<", "__le__": "<=", "__gt__": ">", "__ge__": ">="}


def lift(value: Any) -> "Expr":
    """An Expr for a literal: None is null, numbers and strings are constants."""
    if isinstance(value, Expr):
        return value
    if value is None:
        return Expr({"op": "null"})
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PlanError(f"an expression takes numbers, strings, None, Key.x and P.x, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise PlanError(f"an expression constant must be finite, got {value}")
    return Expr({"op": "const", "value": value})


class _Node:
    __slots__ = ("ir",)

    def __init__(self, ir: dict):
        self.ir = ir

    def __bool__(self) -> bool:
        raise PlanError("an expression has no truth value while a plan is built: use &, |, ~ (not and, or, not) "
                        "and write (a < x) & (x < b), not a < x < b")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ir})"


class Expr(_Node):
    __slots__ = ()
    __hash__ = None  # == builds a predicate, so an Expr is no dict key

    def _binary(self, op: str, other: Any, swap: bool = False) -> "Expr":
        a, b = self.ir, lift(other).ir
        return Expr({"op": op, "a": b, "b": a} if swap else {"op": op, "a": a, "b": b})

    def __add__(self, other: Any) -> "Expr":
        return self._binary("add", other)

    def __radd__(self, other: Any) -> "Expr":
        return self._binary("add", other, swap=True)

    def __sub__(self, other: Any) -> "Expr":
        return self._binary("sub", other)

    def __rsub__(self, other: Any) -> "Expr":
        return self._binary("sub", other, swap=True)

    def __mul__(self, other: Any) -> "Expr":
        return self._binary("mul", other)

    def __rmul__(self, other: Any) -> "Expr":
        return self._binary("mul", other, swap=True)

    def __neg__(self) -> "Expr":
        return Expr({"op": "neg", "x": self.ir})

    def __pos__(self) -> "Expr":
        return self

    def _no_division(self, *_: Any) -> "Expr":
        raise PlanError("the expression language has no division (only +, -, * and unary minus)")

    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __pow__ = _no_division

    def isin(self, values: list) -> "Pred":
        values = list(values)
        kinds = {str if isinstance(v, str) else float for v in values}
        if not values or len(kinds) > 1 or any(isinstance(v, bool) or v is None for v in values):
            raise PlanError(f"isin takes a non-empty list of numbers or of strings, got {values!r}")
        return Pred({"op": "in", "x": self.ir, "values": values})

    def is_null(self) -> "Pred":
        return Pred({"op": "is_null", "x": self.ir})

    def not_null(self) -> "Pred":
        return ~self.is_null()


def _compare(name: str):
    def compare(self: Expr, other: Any) -> "Pred":
        return Pred({"op": "cmp", "cmp": CMPS[name], "a": self.ir, "b": lift(other).ir})
    return compare


for _name in CMPS:
    setattr(Expr, _name, _compare(_name))


class Pred(_Node):
    __slots__ = ()

    def __and__(self, other: "Pred") -> "Pred":
        return Pred({"op": "and", "a": self.ir, "b": _pred(other).ir})

    def __or__(self, other: "Pred") -> "Pred":
        return Pred({"op": "or", "a": self.ir, "b": _pred(other).ir})

    def __invert__(self) -> "Pred":
        return Pred({"op": "not", "x": self.ir})


def _pred(value: Any) -> Pred:
    if not isinstance(value, Pred):
        raise PlanError(f"& and | combine predicates (comparisons), not {value!r}")
    return value


def coalesce(a: Any, b: Any) -> Expr:
    """a where it is not null, else b."""
    return Expr({"op": "coalesce", "a": lift(a).ir, "b": lift(b).ir})


def regex(key: Expr, pattern: "str | Expr", flags: str = "") -> Pred:
    """Rows whose string key matches the pattern (re.search); the pattern may be a string param."""
    if not isinstance(key, Expr) or key.ir["op"] != "key_ref":
        raise PlanError(f"regex matches a key (Key.title), not {key!r}")
    if flags not in ("", "i"):
        raise PlanError(f"regex flags must be '' or 'i', got {flags!r}")
    if not isinstance(pattern, Expr | str) or (isinstance(pattern, Expr) and pattern.ir["op"] != "param_ref"):
        raise PlanError(f"a regex pattern is a string or a param (P.name), not {pattern!r}")
    return Pred({"op": "regex", "key": key.ir["key"], "pattern": pattern.ir if isinstance(pattern, Expr) else pattern,
                 "flags": flags})


class _Names:
    """Key.x and P.x: attribute access checks the name against the registry at once."""

    def __init__(self, what: str):
        self._what = what

    def __getattr__(self, name: str) -> Expr:
        if name.startswith("__"):
            raise AttributeError(name)
        if self._what == "key":
            return Expr({"op": "key_ref", "key": load().key(name).name})
        return Expr({"op": "param_ref", "param": load().param(name).name})


class EndpointRef(str):
    """An endpoint's registry name ("redis.default"), as EP.redis.default gives it."""


class _Endpoints:
    def __init__(self, kind: str | None = None):
        self._kind = kind

    def __getattr__(self, name: str) -> "_Endpoints | EndpointRef":
        if name.startswith("__"):
            raise AttributeError(name)
        if self._kind is None:
            return _Endpoints(name)
        return EndpointRef(load().endpoint(f"{self._kind}.{name}").name)


Key = _Names("key")
P = _Names("param")
EP = _Endpoints()
