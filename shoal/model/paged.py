"""Decode attention on a CPU that reads K and V where they lie in the paged cache.

Gathering each decoding sequence's context into a padded batch and then calling SDPA copied every K/V row
once and read it twice, and padded short contexts to the longest: at 64 sequences of 96-576 tokens a layer's
attention took 8-12 ms, of a 0.5B model's 0.72 s decode step about a third. This kernel walks each sequence's
block table instead, one (sequence, KV head) pair per task, the query heads that share a KV head attending
together: 2.7-3.8 ms for that layer. It takes float32 and bfloat16 caches (numpy, and so numba, has no
bfloat16: its bits are read as uint16 and widened to float32).
"""

import numba
import numpy as np
import torch
from numba import njit, prange
from numba.extending import overload

DTYPES = (torch.float32, torch.bfloat16)


def supports(cache: torch.Tensor) -> bool:
    return cache.device.type == "cpu" and cache.dtype in DTYPES


def set_threads(n: int) -> None:
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def warm(dtype: torch.dtype) -> None:
    """Compile (or load from numba's disk cache) the kernel for a cache dtype now, not in a request's first tick:
    compiling takes seconds, loading a fraction of one."""
    cache = torch.zeros(1, 1, 1, dtype=dtype)
    attend(torch.zeros(1, 1, 1, dtype=dtype), cache, cache, np.zeros((1, 1), np.int32), np.ones(1, np.int32),
           np.zeros(1, np.int32), 1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: np.ndarray, lengths: np.ndarray,
           begins: np.ndarray, block_size: int) -> torch.Tensor:
    """q [n, heads, dim] of n sequences' newest tokens; k, v one layer's cache [slots, kv_heads, dim]; tables
    [n, blocks] int32; sequence i attends to its context positions [begins[i], lengths[i]). Returns [n, heads * dim]
    in q's dtype."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.float().view(n, kv_heads, heads // kv_heads, dim).numpy()
    out = np.empty_like(grouped)
    k, v = (c.numpy() if c.dtype == torch.float32 else c.view(torch.uint16).numpy() for c in (k, v))
    _attend(grouped, k, v, tables, lengths, begins, block_size, np.float32(dim ** -0.5), out)
    return torch.from_numpy(out).view(n, heads * dim).to(q.dtype)


def _row(cache, slot, head, buf):  # typed per call by numba: see _row_impl
    raise NotImplementedError


@overload(_row, inline="always")
def _row_impl(cache, slot, head, buf):
    """One cache row as float32: a view of a float32 cache, a bfloat16 (uint16) row widened into buf."""
    if cache.dtype == numba.types.float32:
        return lambda cache, slot, head, buf: cache[slot, head]

    def widen(cache, slot, head, buf):
        bits = buf.view(np.uint32)
        for e in range(buf.shape[0]):
            bits[e] = np.uint32(cache[slot, head, e]) << 16
        return buf

    return widen


@njit(parallel=True, fastmath=True, cache=True)
def _attend(q, k, v, tables, lengths, begins, block_size, scale, out):
    n, kv_heads, group, dim = q.shape
    for task in prange(n * kv_heads):
        s, h = task // kv_heads, task % kv_heads
        begin, end = begins[s], lengths[s]
        qs = q[s, h] * scale
        buf = np.empty(dim, dtype=np.float32)
        scores = np.empty((end - begin, group), dtype=np.float32)
        for t in range(begin, end):
            kr = _row(k, tables[s, t // block_size] * block_size + t % block_size, h, buf)
            for j in range(group):
                acc = np.float32(0.0)
                for e in range(dim):
                    acc += qs[j, e] * kr[e]
                scores[t - begin, j] = acc
        top = np.full(group, -np.inf, dtype=np.float32)
        for t in range(end - begin):
            for j in range(group):
                top[j] = max(top[j], scores[t, j])
        total = np.zeros(group, dtype=np.float32)
        acc = np.zeros((group, dim), dtype=np.float32)
        for t in range(begin, end):
            vr = _row(v, tables[s, t // block_size] * block_size + t % block_size, h, buf)
            for j in range(group):
                p = np.exp(scores[t - begin, j] - top[j])
                total[j] += p
                for e in range(dim):
                    acc[j, e] += p * vr[e]
        for j in range(group):
            for e in range(dim):
                out[s, h, j, e] = acc[j, e] / total[j]
