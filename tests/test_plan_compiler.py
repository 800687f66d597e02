"""The plan compiler: the DSL's IR, build-time errors, and validate() naming the cause of every refusal."""

import copy
import json
import re
from pathlib import Path

import pytest

from shoal.plans import EP, Key, P, PlanError, coalesce, define_plan, regex
from shoal.plans.dsl import build, compile_file, dumps
from shoal.plans.validate import validate

ROOT = Path(__file__).parents[1]
ARTIFACT = json.loads((ROOT / "artifacts" / "plans" / "complex_dag.plan.json").read_text())
# complex_dag's nodes: n0 viewer, n1 follow, n2 media, n3 vm, n4 recommendation, n5 media, n6 vm,
# n7 concat (rhs n6), n8 sort, n9 take; e0 and e1 are Key.id * coalesce(P.weight, 0.1).


def key(name: str) -> dict:
    return {"op": "key_ref", "key": name}


def const(value) -> dict:
    return {"op": "const", "value": value}


def with_filter(artifact: dict, pred: dict) -> None:
    """Appends n10, a filter by pred p0 after n9, as the output."""
    artifact["pred_table"]["p0"] = pred
    artifact["nodes"].append({"node_id": "n10", "op": "filter", "inputs": ["n9"], "params": {"pred": "p0"}})
    artifact["outputs"] = ["n10"]


def mutated(mutate) -> dict:
    artifact = copy.deepcopy(ARTIFACT)
    mutate(artifact)
    return artifact


def node(artifact: dict, i: int) -> dict:
    return artifact["nodes"][i]


def test_the_shipped_artifact_is_valid_and_is_what_its_source_compiles_to():
    validate(copy.deepcopy(ARTIFACT))
    with_filter(artifact := copy.deepcopy(ARTIFACT), {"op": "cmp", "cmp": ">", "a": key("score"), "b": const(1)})
    validate(artifact)
    assert dumps(compile_file(ROOT / "plans" / "complex_dag.py")) == (ROOT / "artifacts" / "plans" /
                                                                       "complex_dag.plan.json").read_text()


CASES = [
    ("unknown op", lambda a: node(a, 1).update(op="nope"), "unknown op 'nope'"),
    ("param of the wrong type", lambda a: node(a, 9)["params"].update(count="50"),
     "node n9 (take): param count must be an int, got '50'"),
    ("float for an int", lambda a: node(a, 9)["params"].update(count=2.5), "param count must be an int, got 2.5"),
    ("bool for an int", lambda a: node(a, 9)["params"].update(count=True), "param count must be an int, got True"),
    ("count below its minimum", lambda a: node(a, 9)["params"].update(count=0),
     "node n9 (take): param count must be at least 1, got 0"),
    ("fanout below its minimum", lambda a: node(a, 1)["params"].update(fanout=0),
     "node n1 (follow): param fanout must be at least 1, got 0"),
    ("missing required param", lambda a: node(a, 9)["params"].pop("count"), "node n9 (take): missing param count"),
    ("unknown param", lambda a: node(a, 9)["params"].update(limit=3), "node n9 (take): unknown param(s) ['limit']"),
    ("extra node field", lambda a: node(a, 1).update(extra=1), "a node has exactly the fields"),
    ("missing input node", lambda a: node(a, 1).update(inputs=["n42"]),
     "node n1 (follow): missing input node(s) ['n42']"),
    ("too many inputs", lambda a: node(a, 1).update(inputs=["n0", "n0"]), "node n1 (follow): takes 1 input(s)"),
    ("an input to a source", lambda a: node(a, 0).update(inputs=["n1"]), "node n0 (viewer): takes 0 input(s)"),
    ("duplicate node_id", lambda a: node(a, 1).update(node_id="n0"), "node_id must be unique"),
    ("missing rhs node", lambda a: node(a, 7)["params"].update(rhs="n42"),
     "node n7 (concat): param rhs must be a node"),
    ("cycle through concat's rhs", lambda a: node(a, 4).update(inputs=["n7"]), "the plan has a cycle through nodes"),
    ("unknown key in an expression", lambda a: a["expr_table"]["e0"]["a"].update(key="nope"),
     "expr e0: unknown key 'nope'"),
    ("unknown param in an expression", lambda a: a["expr_table"]["e1"]["b"]["a"].update(param="nope"),
     "expr e1: unknown param 'nope'"),
    ("unknown expression op", lambda a: a["expr_table"]["e0"].update(op="div"),
     "expr e0: unknown or malformed expression"),
    ("missing expression", lambda a: node(a, 3)["params"].update(expr="e9"),
     "node n3 (vm): param expr must be an expr, got 'e9'"),
    ("unknown endpoint", lambda a: node(a, 0)["params"].update(endpoint="redis.nope"),
     "node n0 (viewer): param endpoint: unknown endpoint 'redis.nope'"),
    ("vm writes a read-only key", lambda a: node(a, 3)["params"].update(out_key="id"),
     "node n3 (vm): param out_key: key 'id' is not a writable float key"),
    ("vm writes a string key", lambda a: node(a, 6)["params"].update(out_key="country"),
     "node n6 (vm): param out_key: key 'country' is not a writable float key"),
    ("vm writes an unknown key", lambda a: node(a, 3)["params"].update(out_key="nope"),
     "node n3 (vm): param out_key: unknown key 'nope'"),
    ("vm writes a string", lambda a: a["expr_table"].update(e0=key("country")),
     "node n3 (vm): param expr: expression e0 gives a string"),
    ("sort by an unknown key", lambda a: node(a, 8)["params"].update(key="nope"),
     "node n8 (sort): param key: unknown key 'nope'"),
    ("a string key in arithmetic", lambda a: a["expr_table"]["e0"].update(a=key("title")),
     "expr e0: mul takes numbers, not strings"),
    ("a string constant in coalesce", lambda a: a["expr_table"]["e1"]["b"].update(b=const("x")),
     "expr e1: coalesce takes numbers, not strings"),
    ("negating a string", lambda a: a["expr_table"].update(e0={"op": "neg", "x": key("country")}),
     "expr e0: neg takes numbers, not strings"),
    ("comparing a number with a string", lambda a: with_filter(a, {"op": "cmp", "cmp": "==", "a": key("score"),
                                                                   "b": const("US")}),
     "pred p0: cannot compare a number with a string"),
    ("isin with values of the other kind", lambda a: with_filter(a, {"op": "in", "x": key("country"), "values": [1]}),
     "pred p0: in needs string values, got [1]"),
    ("a bad regex", lambda a: with_filter(a, {"op": "regex", "key": "title", "pattern": "(", "flags": ""}),
     "pred p0: bad regex '('"),
    ("a regex on a float key", lambda a: with_filter(a, {"op": "regex", "key": "score", "pattern": "x", "flags": ""}),
     "pred p0: regex needs a string key, got 'score'"),
    ("a regex on a float param", lambda a: with_filter(a, {"op": "regex", "key": "title", "flags": "",
                                                          "pattern": {"op": "param_ref", "param": "weight"}}),
     "pred p0: a regex pattern is a string or a string param"),
    ("unknown predicate op", lambda a: with_filter(a, {"op": "xor", "a": key("id"), "b": key("id")}),
     "pred p0: unknown or malformed predicate"),
    ("missing predicate", lambda a: (with_filter(a, {"op": "is_null", "x": key("id")}), a["pred_table"].clear()),
     "node n10 (filter): param pred must be a pred, got 'p0'"),
    ("unknown top-level field", lambda a: a.update(extra=1), "unknown plan field(s): extra"),
    ("schema_version 2", lambda a: a.update(schema_version=2), "schema_version must be 1, got 2"),
    ("a bad plan name", lambda a: a.update(plan_name="complex-dag"), "plan_name must be letters, digits and _"),
    ("no nodes", lambda a: a.update(nodes=[]), "nodes must be a non-empty list"),
    ("outputs naming a missing node", lambda a: a.update(outputs=["n99"]),
     "outputs must list existing nodes, got ['n99']"),
    ("no outputs", lambda a: a.update(outputs=[]), "outputs must list existing nodes, got []"),
    ("sort order up", lambda a: node(a, 8)["params"].update(order="up"),
     "node n8 (sort): param order must be one of ('asc', 'desc'), got 'up'"),
]


@pytest.mark.parametrize(("mutate", "cause"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_validation_error_names_its_cause(mutate, cause):
    with pytest.raises(PlanError, match=re.escape(cause)):
        validate(mutated(mutate))


def test_a_cycle_through_a_node_ref_param_names_the_nodes_on_it():
    with pytest.raises(PlanError, match="cycle") as raised:
        validate(mutated(lambda a: node(a, 4).update(inputs=["n7"])))  # n4 -> n5 -> n6 -rhs-> n7 -> n4
    named = re.findall(r"'(n\d+)'", str(raised.value))
    assert {"n4", "n5", "n6", "n7"} <= set(named)
    assert set(named) == {"n4", "n5", "n6", "n7"}, f"n8 and n9 only follow the cycle: {raised.value}"


WRONG_SHAPES = [
    ("op is a list", lambda a: node(a, 1).update(op=["follow"]), "unknown op"),
    ("an input is a list", lambda a: node(a, 1).update(inputs=[["n0"]]), "takes 1 input(s), got [['n0']]"),
    ("node_id is a list", lambda a: node(a, 1).update(node_id=["n1"]), "node_id"),
    ("a key name is a list", lambda a: a["expr_table"]["e0"]["a"].update(key=["id"]), "unknown key"),
    ("a param value is a list", lambda a: node(a, 9)["params"].update(count=[50]), "param count must be an int"),
]


@pytest.mark.parametrize(("mutate", "cause"), [c[1:] for c in WRONG_SHAPES], ids=[c[0] for c in WRONG_SHAPES])
def test_json_values_of_the_wrong_shape_are_refused_as_plan_errors(mutate, cause):
    with pytest.raises(PlanError, match=re.escape(cause)):
        validate(mutated(mutate))


def plan(body) -> dict:
    return build(define_plan(name="t", build=body))


def foreign_node():
    """A node of another, finished plan."""
    nodes = []
    plan(lambda ctx: nodes.append(ctx.viewer(endpoint=EP.redis.default)) or nodes[0])
    return nodes[0]


def test_dsl_errors_name_their_cause_at_build_time():
    viewer = {"endpoint": EP.redis.default}
    for make, cause in [
        (lambda: Key.nope, "unknown key 'nope'"),
        (lambda: P.nope, "unknown param 'nope'"),
        (lambda: EP.redis.nope, "unknown endpoint 'redis.nope'"),
        (lambda: EP.kafka.default, "unknown endpoint 'kafka.default'"),
        (lambda: Key.id / 2, "no division"),
        (lambda: 2 / Key.id, "no division"),
        (lambda: Key.id // 2, "no division"),
        (lambda: Key.id ** 2, "no division"),
        (lambda: 1 < Key.id < 3, "no truth value"),
        (lambda: Key.score > 1 and Key.score < 2, "no truth value"),
        (lambda: Key.score * float("inf"), "must be finite"),
        (lambda: Key.score + True, "an expression takes numbers, strings, None"),
        (lambda: (Key.score > 1) & Key.score, "& and | combine predicates"),
        (lambda: Key.country.isin([]), "isin takes a non-empty list"),
        (lambda: Key.country.isin(["US", 1]), "isin takes a non-empty list"),
        (lambda: regex(P.blocklist_regex, "x"), "regex matches a key"),
        (lambda: regex(Key.title, "x", "g"), "regex flags must be '' or 'i'"),
        (lambda: regex(Key.title, Key.country), "a regex pattern is a string or a param"),
        (lambda: define_plan(name="bad-name", build=lambda ctx: None), "a plan name is letters, digits and _"),
        (lambda: plan(lambda ctx: ctx.viewer(**viewer).viewer(**viewer)), "viewer is called on the plan context"),
        (lambda: plan(lambda ctx: ctx.follow(**viewer)), "follow is called on a node"),
        (lambda: plan(lambda ctx: ctx.nope()), "unknown op 'nope'"),
        (lambda: plan(lambda ctx: ctx.viewer(**viewer).nope()), "unknown op 'nope'"),
        (lambda: plan(lambda ctx: 42), "plan t: build must return a node, got 42"),
        (lambda: plan(lambda ctx: ctx.viewer(**viewer).sort(key=Key.score * 2)), "sort.key: expected key"),
        (lambda: plan(lambda ctx: ctx.viewer(**viewer).filter(pred=Key.score)), "filter.pred: expected pred"),
        (lambda: plan(lambda ctx: ctx.viewer(**viewer).take(count=Key.id)), "take.count: expected int"),
        (lambda: plan(lambda ctx: ctx.viewer(**viewer).take(n=Key.id)), "take.n: expected no such param"),
        (lambda: plan(lambda ctx: ctx.viewer(**viewer).take(n=3)), "node n1 (take): unknown param(s) ['n']"),
        (lambda: plan(lambda ctx: ctx.viewer(**viewer).take(count=0)), "node n1 (take): param count must be at least"),
        (lambda: plan(lambda ctx: ctx.viewer(**viewer).concat(rhs=foreign_node())),
         "concat.rhs: the node belongs to another plan"),
    ]:
        with pytest.raises(PlanError, match=re.escape(cause)):
            make()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


TINY = '''from shoal.plans import EP, Key, define_plan


def build(ctx):  # v1
    return ctx.viewer(endpoint=EP.redis.default).follow(endpoint=EP.redis.default).sort(key=Key.id).take(count=3)


plan = define_plan(name="tiny", build=build)
'''


def test_compile_file_errors_name_their_cause(tmp_path):
    for path, cause in [
        (write(tmp_path / "other.py", TINY), "the plan is named 'tiny'; its file must be tiny.py"),
        (write(tmp_path / "empty.py", "from shoal.plans import define_plan\n"),
         "expected one define_plan(...), found 0"),
        (write(tmp_path / "tiny.py", TINY + 'again = define_plan(name="tiny", build=build)\n'),
         "expected one define_plan(...), found 2"),
        (write(tmp_path / "bad" / "tiny.py", TINY.replace("Key.id", "Key.nope")), "unknown key 'nope'"),
        (write(tmp_path / "worse" / "tiny.py", TINY.replace("count=3", "count=-1")),
         "node n3 (take): param count must be at least 1, got -1"),
        (tmp_path / "missing.py", "cannot read plan source"),
    ]:
        with pytest.raises(PlanError, match=re.escape(cause)):
            compile_file(path)


def test_the_dsl_builds_the_expected_ir():
    assert (Key.id * coalesce(P.weight, 0.1)).ir == {
        "op": "mul", "a": key("id"),
        "b": {"op": "coalesce", "a": {"op": "param_ref", "param": "weight"}, "b": const(0.1)}}
    assert (-Key.score + 1).ir == {"op": "add", "a": {"op": "neg", "x": key("score")}, "b": const(1)}
    assert (2 - Key.score).ir == {"op": "sub", "a": const(2), "b": key("score")}
    assert (3 * Key.score).ir == {"op": "mul", "a": const(3), "b": key("score")}
    assert (+Key.score).ir == key("score")
    assert ((Key.score > 0.5) & ~Key.country.isin(["US"])).ir == {
        "op": "and", "a": {"op": "cmp", "cmp": ">", "a": key("score"), "b": const(0.5)},
        "b": {"op": "not", "x": {"op": "in", "x": key("country"), "values": ["US"]}}}
    assert ((Key.score <= 1) | Key.title.is_null()).ir == {
        "op": "or", "a": {"op": "cmp", "cmp": "<=", "a": key("score"), "b": const(1)},
        "b": {"op": "is_null", "x": key("title")}}
    assert (1 < Key.id).ir == {"op": "cmp", "cmp": ">", "a": key("id"), "b": const(1)}  # noqa: SIM300
    assert regex(Key.title, P.blocklist_regex, "i").ir == {
        "op": "regex", "key": "title", "pattern": {"op": "param_ref", "param": "blocklist_regex"}, "flags": "i"}
    assert regex(Key.title, "^a").ir == {"op": "regex", "key": "title", "pattern": "^a", "flags": ""}
    assert (Key.country == None).ir == {"op": "cmp", "cmp": "==", "a": key("country"), "b": {"op": "null"}}  # noqa: E711
    assert Key.country.not_null().ir == {"op": "not", "x": {"op": "is_null", "x": key("country")}}
    assert EP.redis.default == "redis.default"


def test_a_filter_sort_take_plan_compiles_and_validates():
    def body(ctx):
        users = ctx.viewer(endpoint=EP.redis.default).follow(endpoint=EP.redis.default, fanout=20)
        return (users.vm(out_key=Key.score, expr=-Key.id + 1)
                .filter(pred=(Key.score > 0.5) & ~Key.country.isin(["US"]))
                .sort(key=Key.score, order="desc").take(count=5))

    artifact = plan(body)
    assert [(n["node_id"], n["op"], n["inputs"]) for n in artifact["nodes"]] == [
        ("n0", "viewer", []), ("n1", "follow", ["n0"]), ("n2", "vm", ["n1"]), ("n3", "filter", ["n2"]),
        ("n4", "sort", ["n3"]), ("n5", "take", ["n4"])]
    assert [n["params"] for n in artifact["nodes"]] == [
        {"endpoint": "redis.default"}, {"endpoint": "redis.default", "fanout": 20}, {"out_key": "score", "expr": "e0"},
        {"pred": "p0"}, {"key": "score", "order": "desc"}, {"count": 5}]
    assert artifact["expr_table"] == {"e0": (-Key.id + 1).ir}
    assert artifact["pred_table"] == {"p0": ((Key.score > 0.5) & ~Key.country.isin(["US"])).ir}
    assert artifact["outputs"] == ["n5"] and artifact["plan_name"] == "t" and artifact["schema_version"] == 1
    validate(json.loads(dumps(artifact)))


def test_compiling_is_deterministic_and_the_digest_follows_the_source(tmp_path):
    source = write(tmp_path / "tiny.py", TINY)
    first, second = compile_file(source), compile_file(source)
    assert dumps(first) == dumps(second)
    assert dumps(first).encode() == dumps(json.loads(dumps(first))).encode()
    digest = first["built_by"]["source_digest"]
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    changed = compile_file(write(source, TINY.replace("# v1", "# v2")))
    assert changed["built_by"]["source_digest"] != digest
    assert {**changed, "built_by": None} == {**first, "built_by": None}
