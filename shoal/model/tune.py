"""Choosing, per weight shape and row bucket, the way `matmul.Linear` multiplies: by timing them all at load.

`tune` times every way on stand-ins of the model's weight shapes, per row bucket, and keeps whichever is clearly
faster than the plain product. Where oneDNN's packed product wins some buckets only (float32 on an AMD EPYC: 1.4-1.6x
at 64 rows, 1.1x at 512, but up to 1.4x slower for one row), a packed copy serves those buckets and the weight as
it was the others, if memory allows; so does a copy in panels for the tiled product. A weight may keep both: on
an AMX Xeon, bfloat16 panels multiplied one row 1.2-1.3x faster than any other way, and oneDNN's AMX product 2-512
rows fastest. Where memory does not hold both, the kind more buckets take is kept. The choices are kept on disk per
machine (`tunings`): a model loads again without timing.
"""

import functools
import logging
import time
from collections import defaultdict
from pathlib import Path

import psutil
import torch
from torch import nn

from shoal.model import tiles, tunings
from shoal.model.matmul import (
    COPIED,
    ROW_BUCKETS,
    Linear,
    Way,
    column_major,
    in_copies,
    pack,
    packable,
    packed_product,
    plain,
    shared_ids,
    tiled,
    ways_for,
)

log = logging.getLogger("shoal.model")

TIMING_BYTES = 64 * 2**20  # twice the last-level cache of common CPUs
# A model larger than the last-level cache streams its weights from memory in a forward, but a shape's stand-ins
# can stay in a large cache: on an AMX Xeon with 480 MB of L3, timed from it, a bfloat16 0.5B model's single-row
# qkv and down products took the plain way, 1.2-1.4x slower from memory than the packed one (its batch-1 decode
# 3-16% slower). For such a model each timing starts after reading this many caches' worth of other memory.
EVICT_CACHES = 2
EVICT_MAX_BYTES = 2**30
CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")  # where Linux describes the first CPU's caches
# A weight is timed at its real shape up to this size: BLAS picks its kernel and its split across threads by
# shape, so a cut-down stand-in can rank ways wrongly (an LM head of 152k rows runs 1.6x faster flipped at
# 16 rows, a cut of 19k rows does not).
FULL_SHAPE_BYTES = 1 * 2**30
# A choice leaves the plain product only for a clear gain: where the two are close, timing noise would
# otherwise make processes on one machine (a stage and its replica) choose differently and round differently.
CLEARLY = 0.9
COPIES_SHARE = 0.5  # the weights with their packed copies take at most this share of the memory free at load
ROUNDS = 3  # each way is timed this many times, taking turns with the others; the quickest counts
QUICK_S = 50e-6  # a single-row product quicker than this is mostly call overhead: every way runs alike


def _stand_in_shape(out: int, inp: int, dtype: torch.dtype, count: int) -> tuple[int, int]:
    """Rows and number of the weights to time products with: up to `count` of the shape, at most TIMING_BYTES in
    all so that small ones are not all in cache; a weight larger than FULL_SHAPE_BYTES is cut to its first rows."""
    rows = out if out * inp * dtype.itemsize <= FULL_SHAPE_BYTES else FULL_SHAPE_BYTES // (inp * dtype.itemsize)
    rows = rows if rows == out else max(tiles.PANEL, rows - rows % tiles.PANEL)  # a cut keeps whole panels
    return rows, max(1, min(count, TIMING_BYTES // (rows * inp * dtype.itemsize)))


@functools.cache
def last_level_cache() -> int:
    """Bytes of the CPU's largest cache, as Linux reports it (32 MiB where it does not)."""
    sizes = []
    for file in CPU_CACHES.glob("index*/size"):
        try:
            text = file.read_text().strip()
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 * 2**20)


class Evict:
    """Reads EVICT_CACHES last-level caches' worth of memory (at most EVICT_MAX_BYTES, allocated at the first
    call and freed with this object), so that what was read before comes from memory again."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def __call__(self) -> None:
        if self.buffer is None:
            self.buffer = torch.ones(min(EVICT_CACHES * last_level_cache(), EVICT_MAX_BYTES) // 4)
        self.buffer.sum()


def _time(weights: list[torch.Tensor], x: torch.Tensor, way: Way, evict: Evict | None = None) -> float:
    """Seconds for one product with each weight, after an untimed one: a library whose threads slept, or spun
    on after the other library's product, is timed as it runs in a forward, where products follow each other.
    The untimed one takes a single row: it wakes the threads as well, and a full one at 512 rows doubled the
    timing of an LM head's 512-row bucket (a 0.5B model's first load: 36.5 s, 27.2 with one row, on 2 cores).
    With `evict`, the weights are then evicted from the caches, the one just multiplied among them."""
    way(x[:1], weights[0])
    if evict is not None:
        evict()
    began = time.perf_counter()
    for w in weights:
        way(x, w)
    return time.perf_counter() - began


def _fastest(weights: list[torch.Tensor], rows: int, copies: dict[Way, list[torch.Tensor]] | None = None,
             evict: Evict | None = None) -> tuple[dict[Way, float], Way]:
    """Each way's time (with `copies`, also those of the ways that multiply copies: packed_product or tiled, each
    on its own), and the way to use: the quickest one if clearly faster than plain, else plain. All take turns,
    round after round, so a slow moment of the machine does not count against one of them only (timed apart, or
    for one round only, the packed product won or lost from one load to the next: a 0.5B model's LM head once
    left unpacked, 1.3x slower at 64 rows)."""
    x = torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype)
    operands = dict.fromkeys(ways_for(weights[0].dtype, rows=rows), weights) | (copies or {})
    times = dict.fromkeys(operands, float("inf"))
    for _ in range(ROUNDS):
        for way, ws in operands.items():
            times[way] = min(times[way], _time(ws, x, way, evict))
    return times, _best(times)


def _best(times: dict[Way, float], barred: frozenset[Way] = frozenset()) -> Way:
    """The quickest way but those barred, if clearly faster than plain, else plain."""
    best = min((way for way in times if way not in barred), key=times.__getitem__)
    return best if times[best] < CLEARLY * times[plain] else plain


def _afforded(ways: tuple[Way, ...], nbytes: int, tied: bool, spare: float) -> tuple[tuple[Way, ...], int]:
    """The ways, and the bytes of the copies they need, within `spare` bytes: with both kinds of copy if they fit,
    else with the kind more buckets take (the other's buckets multiply plainly), else with none."""
    kinds = sorted((way for way in COPIED if way in ways), key=ways.count, reverse=True)  # ties: COPIED's order
    for kept in (kinds, kinds[:1]):
        trial = tuple(way if way not in COPIED or way in kept else plain for way in ways)
        # the weight itself is packed in place where every bucket multiplies a copy
        extra = nbytes * (len({way for way in trial if way in COPIED}) - (in_copies(trial) and not tied))
        if extra <= max(spare, 0):  # no copy beside the weight takes nothing
            return trial, extra
    return tuple(plain if way in COPIED else way for way in ways), 0


def _choose(rows: int, inp: int, dtype: torch.dtype, count: int, packs: bool, timed_rows: int = ROW_BUCKETS[-1],
            evict: Evict | None = None, panels: bool = False) -> tuple[str, tuple[Way, ...]]:
    """The layout of weights of this shape (row or column) and the way to multiply per row bucket (with `packs`,
    the packed product among them, with `panels` the tiled one), timed on `count` stand-ins of `rows` rows, for
    buckets up to `timed_rows` (the buckets above take the last one's way). Between row and column, the layout is
    the one faster for a single row: the latency of decoding one sequence."""
    rows_major = [torch.full((rows, inp), 0.01, dtype=dtype) for _ in range(count)]
    copies = {packed_product: [pack(w) for w in rows_major]} if packs else {}
    copies |= {tiled: [tiles.pack(w) for w in rows_major]} if panels else {}
    by_row = _fastest(rows_major, 1, copies, evict)[0]
    if by_row[plain] / len(rows_major) < QUICK_S:
        return "row", ()
    cols_major = [column_major(w) for w in rows_major]
    by_col = _fastest(cols_major, 1, evict=evict)[0] | {way: by_row[way] for way in copies}  # a copy has one layout
    columns = _unpacked(by_col) < _unpacked(by_row)
    layout, weights, single = ("column", cols_major, by_col) if columns else ("row", rows_major, by_row)
    timings = [single] + [_fastest(weights, n, copies, evict)[0] for n in ROW_BUCKETS[1:] if n <= timed_rows]
    ways = [_best(times) for times in timings]
    return layout, tuple(ways + ways[-1:] * (len(ROW_BUCKETS) - len(ways)))


def _recall(entry: dict | None, dtype: torch.dtype, packs: bool, panels: bool = False
            ) -> tuple[str, tuple[Way, ...]] | None:
    """A choice as `tunings` kept it, if it is one `_choose` could have made (else None, to choose again)."""
    if entry is None:
        return None
    ways = {way.__name__: way for way in ways_for(dtype, packs, panels=panels)}
    try:
        layout, names = entry["layout"], entry["ways"]
        valid = (layout in ("row", "column") and isinstance(names, list) and len(names) in (0, len(ROW_BUCKETS))
                 and all(name in ways for name in names))
    except (KeyError, TypeError):
        valid = False
    if not valid:
        log.warning("a kept tuning is not a valid choice, timing again", extra={"tuning": entry})
        return None
    return layout, tuple(ways[name] for name in names)


def _unpacked(times: dict[Way, float]) -> float:
    """The quickest time of the ways that multiply the weight as it is (not a copy)."""
    return min(t for way, t in times.items() if way not in COPIED)


def tune(model: nn.Module, copies: bool = True) -> dict[tuple[int, int], str]:
    """Choose layout and way for every CPU `Linear` of a model whose weights are about to be loaded (a weight
    whose layout changes gets fresh, unset memory; one to be packed is packed by `pack_loaded` once loaded),
    timing as many stand-ins of each weight shape as the model has, up to TIMING_BYTES, so that they stream
    from memory as the model's weights do in a forward (evicted from the caches before each timing where the
    model outgrows the last-level cache): their values do not change the time. A weight packed
    for some row buckets only, or shared with another module (an LM head tied to the embedding), is packed as a
    copy while the weights and copies fit in COPIES_SHARE of the free memory (never without `copies`); else those
    buckets multiply plainly. A choice this machine kept (`tunings`) is taken as it is, untimed. Returns the
    choices, by shape."""
    shared = shared_ids(model)
    groups: dict[tuple, list[Linear]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.device.type == "cpu":
            group = (*module.weight.shape, module.weight.dtype, id(module.weight) in shared, module.timed_rows)
            groups[group].append(module)
    weights = sum(p.nbytes for p in model.parameters())
    spare = COPIES_SHARE * psutil.virtual_memory().available - weights if copies else 0
    evict = Evict() if weights > last_level_cache() else None
    chosen = {}
    with torch.inference_mode(), tunings.remembered() as known:
        for (out, inp, dtype, tied, timed_rows), modules in groups.items():
            # A shared weight can only be packed as a copy: without copies, its packed products are not timed;
            # panels are always a copy
            packs = packable(dtype) and (copies or not tied)
            rows, count = _stand_in_shape(out, inp, dtype, len(modules))
            panels = copies and tiles.supports(out, inp, dtype)
            # The ways are in the key: a choice made among others (before a way was added, or with tiles of
            # another kind, say) is made again
            offered = "/".join(way.__name__ for way in ways_for(dtype, packs, panels=panels))
            offered += f" ({tiles.VARIANT})" * panels + ", both copies kept" * (packs and panels)
            key = (f"{rows}x{inp} {str(dtype).removeprefix('torch.')} by {offered}, timed on {count} at {timed_rows}"
                   f" rows or fewer{', from memory' * (evict is not None)}")
            choice = _recall(known.get(key), dtype, packs, panels)
            if choice is None:
                log.info("timing products for a weight shape, once on this machine (the choice is kept)",
                         extra={"shape": f"{out}x{inp}", "tunings": str(tunings.path())})
                choice = _choose(rows, inp, dtype, count, packs, timed_rows, evict, panels)
                known[key] = {"layout": choice[0], "ways": [way.__name__ for way in choice[1]]}
            layout, ways = choice
            ways, extra = _afforded(ways, sum(m.weight.nbytes for m in modules), tied, spare)
            spare -= extra
            replaced = in_copies(ways) and not tied
            for m in modules:
                if layout == "column" and not replaced and m.weight.is_contiguous():  # not column-major already
                    m.weight.data = torch.empty(inp, out, dtype=dtype).t()
                m.ways = ways if any(way is not plain for way in ways) else ()  # () skips the bucket lookup
            names = ", ".join(f"{n}: {w.__name__}" for n, w in zip(ROW_BUCKETS, ways, strict=True)) if ways else "plain"
            kept = " and ".join(w.__name__ for w in COPIED if w in ways and not (replaced and w is packed_product))
            where = "packed in place" if replaced else f"{layout}-major"
            chosen[(out, inp)] = f"{where}; {names}" + f"; a copy for {kept}" * bool(kept)
    return chosen
