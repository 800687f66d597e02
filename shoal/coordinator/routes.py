"""Route planning over workers that each hold a contiguous range of decoder layers.

A route is a list of hops that covers a layer range in order. Planning is a shortest path over
layer boundaries (as the Petals client does); choosing where a joining worker should sit follows
Petals' rule of filling the window where the swarm is weakest.
"""

import heapq
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

HOP_MS = 5.0  # fixed overhead of one hop (serialisation, scheduling), so fewer hops win on equal compute
KV_FULL_MS = 1_000_000.0  # a worker with no KV room is a last resort, used only when nothing else covers
MIN_HEADROOM = 0.1  # caps the slowdown a near-zero headroom can cause at 10x


@dataclass(frozen=True)
class Offer:
    """One worker's offer of layers [start, end), with the measurements from its hello and heartbeats."""

    worker: str
    start: int
    end: int
    rtt_ms: float = 1.0
    ms_per_layer: float = 1.0
    load: float = 0.0  # 0..1, share of its sequence slots in use
    headroom: float = 1.0  # 0..1, utilization/thermal headroom (1 = plenty)
    kv_free: float = 1.0  # 0..1, share of its KV cache free; 0 = no room for another sequence


@dataclass(frozen=True)
class Hop:
    """Run layers [start, end) on `worker`; a sub-range of what the worker holds."""

    worker: str
    start: int
    end: int


class NoRoute(Exception):
    """No chain of offers covers the range. `missing` lists the uncovered layer ranges [(x, y), ...]."""

    def __init__(self, missing: list[tuple[int, int]]) -> None:
        self.missing = missing
        super().__init__("no worker serves layers " + ", ".join(f"{x}:{y}" for x, y in missing))


def cost(offer: Offer, layers: int) -> float:
    """Cost of one hop of `layers` layers on this offer, in ms-like units."""
    base = HOP_MS + max(offer.rtt_ms, 0.0) + layers * max(offer.ms_per_layer, 0.0)
    load = min(max(offer.load, 0.0), 1.0)
    headroom = min(max(offer.headroom, MIN_HEADROOM), 1.0)
    # A busy worker batches our step with others (up to ~2x slower); low headroom means throttling.
    scaled = base * (1.0 + load) / headroom
    return scaled + (KV_FULL_MS if offer.kv_free <= 0 else 0.0)


def plan(
    offers: Iterable[Offer], n_layers: int, start: int = 0, end: int | None = None, exclude: Collection[str] = ()
) -> list[Hop]:
    """Cheapest route covering layers [start, end) (default the whole model), never using a worker in `exclude`.

    A worker may appear in two non-adjacent hops (slow 0:4, fast 4:8, slow 8:12) when that is cheapest.
    """
    end = n_layers if end is None else end
    _check_range(n_layers, start, end)
    usable = _usable(offers, n_layers, exclude)
    gaps = _gaps(usable, start, end)
    if gaps:
        raise NoRoute(gaps)
    # Cost is linear in layers between offer boundaries, so an optimal route only switches workers at
    # some offer's start or end: those boundaries (plus start and end) are the only nodes needed.
    points = sorted({start, end} | {p for o in usable for p in (o.start, o.end) if start < p < end})
    # Distances are (cost, worker ids so far): equal costs fall back to comparing worker ids.
    best: dict[int, tuple[float, tuple[str, ...]]] = {start: (0.0, ())}
    back: dict[int, Hop] = {}
    heap: list[tuple[float, tuple[str, ...], int]] = [(0.0, (), start)]
    done: set[int] = set()
    while heap:
        total, ids, x = heapq.heappop(heap)
        if x in done:
            continue
        done.add(x)
        if x == end:
            break
        for offer in usable:
            if not offer.start <= x < offer.end:
                continue
            for y in points:
                if x < y <= offer.end:
                    key = (total + cost(offer, y - x), (*ids, offer.worker))
                    if y not in best or key < best[y]:
                        best[y] = key
                        back[y] = Hop(offer.worker, x, y)
                        heapq.heappush(heap, (*key, y))
    return _walk_back(back, start, end)


def missing(
    offers: Iterable[Offer], n_layers: int, start: int = 0, end: int | None = None, exclude: Collection[str] = ()
) -> list[tuple[int, int]]:
    """The maximal sub-ranges of [start, end) that no usable offer covers."""
    end = n_layers if end is None else end
    _check_range(n_layers, start, end)
    return _gaps(_usable(offers, n_layers, exclude), start, end)


def choose_range(offers: Iterable[Offer], n_layers: int, fits: int) -> tuple[int, int]:
    """Window of `fits` consecutive layers where the swarm is weakest, for a joining worker given no --layers.

    Per-layer throughput is the sum of 1/ms_per_layer over the offers covering it (0 when uncovered). The
    window with the smallest minimum wins; ties go to the smaller total, then the lowest start.
    """
    if n_layers <= 0 or fits <= 0:
        raise ValueError(f"n_layers and fits must be positive, got n_layers={n_layers}, fits={fits}")
    if fits >= n_layers:
        return 0, n_layers
    throughput = [0.0] * n_layers
    for offer in _usable(offers, n_layers, ()):
        for layer in range(offer.start, offer.end):
            throughput[layer] += 1.0 / max(offer.ms_per_layer, 1e-6)

    def weakness(s: int) -> tuple[float, float, int]:
        window = throughput[s : s + fits]
        return min(window), sum(window), s

    best = min(range(n_layers - fits + 1), key=weakness)
    return best, best + fits


def _check_range(n_layers: int, start: int, end: int) -> None:
    if not 0 <= start < end <= n_layers:
        raise ValueError(f"invalid layer range {start}:{end} for a model of {n_layers} layers")


def _usable(offers: Iterable[Offer], n_layers: int, exclude: Collection[str]) -> list[Offer]:
    """Offers with a valid range and finite numbers, not excluded, sorted so planning is order-independent."""
    keep = [
        o
        for o in offers
        if o.worker not in exclude
        and 0 <= o.start < o.end <= n_layers
        and all(math.isfinite(v) for v in (o.rtt_ms, o.ms_per_layer, o.load, o.headroom, o.kv_free))
    ]
    return sorted(keep, key=lambda o: (o.worker, o.start, o.end))


def _gaps(usable: list[Offer], start: int, end: int) -> list[tuple[int, int]]:
    covered = [False] * (end - start)
    for o in usable:
        for layer in range(max(o.start, start), min(o.end, end)):
            covered[layer - start] = True
    gaps: list[tuple[int, int]] = []
    for i, ok in enumerate(covered):
        layer = start + i
        if ok:
            continue
        if gaps and gaps[-1][1] == layer:
            gaps[-1] = (gaps[-1][0], layer + 1)
        else:
            gaps.append((layer, layer + 1))
    return gaps


def _walk_back(back: dict[int, Hop], start: int, end: int) -> list[Hop]:
    route: list[Hop] = []
    node = end
    while node != start:
        if node not in back:  # cannot happen once coverage is checked; guards against a silent bad route
            raise NoRoute([(start, end)])
        hop = back[node]
        route.append(hop)
        node = hop.start
    return route[::-1]
