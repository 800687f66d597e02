"""Linear layers whose CPU product is chosen by measurement, per weight shape and row count.

On a CPU the kernel behind `x @ W.T` depends on the library, the weight's memory layout and how the
product is phrased, and the spread is wide:
- torch's BLAS (MKL) runs a wide matrix-vector product up to twice as fast from a column-major weight,
  and 2-64 rows often faster as `(W @ x.T).T`;
- numpy's OpenBLAS ran float32 matrix-vector products 2-2.6x faster than MKL on an AMD EPYC (where MKL
  does not take its fastest paths), and large float32 products 1.1-1.3x faster;
- oneDNN, given a weight packed once into its own blocked layout, ran bfloat16 products on that EPYC
  1.1-1.6x faster for one row and as fast for 64 (a 0.5B model decoded one sequence 18-35% faster),
  while float32 single rows ran twice as slow as OpenBLAS's;
- `tiles` multiplies a copy of the weight laid out in panels: in float32 1.2-1.4x faster than OpenBLAS at 64 rows
  on a Zen 3 EPYC, in bfloat16 1.1-1.6x faster than oneDNN's packed product at 1-64 rows on a Zen 4 EPYC.
`tune` times them all on stand-ins of a model's weight shapes and chooses, per row bucket; `pack_loaded` makes the
copies its choices need.
"""

import bisect
import functools
import re
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController
from torch import nn

from shoal.model import paged, tiles, tunings
from shoal.model.gemv import gemv, gemv_on_caller

# Decode ticks, then prefill chunks (n_batch's default): more rows go the last bucket's way. The ranking at 64
# rows does not hold for 512: on an AMX Xeon a bfloat16 down projection ran 1.2x faster flipped at 64 rows, and
# 1.8x slower at 512 (where its packed copy ran 2.2x faster)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 512)
# The most rows for which `gemv` is timed: on a Zen 4 EPYC it beat oneDNN's packed product by 15-80% at 2 rows
# on every shape but down (20% slower), and lost at 4 and more on all but qkv
GEMV_ROWS = 2
PACK_ROWS = 64  # the row count oneDNN lays a packed weight out for (it takes any)
# OpenBLAS's float32 kernels (Haswell's, which Zen takes too) run rows in groups of ROW_GROUP and the rest through
# slower edge code: on a Zen 3 EPYC, 54 rows at 107 GFLOP/s, 56 at 141. Up to PAD_ROWS rows, a count that leaves 2-7
# over is padded with zero rows to the next multiple of ROW_GROUP (one over costs the edge code little, and padding 7
# more; above 64 rows padding gained nothing)
ROW_GROUP, PAD_ROWS = 8, 64
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


def tiled(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product by `tiles` over the weight's copy in panels, plus the bias if any (float32 or bfloat16)."""
    return tiles.product(x, panels, bias)


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
    packed one), with `panels` (weights `tiles` supports) the tiled one. Up to GEMV_ROWS bfloat16 rows may take numba's
    matrix-vector kernels."""
    if dtype == torch.float32:
        unpacked = (plain, flipped, openblas)
    else:
        few = dtype == torch.bfloat16 and rows <= GEMV_ROWS
        unpacked = (plain, flipped, gemv, gemv_on_caller) if few else (plain, flipped)
    return (*unpacked, *(packed_product,) * packs, *(tiled,) * panels)


def set_threads(n: int) -> None:
    """Run torch's math, numpy's BLAS and the paged attention on `n` threads each (they take turns, never run at
    once). numba's first: starting its threads sets the OpenMP runtime it shares with torch to every core."""
    paged.set_threads(n)
    torch.set_num_threads(n)
    ThreadpoolController().limit(limits=n, user_api="blas")


def take_threads() -> None:
    """Give the calling thread the process's math threads (torch's count): numba's count is each thread's own, and a
    new thread's is every core."""
    set_threads(torch.get_num_threads())


def bucket(rows: int) -> int:
    """Index of the smallest bucket holding `rows` (the last one for more)."""
    return min(len(ROW_BUCKETS) - 1, bisect.bisect_left(ROW_BUCKETS, rows))


class Linear(nn.Linear):
    """nn.Linear that multiplies the way `tune` found fastest for the row count: `ways` per row bucket (empty:
    always plain). `packed_product` multiplies a weight that `pack_loaded` packed: the weight itself where every
    bucket multiplies a copy and no other module shares it, else a copy beside it (`packed`); `tiled` multiplies a
    copy in panels (`panels`)."""

    ways: tuple[Way, ...] = ()
    packed: torch.Tensor | None = None
    panels: torch.Tensor | None = None
    # The most rows `tune` times: more take that bucket's way. An LM head multiplies one row per sampled sequence,
    # at most n_seq_max, never a prefill tick's 512: timing it there took about 11 of the 30 s of a 0.5B model's head
    timed_rows: int = ROW_BUCKETS[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.weight if self.weight.is_mkldnn else self.packed
        return product(x, self.weight, self.bias, self.ways, packed, self.panels)


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ways: tuple[Way, ...],
            packed: torch.Tensor | None = None, panels: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if ways else 0
    way = ways[bucket(rows)] if ways else plain
    if way is plain:
        return F.linear(x, weight, bias)
    if way is packed_product:
        return packed_product(x, packed, bias)
    if way is tiled:
        out = tiled(x.reshape(rows, -1), panels, bias)
    else:
        out = way(x.reshape(rows, -1), weight)
        out = out if bias is None else out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix, stored column-major."""
    return t.t().contiguous().t()


def pack_loaded(model: nn.Module) -> None:
    """Make the copies `tune` chose: lay out in panels the weights `tiled` multiplies, pack those `packed_product`
    multiplies (in place where every row count multiplies a copy and no other module shares the weight, else as a
    copy beside it)."""
    held = shared_ids(model)
    linears = [m for m in model.modules() if isinstance(m, Linear) and not m.weight.is_mkldnn]
    for dtype in {m.weight.dtype for m in linears if tiled in m.ways}:
        tiles.warm(dtype)
    for m in linears:
        if tiled in m.ways and m.panels is None:
            m.panels = tiles.pack(m.weight)
        if packed_product not in m.ways or m.packed is not None:
            continue
        if in_copies(m.ways) and id(m.weight) not in held:
            m.weight = nn.Parameter(pack(m.weight), requires_grad=False)
        else:
            m.packed = pack(m.weight)


def in_copies(ways: tuple[Way, ...]) -> bool:
    """Whether every row bucket multiplies a copy, the packed weight among them: the weight itself can be packed in
    place, with no plain copy beside it."""
    return packed_product in ways and all(way in COPIED for way in ways)


def shared_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters that a module other than a `Linear` holds (an embedding tied to the LM head)."""
    return {id(p) for m in model.modules() if not isinstance(m, Linear) for p in m.parameters(recurse=False)}
