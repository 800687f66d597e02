"""A bfloat16 matrix-vector product in numba, for decoding one or two sequences on a CPU.

One sequence's decode step multiplies every weight by a single row, so it runs as fast as the weights stream from
memory. oneDNN's packed bfloat16 product streamed a 0.5B model's weights at 20-21 GB/s on an AMD EPYC (Zen 4,
AVX512-BF16, where a float32 sum reads 35 GB/s), torch's plain one at 9-12. This kernel reads each weight row as
int32 pairs of bfloat16 (element 2j in the low half, 2j + 1 in the high half): a shift and a mask make each half a
float32, multiplied by x's even and odd elements in turn, so the loop vectorizes with no shuffles: 23-28 GB/s for
the layers, 31-32 for the LM head. `tune` times it as one more way for one or two rows; a CPU where oneDNN streams
faster keeps oneDNN. It is timed twice, split among numba's threads and on the calling thread.
"""

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange
from numba.core.dispatcher import Dispatcher

from shoal.model.fused import array, float_bits, narrow, on_caller


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for bfloat16 x [rows, k] and a row-major weight [n, k] of even k (other operands, or views
    that start mid-pair, take F.linear). Each weight row is read once, for all of x's rows: a kernel for few rows.
    The weight's rows are split among numba's threads."""
    return _product(_gemv, x, weight)


def gemv_on_caller(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`gemv` on the calling thread: waking numba's threads took about 40 us a call on that EPYC, and one thread
    streamed a small weight faster (qkv and o of a 0.5B model: 17-18 against 12-14 GB/s; gate, up and down, of
    8.7 MB each, 19-23 against 25-26)."""
    return _product(_gemv_on_caller, x, weight)


def warm() -> None:
    """Compile (or load from numba's disk cache) both kernels now, not in a request's first tick."""
    x = torch.ones(1, 2, dtype=torch.bfloat16)
    gemv(x, x), gemv_on_caller(x, x)


def _product(kernel: Dispatcher, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    if not (_pairs(x) and _pairs(weight)):
        return F.linear(x, weight)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)
    kernel(weight.view(torch.int32).numpy(), x.view(torch.int32).numpy(), array(out))
    return out


def _pairs(t: torch.Tensor) -> bool:
    """Whether a tensor's rows can be read as int32 pairs of bfloat16."""
    return t.dtype == torch.bfloat16 and t.is_contiguous() and t.shape[-1] % 2 == 0 and t.storage_offset() % 2 == 0


@njit(parallel=True, fastmath=True, cache=True)
def _gemv(w, x, out):
    # x's bits are read as w's are, and out's written as bfloat16 bits: converted with torch, three ops more, a
    # small product's call took 20 us, 8.6 without them
    n, half = w.shape
    even, odd = np.empty((x.shape[0], half), np.float32), np.empty((x.shape[0], half), np.float32)
    for r in range(x.shape[0]):
        for j in range(half):
            even[r, j], odd[r, j] = _low(x[r, j]), _high(x[r, j])
    for i in prange(n):
        weights = w[i]
        for r in range(x.shape[0]):
            xe, xo = even[r], odd[r]
            acc = np.float32(0.0)
            for j in range(half):
                acc += _low(weights[j]) * xe[j] + _high(weights[j]) * xo[j]
            out[r, i] = narrow(out, acc)


@njit(inline="always")
def _low(pair):
    """The bfloat16 in an int32 pair's low half (its even element), as float32."""
    return float_bits(pair << np.int32(16))


@njit(inline="always")
def _high(pair):
    """The bfloat16 in an int32 pair's high half (its odd element), as float32."""
    return float_bits(pair & np.int32(-65536))


_gemv_on_caller = on_caller(_gemv)
