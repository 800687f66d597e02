"""A float32 or bfloat16 matrix product on a CPU over a weight laid out once in panels of PANEL rows, in numba.

BLAS libraries multiply a few dozen rows poorly: on a Zen 3 EPYC (AVX2), OpenBLAS, oneDNN and MKL ran a 0.5B model's
products at 64 rows (a decode tick of 64 sequences) at 65-125 GFLOP/s on 2 cores, against 130-165 at 512 rows. Two
single-threaded calls did no better than one on two threads, and weights in cache no better than from memory: it is
their kernels, which repack the weight on every call. Here the weight is repacked once, at load: panel p holds
weight rows [p * PANEL, (p + 1) * PANEL) column by column (PANEL 16 on AVX2, 64 on AVX-512), so that a tile of up
to 6 rows of x runs down a panel's depth with its 6 x PANEL sums in registers (`simd.tile`), each panel row loaded
once for the tile. The threads share the panels. Same shapes, same machine, by turns in one process: 64 rows
1.15-1.45x OpenBLAS's, 8 rows 1.3-2x, one row and 512 rows alike. On an AMX Xeon (AVX-512), against oneDNN's
packed product, the best there: 64 rows of the LM head 1.1-1.2x, of qkv 1.05-1.1x, of o 1.1-1.2x, of gate and up
1.0-1.1x, of down 0.83-0.94x; in its engine, the decode ticks' products took 2% less time.

bfloat16 panels hold the weight's rows in pairs, multiplied by AVX512-BF16's dot product of pairs (vdpbf16ps: two
products summed into a float32 lane) with float32 sums, rounded once. On a Zen 4 EPYC, weights cycled from memory,
against oneDNN's packed product: 1 row 1.3-1.6x, 8-32 rows 1.07-1.6x, 64 rows 1.08-1.21x, 512 rows 1.0-1.14x; the
engine's bfloat16 throughput rose 5-9% (4 pairs alternated in one process). On an AMX Xeon one row 1.15-1.25x (where
oneDNN's AMX product is the fastest for more rows).
"""

import numpy as np
import torch
from numba import njit, prange

from shoal.model.fused import array
from shoal.model.simd import PANEL, tile

# The first tile over a panel reads it from memory, the others from cache: it asks for the panel 16 KB ahead of
# where it reads. On an AMX Xeon, 2 cores, 64 rows of qkv, o and down ran 11-12% faster with it, gate and up 5%; on a
# Zen 3 EPYC (panels of 16) 2-9% (8, 32 or 64 KB ahead: no better). Asking for the next panel while the other tiles
# run, spread among them, was 15-21% slower there at 64 rows
AHEAD = 16384 // (4 * PANEL)
# Up to BLOCKED_ROWS rows, the tiles run down DEPTH of a panel at a time, their sums added into out between blocks: on
# AVX-512, 32 KB of a panel of 64, which stays in the first-level cache while every tile of rows runs over it, where
# a whole panel (896 deep in a 0.5B model: 229 KB) came from the second-level cache for each tile. On an AMX Xeon, 2
# cores, weights cycled, by turns in one process: 8-32 rows 4-37% faster, 64 rows 4-6% (gate and up 2% slower, down
# 17% faster), 128-192 rows 0-6%, 256 alike, 512 5-20% slower; 64 requests through the engine 1.1-2.9% more tokens/s
# (3 pairs). On a Zen 3 EPYC (AVX2, whose panels of 16 are 57 KB whole) blocks of 128-448 were no faster
DEPTH, BLOCKED_ROWS = (128, 192) if PANEL == 64 else (0, 0)
# How products run over the panels, in `tune`'s keys: a choice made with other tiles is made again
VARIANT = f"panels of {PANEL}" + f", {DEPTH} deep up to {BLOCKED_ROWS} rows" * bool(DEPTH)
_first, _six, _four, _two, _one = tile(6, AHEAD), tile(6), tile(4), tile(2), tile(1)


def supports(out: int, inp: int, dtype: torch.dtype) -> bool:
    """Whether a CPU weight [out, in] of this dtype can be laid out in panels: float32, or bfloat16 of even `in`
    (its panels hold pairs of rows), out a multiple of PANEL."""
    return out % PANEL == 0 and (dtype == torch.float32 or (dtype == torch.bfloat16 and inp % 2 == 0))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] as panels [out / PANEL, in, PANEL]: panel p, row e holds weight[p * PANEL + j, e] for
    j < PANEL; in bfloat16, rows e and e + 1 (e even) hold weight[p * PANEL + j, e + t] at 2 * j + t."""
    out, inp = weight.shape
    pair = 2 if weight.dtype == torch.bfloat16 else 1
    panels = weight.detach().reshape(out // PANEL, PANEL, inp // pair, pair).transpose(1, 2)
    return panels.reshape(out // PANEL, inp, PANEL).contiguous()


def product(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] times the weight whose panels these are, transposed, plus the bias if any: [rows, out], of the
    panels' dtype. The sums start from the bias: added after the product by torch, it took a pass over the output of
    its own."""
    count, depth, _ = panels.shape
    a = array(x.contiguous())
    out = np.empty((len(a), count * PANEL), a.dtype)
    # bfloat16 sums run the whole depth: added between blocks, they would be rounded to bfloat16 at each
    blocked = DEPTH and len(a) <= BLOCKED_ROWS and panels.dtype == torch.float32
    block = DEPTH if blocked else max(depth, 1)
    start = np.empty(0, a.dtype) if bias is None else array(bias.detach().contiguous())
    _product(a.reshape(-1), array(panels).reshape(-1), out.reshape(-1), len(a), depth, count * PANEL, block, start)
    return torch.from_numpy(out).view(panels.dtype)


def warm(dtype: torch.dtype = torch.float32) -> None:
    """Compile (or load from numba's disk cache) the kernel for this dtype now, not in a request's first tick."""
    product(torch.zeros(7, 2, dtype=dtype), pack(torch.zeros(PANEL, 2, dtype=dtype)))


@njit(parallel=True, fastmath=True, cache=True)
def _product(a, panels, out, rows, depth, width, block, bias):
    for p in prange(width // PANEL):
        column = p * PANEL
        if len(bias):
            for r in range(rows):
                out[r * width + column:r * width + column + PANEL] = bias[column:column + PANEL]
        for k in range(0, max(depth, 1), block):  # a weight of no columns still writes its zeros (or its bias)
            _rows(a, panels, out, rows, depth, width, p, k, min(block, depth - k), k > 0 or len(bias) > 0)


@njit(inline="always", fastmath=True, cache=True)
def _rows(a, panels, out, rows, depth, width, p, k, steps, add):
    """Every row's sums over `steps` of panel p's depth from k on, into out (with `add`, added to what is there)."""
    at, column = (p * depth + k) * PANEL, p * PANEL
    r = 0
    if rows >= 6:
        _first(a, k, depth, panels, at, steps, out, column, width, add)
        r = 6
    while r + 6 <= rows:
        _six(a, r * depth + k, depth, panels, at, steps, out, r * width + column, width, add)
        r += 6
    if rows - r >= 4:
        _four(a, r * depth + k, depth, panels, at, steps, out, r * width + column, width, add)
        r += 4
    if rows - r >= 2:
        _two(a, r * depth + k, depth, panels, at, steps, out, r * width + column, width, add)
        r += 2
    if rows - r:
        _one(a, r * depth + k, depth, panels, at, steps, out, r * width + column, width, add)
