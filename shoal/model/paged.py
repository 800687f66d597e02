"""Decode attention on a CPU that reads K and V where they lie in the paged cache.

Gathering each decoding sequence's context into a padded batch and then calling SDPA copied every K/V row
once and read it twice, and padded short contexts to the longest: at 64 sequences of 96-576 tokens a layer's
attention took 8-9 ms in a 0.5B model's decode step (2 cores), about a quarter of the step. This kernel walks
each sequence's block table instead, the query heads that share a KV head attending together, 16 tokens at a time
in LLVM vector code (model/simd.py), and asks for the next 16 tokens' rows while it works on these. It takes float32
and bfloat16 caches (numpy, and so numba, has no bfloat16: its bits are read as uint16 and widened to float32), with
head sizes and blocks of a multiple of 16 tokens; other caches take the gather.
"""

import numba
import numpy as np
import torch
from numba import njit, prange

from shoal.model.fused import DTYPES, array, exp, narrow, on_caller
from shoal.model.simd import HEADS, LANES, accumulate16, largest16, prefetch, scores16

# Below this much work (context tokens x query heads x head size), one sequence's decode say, the kernel runs on
# the calling thread: waking numba's threads costs more than they save (one sequence of 90 tokens: 85-110 us a
# layer on 2 threads, 22 on the caller; the two break even at about 2**20)
SERIAL_WORK = 2**20


def supports(cache: torch.Tensor, block_size: int) -> bool:
    """Whether a cache [slots, kv_heads, head_dim] in blocks of block_size attends in place."""
    return (cache.device.type == "cpu" and cache.dtype in DTYPES and cache.shape[-1] % LANES == 0
            and block_size % LANES == 0)


def set_threads(n: int) -> None:
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def warm(dtype: torch.dtype) -> None:
    """Compile (or load from numba's disk cache) the kernel for a cache dtype now, not in a request's first tick:
    compiling takes seconds, loading a fraction of one."""
    cache, out = array(torch.zeros(LANES * LANES, dtype=dtype)), array(torch.zeros(1, 1, 1, LANES, dtype=dtype))
    for kernel in (_attend, _attend_on_caller):
        kernel(np.zeros((1, 1, 1, LANES), np.float32), cache, cache, np.zeros((1, 1), np.int32), np.ones(1, np.int32),
               np.zeros(1, np.int32), np.zeros(1, np.int64), LANES, np.float32(1.0), out)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: np.ndarray, lengths: np.ndarray,
           begins: np.ndarray, block_size: int) -> torch.Tensor:
    """q [n, heads, dim] of n sequences' newest tokens; k, v one layer's cache [slots, kv_heads, dim]; tables
    [n, blocks] int32; sequence i attends to its context positions [begins[i], lengths[i]). Returns [n, heads * dim]
    in q's dtype."""
    n, heads, dim = q.shape
    if not supports(k, block_size):
        raise ValueError(f"in-place attention takes float32 or bfloat16 CPU caches with head sizes and blocks of a "
                         f"multiple of {LANES}, not a {k.dtype} {k.device.type} cache with {dim} and {block_size} "
                         f"(a cache that `supports` refuses attends through the gather)")
    kv_heads = k.shape[1]
    grouped = q.float().view(n, kv_heads, heads // kv_heads, dim).numpy()
    out = torch.empty(n, heads * dim, dtype=q.dtype)
    work = lengths - begins
    threads = numba.get_num_threads() if int(work.sum()) * heads * dim >= SERIAL_WORK else 1
    kernel = _attend if threads > 1 else _attend_on_caller
    kernel(grouped, array(k).reshape(-1), array(v).reshape(-1), tables, lengths, begins, _balanced(work, threads),
           block_size, np.float32(dim ** -0.5), array(out).reshape(grouped.shape))
    return out


@njit(fastmath=True, cache=True)
def _softmax(row, top):
    """row = exp(row - top) / its sum, in place: a function of its own, or numba does not vectorize its loops."""
    total = np.float32(0.0)
    for t in range(row.shape[0]):
        row[t] = exp(row[t] - top)
        total += row[t]
    scale = np.float32(1.0) / total
    for t in range(row.shape[0]):
        row[t] *= scale


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


@njit(inline="always")
def _slot(tables, s, position, block_size):
    return tables[s, position // block_size] * block_size + position % block_size


@njit(parallel=True, fastmath=True, cache=True)
def _attend(q, k, v, tables, lengths, begins, order, block_size, scale, out):
    n, kv_heads, group, dim = q.shape
    stride = kv_heads * dim  # between one slot's K (or V) and the next's
    # A task per sequence reads its rows whole (all KV heads: 20% faster at 64 sequences); a task per sequence
    # and KV head keeps both cores busy when there are only a few sequences
    span = kv_heads if n >= 4 else 1
    split = kv_heads // span
    for task in prange(n * split):
        s, first = order[task // split], task % split * span
        begin, end = begins[s], lengths[s]
        base = begin // LANES * LANES  # the first 16-token chunk, whole: its rows before begin are not attended
        width = (end - base + LANES - 1) // LANES * LANES
        qs = (q[s, first:first + span] * scale).reshape(-1)
        scores = np.empty(span * group * width, dtype=np.float32)
        for c in range(base, end, LANES):
            slot = _slot(tables, s, c, block_size)
            if c + LANES < end:
                prefetch(k, _slot(tables, s, c + LANES, block_size) * stride, LANES * stride)
            for h in range(span):
                at = (slot * kv_heads + first + h) * dim
                for j in range(group):
                    row = h * group + j
                    scores16(k, at, stride, qs, row * dim, dim, scores, row * width + c - base)
        for row in range(span * group):
            at = row * width
            scores[at:at + begin - base] = -np.inf
            scores[at + end - base:at + width] = -np.inf
            _softmax(scores[at + begin - base:at + end - base], largest16(scores, at, width))
        acc = np.zeros(span * group * dim, dtype=np.float32)
        for c in range(base, end, LANES):
            lo, hi = max(c, begin), min(c + LANES, end)
            slot = _slot(tables, s, lo, block_size)
            if c + LANES < end:
                prefetch(v, _slot(tables, s, c + LANES, block_size) * stride, LANES * stride)
            for h in range(span):
                at = (slot * kv_heads + first + h) * dim
                for j in range(0, group, HEADS):
                    row = h * group + j
                    accumulate16(v, at, stride, scores, row * width + lo - base, width, min(HEADS, group - j), hi - lo,
                                 dim, acc, row * dim)
        for h in range(span):
            for j in range(group):
                for e in range(dim):
                    out[s, first + h, j, e] = narrow(out, acc[(h * group + j) * dim + e])


_attend_on_caller = on_caller(_attend)
