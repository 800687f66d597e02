"""Linear layers whose CPU product is chosen by measurement, per weight shape and row count.

On a CPU the kernel behind `x @ W.T` depends on the library, the weight's memory layout and how the
product is phrased, and the spread is wide:
- torch's BLAS (MKL) runs a wide matrix-vector product up to twice as fast from a column-major weight,
  and 2-64 rows often faster as `(W @ x.T).T`;
- numpy's OpenBLAS ran float32 matrix-vector products 2-2.6x faster than MKL on an AMD EPYC (where MKL
  does not take its fastest paths), and large float32 products 1.1-1.3x faster;
- oneDNN, given a weight packed once into its own blocked layout, ran bfloat16 products on that EPYC
  1.1-1.6x faster for one row and as fast for 64 (a 0.5B model decoded one sequence 18-35% faster),
  while float32 single rows ran twice as slow as OpenBLAS's.
`tune` times every way on stand-ins of the model's weight shapes, per row bucket, and keeps whichever is clearly
faster than the plain product. Where oneDNN's packed product wins some buckets only (float32 on that EPYC: 1.4-1.6x
at 64 rows, 1.1x at 512, but up to 1.4x slower for one row), a packed copy serves those buckets and the weight as
it was the others, if memory allows. In float32 `tiles` offers a product of its own over a copy of the weight laid
out in panels (on that EPYC 1.2-1.4x OpenBLAS's at 64 rows); a weight keeps at most one copy, of the kind that saves
the most time over the buckets. The choices are kept on disk per machine (`tunings`): a model loads again without
timing.
"""

import bisect
import functools
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController
from torch import nn

from shoal.model import paged, tiles, tunings
from shoal.model.gemv import gemv, gemv_on_caller

log = logging.getLogger("shoal.model")

# Decode ticks, then prefill chunks (n_batch's default): more rows go the last bucket's way. The ranking at 64
# rows does not hold for 512: on an AMX Xeon a bfloat16 down projection ran 1.2x faster flipped at 64 rows, and
# 1.8x slower at 512 (where its packed copy ran 2.2x faster)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 512)
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
# The most rows for which `gemv` is timed: on a Zen 4 EPYC it beat oneDNN's packed product by 15-80% at 2 rows
# on every shape but down (20% slower), and lost at 4 and more on all but qkv
GEMV_ROWS = 2
PACK_ROWS = 64  # the row count oneDNN lays a packed weight out for (it takes any)
# OpenBLAS's float32 kernels (Haswell's, which Zen takes too) run rows in groups of ROW_GROUP and the rest through
# slower edge code: on a Zen 3 EPYC, 54 rows at 107 GFLOP/s, 56 at 141. Up to PAD_ROWS rows, a count that leaves 2-7
# over is padded with zero rows to the next multiple of ROW_GROUP (one over costs the edge code little, and padding 7
# more; above 64 rows padding gained nothing)
ROW_GROUP, PAD_ROWS = 8, 64
COPIES_SHARE = 0.5  # the weights with their packed copies take at most this share of the memory free at load
ROUNDS = 3  # each way is timed this many times, taking turns with the others; the quickest counts
QUICK_S = 50e-6  # a single-row product quicker than this is mostly call overhead: every way runs alike
Way = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def plain(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def flipped(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Made contiguous here, not by the caller, so that `tune` times the copy too: for an LM head of 152k rows it
    # is a quarter of the product's time at 64 rows
    return (weight @ x.T).T.contiguous()


def openblas(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The product by numpy's BLAS, its rows padded (see ROW_GROUP); float32 only (numpy has no bfloat16, and no
    BLAS for float16)."""
    a = x.numpy()
    rows = len(a)
    if rows <= PAD_ROWS and rows % ROW_GROUP > 1:
        a = np.concatenate((a, np.zeros((-rows % ROW_GROUP, a.shape[1]), a.dtype)))
    return torch.from_numpy(a @ weight.detach().numpy().T)[:rows]


def tiled(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """The product by `tiles` over the weight's copy in panels; float32 only."""
    return tiles.product(x, panels)


def packable(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of this dtype on this CPU: bfloat16 and float16 need AVX-512 (or AVX-NE-CONVERT)
    instructions that many CPUs lack, AVX2-only ones among them."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return dtype == torch.float32


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 with instructions of its own (AVX512-BF16 or AMX) and oneDNN packs it:
    elsewhere oneDNN emulates bfloat16, slower than float32."""
    return packable(torch.bfloat16) and re.search(r"\b(avx512_bf16|amx_bf16)\b", tunings.cpuinfo()) is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout: an opaque tensor that only `packed_product` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)


def packed_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


COPIED = (packed_product, tiled)  # the ways that multiply a copy of the weight, in a layout of their own


def ways_for(dtype: torch.dtype, packs: bool = False, rows: int = 1, panels: bool = False) -> tuple[Way, ...]:
    """The ways to time for a dtype and row count; with `packs`, the packed product too (its weight being the
    packed one), with `panels` (float32 only) the tiled one. Up to GEMV_ROWS bfloat16 rows may take numba's
    matrix-vector kernels."""
    if dtype == torch.float32:
        unpacked = (plain, flipped, openblas)
    else:
        few = dtype == torch.bfloat16 and rows <= GEMV_ROWS
        unpacked = (plain, flipped, gemv, gemv_on_caller) if few else (plain, flipped)
    return (*unpacked, *(packed_product,) * packs, *(tiled,) * (panels and dtype == torch.float32))


def set_threads(n: int) -> None:
    """Run torch's math, numpy's BLAS and the paged attention on `n` threads each (they take turns, never run at
    once)."""
    torch.set_num_threads(n)
    ThreadpoolController().limit(limits=n, user_api="blas")
    paged.set_threads(n)


def bucket(rows: int) -> int:
    """Index of the smallest bucket holding `rows` (the last one for more)."""
    return min(len(ROW_BUCKETS) - 1, bisect.bisect_left(ROW_BUCKETS, rows))


class Linear(nn.Linear):
    """nn.Linear that multiplies the way `tune` found fastest for the row count: `ways` per row bucket (empty:
    always plain). `packed_product` multiplies a weight that `pack_loaded` packed: the weight itself where every
    bucket takes it and no other module shares it, else a copy beside it (`packed`); `tiled` multiplies such a copy
    in panels."""

    ways: tuple[Way, ...] = ()
    packed: torch.Tensor | None = None
    # The most rows `tune` times: more take that bucket's way. An LM head multiplies one row per sampled sequence,
    # at most n_seq_max, never a prefill tick's 512: timing it there took about 11 of the 30 s of a 0.5B model's head
    timed_rows: int = ROW_BUCKETS[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.is_mkldnn:
            return packed_product(x, self.weight, self.bias)
        return product(x, self.weight, self.bias, self.ways, self.packed)


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ways: tuple[Way, ...],
            packed: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if ways else 0
    way = ways[bucket(rows)] if ways else plain
    if way is plain:
        return F.linear(x, weight, bias)
    if way is packed_product:
        return packed_product(x, packed, bias)
    out = way(x.reshape(rows, -1), packed if way is tiled else weight)
    out = out if bias is None else out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix, stored column-major."""
    return t.t().contiguous().t()


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


def _one_copy(timings: list[dict[Way, float]]) -> list[Way]:
    """Each bucket's way, given its timing, with at most one kind of copy among them (a weight keeps one copy beside
    it): where the buckets' quickest ways multiply both, the kind that saves more time over those buckets."""
    ways = [_best(times) for times in timings]
    kinds = {way for way in ways if way in COPIED}
    if len(kinds) < 2:
        return ways
    saved = {kind: sum(_unpacked(times) - times[kind] for times, way in zip(timings, ways, strict=True) if way is kind)
             for kind in kinds}
    kept = max(saved, key=saved.__getitem__)
    return [_best(times, frozenset(kinds - {kept})) for times in timings]


def _choose(rows: int, inp: int, dtype: torch.dtype, count: int, packs: bool, timed_rows: int = ROW_BUCKETS[-1],
            evict: Evict | None = None, panels: bool = False) -> tuple[str, tuple[Way, ...]]:
    """The layout of weights of this shape (row or column) and the way to multiply per row bucket (with `packs`,
    the packed product among them, with `panels` the tiled one), timed on `count` stand-ins of `rows` rows, for
    buckets up to `timed_rows` (the buckets above take the last one's way). Between row and column, the layout is
    the one faster for a single row: the latency of decoding one sequence."""
    rows_major = [torch.full((rows, inp), 0.01, dtype=dtype) for _ in range(count)]
    copies = {packed_product: [pack(w) for w in rows_major]} if packs else {}
    copies |= {tiled: [tiles.pack(w) for w in rows_major]} if panels else {}
    by_row = _fastest(rows_major, 1, copies, evict)
    if by_row[0][plain] / len(rows_major) < QUICK_S:
        return "row", ()
    cols_major = [column_major(w) for w in rows_major]
    by_col = _fastest(cols_major, 1, copies, evict)
    columns = _unpacked(by_col[0]) < _unpacked(by_row[0])
    layout, weights, single = ("column", cols_major, by_col) if columns else ("row", rows_major, by_row)
    timings = [single[0]] + [_fastest(weights, n, copies, evict)[0] for n in ROW_BUCKETS[1:] if n <= timed_rows]
    ways = _one_copy(timings)
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
    shared = _shared(model)
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
            panels = copies and tiles.supports(out, dtype)
            # The ways are in the key: a choice made among others (before a way was added, say) is made again
            offered = "/".join(way.__name__ for way in ways_for(dtype, packs, panels=panels))
            key = (f"{rows}x{inp} {str(dtype).removeprefix('torch.')} by {offered}, timed on {count} at {timed_rows}"
                   f" rows or fewer{', from memory' * (evict is not None)}")
            choice = _recall(known.get(key), dtype, packs, panels)
            if choice is None:
                log.info("timing products for a weight shape, once on this machine (the choice is kept)",
                         extra={"shape": f"{out}x{inp}", "tunings": str(tunings.path())})
                choice = _choose(rows, inp, dtype, count, packs, timed_rows, evict, panels)
                known[key] = {"layout": choice[0], "ways": [way.__name__ for way in choice[1]]}
            layout, ways = choice
            replaced = _packed_only(ways) and not tied
            copied = any(way in COPIED for way in ways)
            extra = 0 if replaced or not copied else sum(m.weight.nbytes for m in modules)
            if extra > spare:
                ways, extra = tuple(plain if way in COPIED else way for way in ways), 0
            spare -= extra
            for m in modules:
                if layout == "column" and not replaced and m.weight.is_contiguous():  # not column-major already
                    m.weight.data = torch.empty(inp, out, dtype=dtype).t()
                m.ways = ways if any(way is not plain for way in ways) else ()  # () skips the bucket lookup
            names = ", ".join(f"{n}: {w.__name__}" for n, w in zip(ROW_BUCKETS, ways, strict=True)) if ways else "plain"
            copy = f"; a copy for {'tiled' if tiled in ways else 'packed_product'}" if extra else ""
            chosen[(out, inp)] = "packed by oneDNN" if replaced else f"{layout}-major; {names}{copy}"
    return chosen


def pack_loaded(model: nn.Module) -> None:
    """Pack the loaded weights `tune` chose to pack: in place where a packed weight serves every row count and
    no other module shares it, else as a copy beside the weight; lay out in panels those `tiled` multiplies."""
    shared = _shared(model)
    linears = [m for m in model.modules() if isinstance(m, Linear) and not m.weight.is_mkldnn and m.packed is None]
    if any(tiled in m.ways for m in linears):
        tiles.warm()
    for m in linears:
        if tiled in m.ways:
            m.packed = tiles.pack(m.weight)
        elif packed_product not in m.ways:
            continue
        elif _packed_only(m.ways) and id(m.weight) not in shared:
            m.weight = nn.Parameter(pack(m.weight), requires_grad=False)
        else:
            m.packed = pack(m.weight)


def _packed_only(ways: tuple[Way, ...]) -> bool:
    """Whether every row bucket multiplies the packed weight: it can be packed in place, with no copy beside it."""
    return bool(ways) and all(way is packed_product for way in ways)


def _shared(model: nn.Module) -> set[int]:
    """Ids of the parameters that a module other than a `Linear` holds (an embedding tied to the LM head)."""
    return {id(p) for m in model.modules() if not isinstance(m, Linear) for p in m.parameters(recurse=False)}
