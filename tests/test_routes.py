"""Route planning and layer-range choice on hand-built swarms."""

import pytest

from shoal.coordinator.routes import (
    HOP_MS,
    Hop,
    NoRoute,
    Offer,
    choose_range,
    cost,
    missing,
    plan,
)


def workers(route: list[Hop]) -> list[str]:
    return [hop.worker for hop in route]


def test_single_whole_model_worker_is_one_hop():
    assert plan([Offer("w", 0, 12)], 12) == [Hop("w", 0, 12)]


def test_three_stages_chain_in_order():
    offers = [Offer("c", 8, 12), Offer("a", 0, 4), Offer("b", 4, 8)]
    assert plan(offers, 12) == [Hop("a", 0, 4), Hop("b", 4, 8), Hop("c", 8, 12)]


def test_faster_replica_is_preferred():
    offers = [Offer("slow", 0, 8, ms_per_layer=5.0), Offer("fast", 0, 8, ms_per_layer=1.0)]
    assert workers(plan(offers, 8)) == ["fast"]
    offers = [Offer("far", 0, 8, rtt_ms=80.0), Offer("near", 0, 8, rtt_ms=2.0)]
    assert workers(plan(offers, 8)) == ["near"]


@pytest.mark.parametrize("busy", [{"load": 0.9}, {"headroom": 0.2}, {"kv_free": 0.0}])
def test_busy_replica_loses_to_idle_one(busy):
    # The busy one is named "a" so a tie by worker id would pick it: only cost can make it lose.
    offers = [Offer("a", 0, 8, **busy), Offer("b", 0, 8)]
    assert workers(plan(offers, 8)) == ["b"]


def test_full_kv_worker_is_used_when_nothing_else_covers():
    offers = [Offer("a", 0, 4), Offer("full", 4, 8, kv_free=0.0)]
    assert workers(plan(offers, 8)) == ["a", "full"]


def test_fewer_hops_preferred_on_equal_per_layer_cost():
    offers = [Offer("a", 0, 4), Offer("b", 4, 8), Offer("z", 0, 8)]
    assert plan(offers, 8) == [Hop("z", 0, 8)]


def test_equal_costs_break_ties_by_worker_id_whatever_the_order():
    offers = [Offer("w2", 0, 8), Offer("w1", 0, 8), Offer("w3", 0, 8)]
    assert workers(plan(offers, 8)) == ["w1"]
    assert workers(plan(reversed(offers), 8)) == ["w1"]


def test_replan_of_a_middle_range_uses_part_of_a_wider_worker():
    offers = [Offer("a", 0, 4), Offer("wide", 0, 12), Offer("c", 8, 12)]
    assert plan(offers, 12, start=4, end=8) == [Hop("wide", 4, 8)]


def test_route_switches_workers_where_an_overlap_begins():
    # "slow" holds everything; "fast" holds 4:12 at a tenth of the per-layer cost.
    offers = [Offer("slow", 0, 12, ms_per_layer=10.0), Offer("fast", 4, 12, ms_per_layer=1.0)]
    assert plan(offers, 12) == [Hop("slow", 0, 4), Hop("fast", 4, 12)]


def test_exclude_hands_the_range_to_the_replica():
    offers = [Offer("a", 0, 4), Offer("b", 4, 8), Offer("b2", 4, 8, ms_per_layer=3.0)]
    assert workers(plan(offers, 8)) == ["a", "b"]
    assert workers(plan(offers, 8, exclude={"b"})) == ["a", "b2"]


def test_missing_layers_raise_no_route_naming_the_range():
    offers = [Offer("a", 0, 4), Offer("c", 8, 12)]
    with pytest.raises(NoRoute, match="4:8") as info:
        plan(offers, 12)
    assert info.value.missing == [(4, 8)]


def test_excluding_the_only_holder_leaves_its_range_missing():
    offers = [Offer("a", 0, 2), Offer("b", 2, 6), Offer("c", 6, 8), Offer("d", 0, 1)]
    assert missing(offers, 8, exclude={"b"}) == [(2, 6)]
    assert missing(offers, 8, start=3, end=8, exclude={"b", "c"}) == [(3, 8)]
    assert missing(offers, 8, exclude={"a"}) == [(1, 2)]
    assert missing(offers, 8) == []
    with pytest.raises(NoRoute, match="no worker serves layers 1:2, 6:8"):
        plan(offers, 8, exclude={"a", "c"})


@pytest.mark.parametrize(("start", "end"), [(-1, 4), (4, 4), (5, 4), (0, 9)])
def test_invalid_range_is_a_value_error(start, end):
    with pytest.raises(ValueError, match="invalid layer range"):
        plan([Offer("w", 0, 8)], 8, start=start, end=end)


def test_offers_with_invalid_ranges_are_ignored():
    offers = [Offer("bad", 0, 20), Offer("empty", 4, 4), Offer("neg", -2, 8), Offer("ok", 0, 8)]
    assert workers(plan(offers, 8)) == ["ok"]
    with pytest.raises(NoRoute):
        plan([Offer("bad", 0, 20)], 8)


def test_cost_grows_with_layers_load_and_low_headroom():
    idle = Offer("w", 0, 8, rtt_ms=3.0, ms_per_layer=2.0)
    assert cost(idle, 4) == HOP_MS + 3.0 + 4 * 2.0
    assert cost(Offer("w", 0, 8, load=0.5), 4) > cost(Offer("w", 0, 8), 4)
    assert cost(Offer("w", 0, 8, headroom=0.5), 4) > cost(Offer("w", 0, 8), 4)
    assert cost(Offer("w", 0, 8, kv_free=0.0), 1) > 1000 * cost(Offer("w", 0, 8, load=1.0, headroom=0.0), 8)


def test_choose_range_fills_an_uncovered_window():
    offers = [Offer("a", 0, 4), Offer("c", 8, 12)]
    assert choose_range(offers, 12, 4) == (4, 8)
    assert choose_range([], 12, 4) == (0, 4)


def test_choose_range_picks_the_weakest_window():
    # Per-layer throughput: 0:6 is served twice, 6:12 once -> the first window of the weak half.
    offers = [Offer("a", 0, 6), Offer("b", 0, 6), Offer("c", 6, 12)]
    assert choose_range(offers, 12, 3) == (6, 9)
    # A slow worker adds little throughput: 0:6 at 10 ms/layer is weaker than 6:12 at 1 ms/layer.
    offers = [Offer("slow", 0, 6, ms_per_layer=10.0), Offer("fast", 6, 12)]
    assert choose_range(offers, 12, 6) == (0, 6)


def test_choose_range_breaks_min_ties_by_total_throughput():
    # Throughput per layer: [2, 2, 1, 1, 1, 2, 1, 1]; every 3-window has min 1, only 2:5 sums to 3.
    offers = [Offer("a", 0, 8), Offer("b", 0, 2), Offer("c", 5, 6)]
    assert choose_range(offers, 8, 3) == (2, 5)


def test_choose_range_whole_model_when_it_fits():
    assert choose_range([Offer("a", 0, 4)], 8, 8) == (0, 8)
    assert choose_range([], 8, 20) == (0, 8)
    with pytest.raises(ValueError):
        choose_range([], 8, 0)
