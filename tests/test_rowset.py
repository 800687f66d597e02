import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.plans import evaluate as ev
from shoal.plans.rowset import Batch, Column, RowSet


def key(name: str) -> dict:
    return {"op": "key_ref", "key": name}


def const(value) -> dict:
    return {"op": "const", "value": value}


def cmp(op: str, a: dict, b: dict) -> dict:
    return {"op": "cmp", "cmp": op, "a": a, "b": b}


NULL = {"op": "null"}


def rows() -> RowSet:
    return RowSet(Batch.build([10, 11, 12, 13, 14], floats={"score": [3.0, None, 1.0, 3.0, 2.0]},
                              strings={"title": ["b", "a", None, "b", "C"]}))


def values(column: Column) -> list:
    return [v if ok else None for v, ok in zip(column.values.tolist(), column.valid.tolist(), strict=True)]


def test_build_freezes_arrays_and_reads_nulls():
    batch = rows().batch
    assert batch.ids.dtype == np.int64 and len(batch) == 5
    assert batch.columns["score"].values.dtype == np.float64 and batch.columns["title"].values.dtype == object
    assert values(batch.columns["title"]) == ["b", "a", None, "b", "C"]
    for array in (batch.ids, batch.columns["score"].values, batch.columns["score"].valid):
        assert not array.flags.writeable
    with pytest.raises(TypeError):
        batch.columns["x"] = batch.columns["score"]  # type: ignore[index]
    with pytest.raises(ValueError, match="'id'"):
        Batch.build([1], floats={"id": [1.0]})


def test_active_combines_selection_and_order():
    batch = rows().batch
    assert RowSet(batch).active().tolist() == [0, 1, 2, 3, 4]
    assert RowSet(batch, selection=np.array([3, 1])).active().tolist() == [3, 1]
    assert RowSet(batch, order=np.array([4, 3, 2, 1, 0])).active().tolist() == [4, 3, 2, 1, 0]
    both = RowSet(batch, selection=np.array([1, 3, 4]), order=np.array([4, 3, 2, 1, 0]))
    assert both.active().tolist() == [4, 3, 1] and len(both) == 3


def test_filter_take_and_records():
    kept = rows().filter(np.array([True, False, True, True, True])).take(3)
    assert kept.records() == [{"id": 10, "score": 3.0, "title": "b"}, {"id": 12, "score": 1.0},
                              {"id": 13, "score": 3.0, "title": "b"}]
    assert kept.records(["title", "missing"]) == [{"id": 10, "title": "b"}, {"id": 12}, {"id": 13, "title": "b"}]
    assert isinstance(kept.records()[0]["score"], float)
    with pytest.raises(ValueError):
        kept.filter(np.array([True]))


def test_sort_is_stable_with_nulls_last_both_ways():
    assert [r["id"] for r in rows().sort("score").records()] == [12, 14, 10, 13, 11]
    assert [r["id"] for r in rows().sort("score", descending=True).records()] == [10, 13, 14, 12, 11]
    assert [r["id"] for r in rows().sort("title").records()] == [14, 11, 10, 13, 12]
    assert [r["id"] for r in rows().sort("title", descending=True).records()] == [10, 13, 11, 14, 12]
    assert [r["id"] for r in rows().sort("id", descending=True).records()] == [14, 13, 12, 11, 10]
    assert [r["id"] for r in rows().sort("missing").records()] == [10, 11, 12, 13, 14]


def test_sort_keeps_selection_and_then_filters():
    selected = rows().take(4).sort("score", descending=True)
    assert [r["id"] for r in selected.records()] == [10, 13, 12, 11]
    assert sorted(selected.order.tolist()) == [0, 1, 2, 3, 4]
    narrowed = selected.filter(np.array([False, True, True, False]))
    assert [r["id"] for r in narrowed.sort("id").records()] == [12, 13]


def test_sort_take_and_filter_copy_no_column():
    base = rows()
    for derived in (base.sort("score"), base.sort("title", True).take(2), base.filter(np.ones(5, dtype=bool)),
                    base.take(3).sort("id")):
        assert derived.batch is base.batch
        assert derived.batch.ids is base.batch.ids
        for name, column in base.batch.columns.items():
            assert derived.batch.columns[name] is column
    sorted_rows = base.take(3).sort("score")
    assert sorted_rows.selection is not None and sorted_rows.sort("title").selection is sorted_rows.selection


def test_with_column_shares_the_rest_and_scatters_to_the_batch():
    base = rows().take(3).sort("score")
    score = base.batch.columns["score"]
    added = base.with_column("final", Column(np.array([1.0, 2.0, 3.0]), np.array([True, True, False])))
    assert added.batch.ids is base.batch.ids and added.batch.columns["score"] is score
    assert added.selection is base.selection and added.order is base.order
    assert [r.get("final") for r in added.records()] == [1.0, 2.0, None]
    assert values(added.batch.columns["final"]) == [2.0, None, 1.0, None, None]
    dense = rows().with_column("final", score)
    assert dense.batch.columns["final"] is score


def test_concat_unions_columns_and_rejects_mixed_kinds():
    other = RowSet(Batch.build([20, 21], floats={"other": [5.0, None]}))
    joined = rows().take(2).sort("id", descending=True).concat(other)
    assert joined.selection is None and joined.order is None and len(joined.batch) == 4
    assert joined.records() == [{"id": 11, "title": "a"}, {"id": 10, "score": 3.0, "title": "b"},
                                {"id": 20, "other": 5.0}, {"id": 21}]
    assert joined.batch.columns["title"].is_string
    with pytest.raises(ValueError, match="'title'"):
        rows().concat(RowSet(Batch.build([1], floats={"title": [1.0]})))


def test_value_ops_and_null_propagation():
    rs = rows().take(4)
    params = {"w": 2, "name": "b", "unset": None}
    assert values(ev.evaluate(key("id"), rs, params)) == [10.0, 11.0, 12.0, 13.0]
    assert values(ev.evaluate(key("missing"), rs, params)) == [None] * 4
    assert values(ev.evaluate(const(1.5), rs, params)) == [1.5] * 4
    assert values(ev.evaluate(NULL, rs, params)) == [None] * 4
    assert values(ev.evaluate({"op": "param_ref", "param": "w"}, rs, params)) == [2.0] * 4
    assert values(ev.evaluate({"op": "param_ref", "param": "unset"}, rs, params)) == [None] * 4
    assert values(ev.evaluate({"op": "param_ref", "param": "absent"}, rs, params)) == [None] * 4
    assert ev.evaluate({"op": "param_ref", "param": "name"}, rs, params).is_string
    score = key("score")
    assert values(ev.evaluate({"op": "add", "a": score, "b": const(1)}, rs, {})) == [4.0, None, 2.0, 4.0]
    assert values(ev.evaluate({"op": "sub", "a": score, "b": key("id")}, rs, {})) == [-7.0, None, -11.0, -10.0]
    assert values(ev.evaluate({"op": "mul", "a": score, "b": NULL}, rs, {})) == [None] * 4
    assert values(ev.evaluate({"op": "neg", "x": score}, rs, {})) == [-3.0, None, -1.0, -3.0]
    assert values(ev.evaluate({"op": "coalesce", "a": score, "b": const(0)}, rs, {})) == [3.0, 0.0, 1.0, 3.0]
    assert values(ev.evaluate({"op": "coalesce", "a": key("title"), "b": const("?")}, rs, {})) == ["b", "a", "?", "b"]


def test_predicates_and_null_rules():
    rs = rows()
    score, title = key("score"), key("title")

    def mask(pred: dict, params: dict | None = None) -> list[bool]:
        result = ev.test(pred, rs, params or {})
        assert result.dtype == bool and len(result) == len(rs)
        return result.tolist()

    assert mask(cmp(">", score, const(1.5))) == [True, False, False, True, True]
    assert mask(cmp("!=", score, const(3))) == [False, False, True, False, True]
    assert mask(cmp("<=", title, const("b"))) == [True, True, False, True, True]
    assert mask(cmp("==", score, NULL)) == [False, True, False, False, False]
    assert mask(cmp("!=", NULL, title)) == [True, True, False, True, True]
    assert mask(cmp("<", score, NULL)) == [False] * 5
    assert mask(cmp("==", score, {"op": "param_ref", "param": "p"})) == [False] * 5
    assert mask({"op": "is_null", "x": title}) == [False, False, True, False, False]
    assert mask({"op": "in", "x": title, "values": ["b", "C"]}) == [True, False, False, True, True]
    assert mask({"op": "in", "x": score, "values": [1, 2]}) == [False, False, True, False, True]
    both = {"op": "and", "a": cmp(">", score, const(1.5)), "b": cmp("==", title, const("b"))}
    assert mask(both) == [True, False, False, True, False]
    assert mask({"op": "or", "a": both, "b": cmp("==", score, NULL)}) == [True, True, False, True, False]
    assert mask({"op": "not", "x": both}) == [False, True, True, False, True]


def test_regex_matches_each_distinct_value_once(monkeypatch):
    searched = []
    compile_ = re.compile

    class Counting:
        def __init__(self, pattern, flags=0):
            self.pattern = compile_(pattern, flags)

        def search(self, value):
            searched.append(value)
            return self.pattern.search(value)

    monkeypatch.setattr(ev.re, "compile", Counting)
    rs = rows()
    pred = {"op": "regex", "key": "title", "pattern": "^B$", "flags": "i"}
    assert ev.test(pred, rs, {}).tolist() == [True, False, False, True, False]
    assert sorted(searched) == ["C", "a", "b"]
    by_param = {**pred, "pattern": {"op": "param_ref", "param": "re"}, "flags": ""}
    assert ev.test(by_param, rs, {"re": "a|C"}).tolist() == [False, True, False, False, True]
    assert ev.test(by_param, rs, {}).tolist() == [False] * 5
    assert ev.test({**pred, "key": "missing"}, rs, {}).tolist() == [False] * 5


def test_unknown_ops_are_named():
    with pytest.raises(ValueError, match="'div'"):
        ev.evaluate({"op": "div", "a": const(1), "b": const(2)}, rows(), {})
    with pytest.raises(ValueError, match="'xor'"):
        ev.test({"op": "xor", "a": NULL, "b": NULL}, rows(), {})
    with pytest.raises(ValueError, match="'=~'"):
        ev.test(cmp("=~", const(1), const(1)), rows(), {})


# Property test: random chains of operators against a plain-Python model on lists of dicts.

SCORES = st.one_of(st.none(), st.sampled_from([-1.0, 0.0, 2.5]), st.floats(-5, 5, allow_nan=False))
TITLES = st.one_of(st.none(), st.sampled_from(["a", "b", "B", "ab", ""]))


@st.composite
def batches(draw) -> tuple[RowSet, list[dict]]:
    n = draw(st.integers(0, 8))
    ids = draw(st.lists(st.integers(-50, 50), min_size=n, max_size=n))
    floats = {"score": draw(st.lists(SCORES, min_size=n, max_size=n))} if draw(st.booleans()) or n == 0 else {}
    strings = {"title": draw(st.lists(TITLES, min_size=n, max_size=n))} if draw(st.integers(0, 3)) else {}
    model = [{"id": i} for i in ids]
    for name, column in {**floats, **strings}.items():
        for row, value in zip(model, column, strict=True):
            if value is not None:
                row[name] = value
    return RowSet(Batch.build(ids, floats, strings)), model


PREDICATES = [
    (lambda c: cmp(">", key("score"), const(c)), lambda c, r: "score" in r and r["score"] > c),
    (lambda c: cmp("<=", key("score"), const(c)), lambda c, r: "score" in r and r["score"] <= c),
    (lambda c: cmp("==", key("score"), NULL), lambda c, r: "score" not in r),
    (lambda c: cmp("!=", key("title"), NULL), lambda c, r: "title" in r),
    (lambda c: {"op": "not", "x": cmp("<", key("title"), const("b"))}, lambda c, r: not ("title" in r
                                                                                         and r["title"] < "b")),
]

STEPS = st.one_of(
    st.tuples(st.just("filter"), st.integers(0, len(PREDICATES) - 1), st.sampled_from([-1.0, 0.0, 1.0])),
    st.tuples(st.just("sort"), st.sampled_from(["score", "title", "id", "missing"]), st.booleans()),
    st.tuples(st.just("take"), st.integers(0, 9)),
    st.tuples(st.just("concat"), batches(), st.booleans(), st.integers(0, 9)),
)


def model_sort(model: list[dict], name: str, descending: bool) -> list[dict]:
    present = sorted((r for r in model if name in r), key=lambda r: r[name], reverse=descending)
    return present + [r for r in model if name not in r]


@settings(max_examples=200, deadline=None)
@given(batches(), st.lists(STEPS, max_size=6))
def test_operator_chains_match_a_list_model(start, steps):
    rs, model = start
    for step in steps:
        if step[0] == "filter":
            build, reference = PREDICATES[step[1]]
            rs = rs.filter(ev.test(build(step[2]), rs, {}))
            model = [r for r in model if reference(step[2], r)]
        elif step[0] == "sort":
            rs, model = rs.sort(step[1], step[2]), model_sort(model, step[1], step[2])
        elif step[0] == "take":
            rs, model = rs.take(step[1]), model[:step[1]]
        else:
            (other, other_model), descending, count = step[1:]
            other = other.sort("title", descending).take(count)
            rs, model = rs.concat(other), model + model_sort(other_model, "title", descending)[:count]
        assert len(rs) == len(model)
        assert rs.records() == model
        ids = ev.evaluate(key("id"), rs, {})
        assert ids.values.tolist() == [float(r["id"]) for r in model]
