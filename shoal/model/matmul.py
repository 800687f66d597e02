"""Linear layers whose CPU product is chosen by measurement, per weight shape and row count.

On a CPU the BLAS kernel behind `x @ W.T` depends on the weight's memory layout and on how the product
is phrased, and for the few rows of a decode step the spread is wide: a wide matrix-vector product
runs up to twice as fast from a column-major weight, and 2-64 rows often run faster as `(W @ x.T).T`.
`tune` times both layouts and both phrasings on stand-ins of the model's weight shapes and keeps whichever
is clearly faster than the plain product.
"""

import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # larger products are compute-bound: every phrasing runs alike
TIMING_BYTES = 64 * 2**20  # twice the last-level cache of common CPUs
# A weight is timed at its real shape up to this size: BLAS picks its kernel and its split across threads by
# shape, so a cut-down stand-in can rank phrasings wrongly (an LM head of 152k rows runs 1.6x faster flipped at
# 16 rows, a cut of 19k rows does not).
FULL_SHAPE_BYTES = 1 * 2**30
# A choice leaves the plain product only for a clear gain: where the two are close, timing noise would
# otherwise make processes on one machine (a stage and its replica) choose differently and round differently.
CLEARLY = 0.8
QUICK_S = 50e-6  # a single-row product quicker than this is mostly call overhead: every phrasing runs alike


def bucket(rows: int) -> int:
    """Index of the smallest bucket holding `rows`."""
    return min(len(ROW_BUCKETS) - 1, max(0, rows - 1).bit_length())


class Linear(nn.Linear):
    """nn.Linear that, for row counts `tune` found faster that way, multiplies as (W @ x.T).T: `flipped` says
    which, per row bucket (empty: never)."""

    flipped: tuple[bool, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return product(x, self.weight, self.bias, self.flipped)


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            flipped: tuple[bool, ...]) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if flipped else 0
    if not flipped or rows > ROW_BUCKETS[-1] or not flipped[bucket(rows)]:
        return F.linear(x, weight, bias)
    out = (weight @ x.reshape(rows, -1).T).T
    out = (out if bias is None else out + bias).contiguous()
    return out.view(*x.shape[:-1], weight.shape[0])


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix, stored column-major."""
    return t.t().contiguous().t()


def _stand_ins(out: int, inp: int, dtype: torch.dtype, count: int) -> list[torch.Tensor]:
    """Weights to time products with: up to `count` of the shape, at most TIMING_BYTES in all so that small ones
    are not all in cache; a weight larger than FULL_SHAPE_BYTES is cut to its first rows."""
    rows = max(1, min(out, FULL_SHAPE_BYTES // (inp * dtype.itemsize)))
    count = max(1, min(count, TIMING_BYTES // (rows * inp * dtype.itemsize)))
    return [torch.full((rows, inp), 0.01, dtype=dtype) for _ in range(count)]


def _time(weights: list[torch.Tensor], rows: int, flip: bool, repeats: int = 3) -> float:
    """Seconds for one product with each weight: the best of a few runs, or the first where that is already
    long enough to measure."""
    x = torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype)
    flipped = (flip,) * len(ROW_BUCKETS)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for w in weights:
            product(x, w, None, flipped)
        best = min(best, time.perf_counter() - began)
        if best > 0.02:
            break
    return best


def _faster_flipped(weights: list[torch.Tensor], rows: int) -> tuple[float, bool]:
    plain, flip = _time(weights, rows, False), _time(weights, rows, True)
    return min(plain, flip), flip < CLEARLY * plain


def _choose(out: int, inp: int, dtype: torch.dtype, count: int) -> tuple[bool, tuple[bool, ...]]:
    """Whether weights of this shape go column-major, and per row bucket whether to flip the product. The
    layout is the one faster for a single row: the latency of decoding one sequence."""
    rows_major = _stand_ins(out, inp, dtype, count)
    row_time, row_flip = _faster_flipped(rows_major, 1)
    if row_time / len(rows_major) < QUICK_S:
        return False, ()
    cols_major = [column_major(w) for w in rows_major]
    col_time, col_flip = _faster_flipped(cols_major, 1)
    columns = col_time < CLEARLY * row_time
    weights = cols_major if columns else rows_major
    return columns, (col_flip if columns else row_flip, *(_faster_flipped(weights, n)[1] for n in ROW_BUCKETS[1:]))


def tune(model: nn.Module, sample: int = 4) -> dict[tuple[int, int], str]:
    """Choose layout and phrasing for every CPU `Linear` of a model whose weights are about to be loaded (a
    weight whose layout changes gets fresh, unset memory), timing up to `sample` stand-ins of each weight
    shape: their values do not change the time. Returns the choices, by shape."""
    groups: dict[tuple, list[Linear]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.device.type == "cpu":
            groups[(*module.weight.shape, module.weight.dtype)].append(module)
    chosen = {}
    with torch.inference_mode():
        for (out, inp, dtype), modules in groups.items():
            columns, flipped = _choose(out, inp, dtype, min(sample, len(modules)))
            for m in modules:
                if columns and m.weight.is_contiguous():  # not already column-major from an earlier tune
                    m.weight.data = torch.empty(inp, out, dtype=dtype).t()
                m.flipped = flipped if any(flipped) else ()  # () skips the bucket lookup
            chosen[(out, inp)] = f"{'column' if columns else 'row'}-major, flipped at {flipped or 'no row count'}"
    return chosen
