"""Decode attention on a CPU that reads K and V where they lie in the paged cache.

Gathering each decoding sequence's context into a padded batch and then calling SDPA copied every K/V row
once and read it twice, and padded short contexts to the longest: at 64 sequences of 96-576 tokens a layer's
attention took 8-9 ms in a 0.5B model's decode step (2 cores), about a quarter of the step. This kernel walks
each sequence's block table instead, the query heads that share a KV head attending together: 3.1-3.4 ms for
that layer with its K/V out of cache. It takes float32 and bfloat16 caches (numpy, and so numba, has no
bfloat16: its bits are read as uint16 and widened to float32).
"""

import numba
import numpy as np
import torch
from numba import njit, prange
from numba.extending import overload

from shoal.model.fused import DTYPES, array, exp, on_caller, wide

# Below this much work (context tokens x query heads x head size), one sequence's decode say, the kernel runs on
# the calling thread: waking numba's threads costs more than they save (one sequence of 90 tokens: 85-110 us a
# layer on 2 threads, 22 on the caller; the two break even at about 2**20)
SERIAL_WORK = 2**20


def supports(cache: torch.Tensor) -> bool:
    return cache.device.type == "cpu" and cache.dtype in DTYPES


def set_threads(n: int) -> None:
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def warm(dtype: torch.dtype) -> None:
    """Compile (or load from numba's disk cache) the kernel for a cache dtype now, not in a request's first tick:
    compiling takes seconds, loading a fraction of one."""
    cache = array(torch.zeros(1, 1, 1, dtype=dtype))
    for kernel in (_attend, _attend_on_caller):
        kernel(np.zeros((1, 1, 1, 1), np.float32), cache, cache, np.zeros((1, 1), np.int32), np.ones(1, np.int32),
               np.zeros(1, np.int32), np.zeros(1, np.int64), 1, np.float32(1.0), np.empty((1, 1, 1, 1), np.float32))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: np.ndarray, lengths: np.ndarray,
           begins: np.ndarray, block_size: int) -> torch.Tensor:
    """q [n, heads, dim] of n sequences' newest tokens; k, v one layer's cache [slots, kv_heads, dim]; tables
    [n, blocks] int32; sequence i attends to its context positions [begins[i], lengths[i]). Returns [n, heads * dim]
    in q's dtype."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.float().view(n, kv_heads, heads // kv_heads, dim).numpy()
    out = np.empty_like(grouped)
    work = lengths - begins
    threads = numba.get_num_threads() if int(work.sum()) * heads * dim >= SERIAL_WORK else 1
    kernel = _attend if threads > 1 else _attend_on_caller
    kernel(grouped, array(k), array(v), tables, lengths, begins, _balanced(work, threads), block_size,
           np.float32(dim ** -0.5), out)
    return torch.from_numpy(out).view(n, heads * dim).to(q.dtype)


def _row(cache, slot, buf):  # typed per call by numba: see _row_impl
    raise NotImplementedError


@overload(_row, inline="always")
def _row_impl(cache, slot, buf):
    """One slot's K (or V) of every KV head as float32 [kv_heads, dim]: a view of a float32 cache, a bfloat16
    (uint16) row widened into buf."""
    if cache.dtype == numba.types.float32:
        return lambda cache, slot, buf: cache[slot]

    def widen(cache, slot, buf):
        for h in range(buf.shape[0]):
            for e in range(buf.shape[1]):
                buf[h, e] = wide(cache[slot, h, e])
        return buf

    return widen


@njit(cache=True)
def _balanced(work, workers):
    """Sequence indices in an order whose contiguous shares, as prange hands them to its threads (the first ones a
    task more where they do not divide evenly), hold about equal work: ranked longest first and dealt to the threads
    in rounds, back and forth; a last, partial round to the first threads. In serving, the oldest sequences come
    first and have the longest contexts: split in index order, one thread took 1.45x its share."""
    ranked = np.argsort(-work)
    owner = np.empty(len(work), dtype=np.int64)
    whole = len(work) // workers * workers
    for i in range(len(work)):
        j = i % workers
        owner[ranked[i]] = j if i >= whole or i // workers % 2 == 0 else workers - 1 - j
    return np.argsort(owner, kind="mergesort")


@njit(parallel=True, fastmath=True, cache=True)
def _attend(q, k, v, tables, lengths, begins, order, block_size, scale, out):
    n, kv_heads, group, dim = q.shape
    # A task per sequence reads its rows whole (all KV heads: 20% faster at 64 sequences); a task per sequence
    # and KV head keeps both cores busy when there are only a few sequences
    span = kv_heads if n >= 4 else 1
    split = kv_heads // span
    for task in prange(n * split):
        s, first = order[task // split], task % split * span
        begin, end = begins[s], lengths[s]
        qs = q[s, first:first + span] * scale
        buf = np.empty((kv_heads, dim), dtype=np.float32)
        scores = np.empty((span, group, end - begin), dtype=np.float32)
        for t in range(begin, end):
            kr = _row(k, tables[s, t // block_size] * block_size + t % block_size, buf)
            for h in range(span):
                for j in range(group):
                    acc = np.float32(0.0)
                    for e in range(dim):
                        acc += qs[h, j, e] * kr[first + h, e]
                    scores[h, j, t - begin] = acc
        for h in range(span):
            for j in range(group):
                row = scores[h, j]
                top, total = row.max(), np.float32(0.0)
                for t in range(row.shape[0]):
                    row[t] = exp(row[t] - top)
                    total += row[t]
                row /= total
        acc = np.zeros((span, group, dim), dtype=np.float32)
        for t in range(begin, end):
            vr = _row(v, tables[s, t // block_size] * block_size + t % block_size, buf)
            for h in range(span):
                for j in range(group):
                    p = scores[h, j, t - begin]
                    for e in range(dim):
                        acc[h, j, e] += p * vr[first + h, e]
        out[s, first:first + span] = acc


_attend_on_caller = on_caller(_attend)
