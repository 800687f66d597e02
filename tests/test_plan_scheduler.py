"""The plan scheduler on synthetic steps: dependency order, overlap, fail-fast, node timeouts, the request
deadline, late completions and shutdown; then the real sort and take operators through bind."""

import asyncio
import threading
import time

import numpy as np
import pytest

from shoal.plans import cpu_ops, ops
from shoal.plans.context import Context, PlanRequest, Services
from shoal.plans.rowset import Batch, RowSet
from shoal.plans.runtime import Plans, bind
from shoal.plans.scheduler import NODE_TIMEOUT, REQUEST_DEADLINE, Executor, NodeError, Step, fuse
from shoal.plans.validate import validate


@pytest.fixture
def executor():
    executor = Executor(cpu_threads=2)
    executor.calls = []
    executor.on_late = lambda: executor.calls.append(executor.late)
    yield executor
    executor.close()


def sleeper(seconds: float, log: list, name: str):
    async def step(inputs: list) -> str:
        log.append(f"{name} start")
        await asyncio.sleep(seconds)
        log.append(f"{name} end")
        return name
    return step


def test_dependencies_run_in_order_and_independent_io_overlaps(executor):
    log = []

    async def b(inputs: list) -> str:
        await asyncio.sleep(0.1)
        return f"b({inputs[0]})"

    async def c(inputs: list) -> str:
        await asyncio.sleep(0.1)
        return f"c({inputs[0]})"

    steps = [Step("d", ("b", "c"), False, lambda inputs: log.append("d") or f"d{inputs}"),
             Step("b", ("a",), True, b), Step("c", ("a",), True, c),
             Step("a", (), False, lambda inputs: log.append("a") or "a")]

    async def go() -> tuple[dict, float]:
        started = time.perf_counter()
        results = await executor.run(steps, ["d", "a"])
        return results, time.perf_counter() - started

    results, wall = asyncio.run(go())
    assert results == {"d": "d['b(a)', 'c(a)']", "a": "a"}
    assert log == ["a", "d"]
    assert 0.1 <= wall < 0.19, f"wall {wall:.3f} s: b and c should overlap"


def test_cpu_steps_run_on_the_pool_and_io_steps_on_the_loop_thread(executor):
    async def on_loop(inputs: list) -> str:
        return threading.current_thread().name

    steps = [Step("cpu", (), False, lambda inputs: threading.current_thread().name), Step("io", (), True, on_loop),
             Step("cpu2", ("io",), False, lambda inputs: threading.current_thread().name)]
    results = asyncio.run(executor.run(steps, ["cpu", "io", "cpu2"]))
    assert results["cpu"].startswith("shoal-plan") and results["cpu2"].startswith("shoal-plan")
    assert results["io"] == threading.current_thread().name


@pytest.mark.parametrize("io", [True, False], ids=["io", "cpu"])
def test_the_first_error_stops_new_work_and_the_run_waits_for_work_in_flight(executor, io):
    log = []

    def fail(inputs: list):
        raise ValueError("boom")

    async def fail_io(inputs: list):
        fail(inputs)

    steps = [Step("a", (), io, fail_io if io else fail), Step("b", (), True, sleeper(0.2, log, "b")),
             Step("c", ("b",), False, lambda inputs: log.append("c")),
             Step("d", ("c",), True, sleeper(0, log, "d"))]

    async def go() -> float:
        started = time.perf_counter()
        with pytest.raises(NodeError, match=r"^node a: boom$"):
            await executor.run(steps, ["c"])
        return time.perf_counter() - started

    elapsed = asyncio.run(go())
    assert log == ["b start", "b end"]
    assert elapsed >= 0.2


def test_a_later_error_does_not_replace_the_first(executor):
    async def fails_later(inputs: list):
        await asyncio.sleep(0.05)
        raise RuntimeError("second")

    def fails_first(inputs: list):
        raise RuntimeError("first")

    steps = [Step("slow", (), True, fails_later), Step("fast", (), False, fails_first)]
    with pytest.raises(NodeError, match=r"^node fast: first$"):
        asyncio.run(executor.run(steps, ["slow"]))


async def times_out(executor, steps: list, outputs: list, **limits) -> float:
    """Runs steps that must overrun; the seconds until the timeout answered."""
    started = time.perf_counter()
    with pytest.raises(NodeError) as raised:
        await executor.run(steps, outputs, **limits)
    assert str(raised.value) == NODE_TIMEOUT
    return time.perf_counter() - started


@pytest.mark.parametrize("io", [True, False], ids=["io", "cpu"])
def test_a_node_timeout_answers_at_once_and_the_late_result_is_counted(executor, io):
    finished = []

    def slow(inputs: list) -> str:
        time.sleep(0.3)
        finished.append("cpu")
        return "late"

    async def slow_io(inputs: list) -> str:
        await asyncio.sleep(0.3)
        finished.append("io")
        return "late"

    steps = [Step("a", (), io, slow_io if io else slow), Step("b", ("a",), False, lambda inputs: finished.append("b"))]

    async def go() -> float:
        elapsed = await times_out(executor, steps, ["b"], node_timeout_ms=50)
        assert finished == [] and executor.late == 0 and executor.calls == []
        await executor.drain()
        return elapsed

    elapsed = asyncio.run(go())
    assert 0.05 <= elapsed < 0.25, f"answered after {elapsed:.3f} s"
    assert finished == ["io" if io else "cpu"]
    assert executor.late == 1 and executor.calls == [1]


def test_a_late_failure_is_counted_too(executor):
    async def fails_late(inputs: list):
        await asyncio.sleep(0.1)
        raise RuntimeError("too late to matter")

    async def go() -> None:
        with pytest.raises(NodeError, match=f"^{NODE_TIMEOUT}$"):
            await executor.run([Step("a", (), True, fails_late)], ["a"], node_timeout_ms=20)
        await executor.drain()

    asyncio.run(go())
    assert executor.late == 1 and executor.calls == [1]


def test_the_request_deadline_times_out_the_running_step_and_starts_no_more(executor):
    log = []
    steps = [Step("s1", (), True, sleeper(0.05, log, "s1")), Step("s2", ("s1",), True, sleeper(0.05, log, "s2")),
             Step("s3", ("s2",), True, sleeper(0.05, log, "s3"))]

    async def go() -> float:
        elapsed = await times_out(executor, steps, ["s3"], deadline_ms=80)
        assert log == ["s1 start", "s1 end", "s2 start"]
        await executor.drain()
        return elapsed

    elapsed = asyncio.run(go())
    assert 0.08 <= elapsed < 0.3, f"answered after {elapsed:.3f} s"
    assert log == ["s1 start", "s1 end", "s2 start", "s2 end"]
    assert executor.late == 1


def test_a_deadline_passed_before_a_step_spawns_is_request_deadline_exceeded(executor):
    log = []

    async def hogs_the_loop(inputs: list) -> str:
        time.sleep(0.1)  # blocks the loop past the deadline, so the node's own timer cannot fire first
        return "done"

    steps = [Step("a", (), True, hogs_the_loop), Step("b", ("a",), False, lambda inputs: log.append("b"))]
    with pytest.raises(NodeError, match=f"^{REQUEST_DEADLINE}$"):
        asyncio.run(executor.run(steps, ["b"], deadline_ms=50))
    assert log == [] and executor.late == 0

    async def call_after_deadline() -> None:
        with pytest.raises(NodeError, match=f"^{REQUEST_DEADLINE}$"):
            await executor._call(Step("x", (), False, lambda inputs: log.append("x")), [], time.monotonic(), None)
        assert await executor._call(Step("y", (), False, lambda inputs: "y"), [], time.monotonic() + 1, None) == "y"

    asyncio.run(call_after_deadline())
    assert log == []


def test_a_cancelled_run_starts_no_more_steps(executor):
    log = []
    steps = [Step("a", (), True, sleeper(0.05, log, "a")), Step("b", ("a",), True, sleeper(0, log, "b"))]

    async def go() -> None:
        run = asyncio.create_task(executor.run(steps, ["b"]))
        await asyncio.sleep(0.01)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        await asyncio.sleep(0.1)

    asyncio.run(go())
    assert "b start" not in log, f"the cancelled run went on: {log}"


def test_close_waits_for_late_cpu_work_and_plans_close_counts_it_first(tmp_path):
    finished, calls = [], []

    def slow(inputs: list) -> None:
        time.sleep(0.3)
        finished.append(1)

    steps = [Step("a", (), False, slow)]

    async def close_without_drain(executor: Executor) -> None:
        with pytest.raises(NodeError, match=NODE_TIMEOUT):
            await executor.run(steps, ["a"], node_timeout_ms=50)
        assert finished == []
        executor.close()
        assert finished == [1]
        await executor.drain()  # the completion still lands while the loop runs

    executor = Executor(1, on_late=lambda: calls.append(1))
    started = time.perf_counter()
    asyncio.run(close_without_drain(executor))
    assert time.perf_counter() - started >= 0.3
    assert executor.late == 1 and calls == [1]

    async def close_plans(plans: Plans) -> None:
        with pytest.raises(NodeError, match=NODE_TIMEOUT):
            await plans.executor.run(steps, ["a"], node_timeout_ms=50)
        assert finished == [1]
        await plans.close()
        assert finished == [1, 1]

    plans = Plans(tmp_path, Services(), cpu_threads=1, on_late=lambda: calls.append(2))
    asyncio.run(close_plans(plans))
    assert plans.executor.late == 1 and calls == [1, 2]
    with pytest.raises(RuntimeError, match="shutdown"):
        plans.executor.pool.submit(print)


def rows() -> RowSet:
    return RowSet(Batch.build([10, 11, 12, 13], floats={"score": [0.5, None, 2.0, 1.0]},
                              strings={"country": ["US", "CA", None, "GB"]}))


def assert_shares_every_column(derived: RowSet, base: RowSet) -> None:
    assert derived.batch is base.batch and derived.batch.ids is base.batch.ids
    assert derived.batch.columns.keys() == base.batch.columns.keys()
    for name, column in base.batch.columns.items():
        assert derived.batch.columns[name] is column
        assert derived.batch.columns[name].values is column.values and derived.batch.columns[name].valid is column.valid


def test_sort_and_take_operators_copy_no_column():
    base = rows()
    ctx = Context(PlanRequest.parse({"user_id": 1}), Services())
    ordered = cpu_ops.sort(ctx, {"key": "score", "order": "desc"}, [base])
    top = cpu_ops.take(ctx, {"count": 2}, [ordered])
    by_country = cpu_ops.take(ctx, {"count": 3}, [cpu_ops.sort(ctx, {"key": "country"}, [top])])
    assert [r["id"] for r in ordered.records()] == [12, 13, 10, 11]
    assert top.records() == [{"id": 12, "score": 2.0}, {"id": 13, "score": 1.0, "country": "GB"}]
    assert [r["id"] for r in by_country.records()] == [13, 12]
    for derived in (ordered, top, by_country):
        assert_shares_every_column(derived, base)
    assert not base.batch.columns["score"].values.flags.writeable


def test_sort_and_take_through_bind_and_the_executor_share_the_source_batch(monkeypatch):
    base = rows()

    async def source(ctx: Context, params: dict, inputs: list) -> RowSet:
        return base

    monkeypatch.setitem(ops.OPS, "fixed_rows", ops.Op("fixed_rows", 0, io=True, run=source))
    artifact = {"schema_version": 1, "plan_name": "shared", "expr_table": {}, "pred_table": {}, "outputs": ["n2"],
                "nodes": [{"node_id": "n0", "op": "fixed_rows", "inputs": [], "params": {}},
                          {"node_id": "n1", "op": "sort", "inputs": ["n0"], "params": {"key": "score"}},
                          {"node_id": "n2", "op": "take", "inputs": ["n1"], "params": {"count": 3}}]}
    validate(artifact)
    steps = bind(artifact, Context(PlanRequest.parse({"user_id": 1}), Services()))
    assert [(s.node_id, s.deps, s.io) for s in steps] == [("n0", (), True), ("n1", ("n0",), False),
                                                          ("n2", ("n1",), False)]
    executor = Executor(1)
    try:
        results = asyncio.run(executor.run(steps, ["n1", "n2"]))
    finally:
        executor.close()
    assert [r["id"] for r in results["n1"].records()] == [10, 13, 12, 11]  # the default order: asc, nulls last
    assert [r["id"] for r in results["n2"].records()] == [10, 13, 12]
    for derived in results.values():
        assert_shares_every_column(derived, base)
    assert np.shares_memory(results["n2"].batch.columns["score"].values, base.batch.columns["score"].values)


def test_a_chain_of_cpu_steps_is_one_trip_to_the_pool_and_errors_name_their_node(executor):
    def boom(inputs: list):
        raise ValueError("bad rows")

    src = Step("src", (), True, lambda inputs: asyncio.sleep(0, 1))
    chain = [src, Step("a", ("src",), False, lambda i: i[0] + 1), Step("b", ("a",), False, lambda i: i[0] * 10),
             Step("c", ("b",), False, lambda i: i[0] - 3), Step("side", ("a",), True, lambda i: asyncio.sleep(0, 0))]
    fused = fuse(chain[:4], ["c"], {"error": None})
    assert [(s.node_id, s.deps) for s in fused] == [("src", ()), ("c", ("src",))]
    assert [s.node_id for s in fuse(chain, ["c"], {"error": None})] == ["src", "a", "c", "side"]  # a has 2 users
    submitted = []
    submit = executor.pool.submit
    executor.pool.submit = lambda fn, *args: submitted.append(fn) or submit(fn, *args)
    assert asyncio.run(executor.run(chain[:4], ["c"])) == {"c": 17}
    assert len(submitted) == 1
    failing = [*chain[:2], Step("b", ("a",), False, boom), chain[3]]
    with pytest.raises(NodeError, match=r"^node b: bad rows$"):
        asyncio.run(executor.run(failing, ["c"]))
