"""Small ticks replayed as CUDA graphs: every token a row that attends to its own context so far, as a
decoding sequence's token does (a prefill chunk's tokens are rows of one sequence at successive positions).

On a GPU a small model's decode step is bound by launching its kernels from Python, not by running them: a
0.5B model's step issued about 700 kernels that ran for 2 ms in all, while issuing them took 20 ms. A graph
captured once per (batch, width) bucket replays them all in one launch. Each bucket has static inputs: token
ids, positions, the slots the new K/V go to, and each row's context slots padded to the bucket's width with a
mask over them. Rows past the real batch, and padding, point at a scratch slot no sequence owns.
"""

import numpy as np
import torch

from shoal.model.kv import AttentionBatch, DecodeGroup, PagedKVCache, attendable, context_slots
from shoal.model.transformer import Transformer

MAX_ROWS = 256
MIN_WIDTH = 256
EAGER_WIDTH = 4096  # graphs up to this width are captured when the engine starts, wider ones on first use
MAX_GATHER_BYTES = 256 * 2**20  # the K (or V) a graph's rows gather in one layer: batch x width x a slot's bytes


def pow2(n: int, floor: int = 1) -> int:
    """The least power of two at least n and floor."""
    return max(floor, 1 << max(0, n - 1).bit_length())


class Graph:
    """One captured decode forward and the static tensors it reads and writes."""

    def __init__(self, model: Transformer, kv: PagedKVCache, rows: int, width: int, scratch: int,
                 pool: tuple) -> None:
        device = model.device
        self.ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((rows,), scratch, dtype=torch.long, device=device)
        self.slots = torch.full((rows, width), scratch, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, 1, 1, width, dtype=torch.bool, device=device)
        self.mask[..., 0] = True  # a padding row attends to the scratch slot alone: no row attends to nothing
        group = DecodeGroup(torch.arange(rows, device=device), self.slots, self.mask)
        batch = AttentionBatch(self.positions, self.slot_mapping, seqs=[], decode=[group], paged=None, span=width)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
            model(self.ids, batch, kv)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = model(self.ids, batch, kv)


class DecodeGraphs:
    """CUDA graphs of a whole model's decode forward, one per (batch, width) bucket: those up to EAGER_WIDTH
    captured at once (a capture costs two forwards, about 40 ms for a 0.5B model on an H100: too long to spend in
    a request's tick), wider ones on first use."""

    def __init__(self, model: Transformer, kv: PagedKVCache, scratch: int, max_rows: int):
        self.model, self.kv, self.scratch = model, kv, scratch
        self.max_rows = min(pow2(max_rows), MAX_ROWS)
        c = model.config
        self.window = c.sliding_window
        self.max_slots = MAX_GATHER_BYTES // (c.num_key_value_heads * c.head_dim * model.dtype.itemsize)
        self.graphs: dict[tuple[int, int], Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        model.fill_rotary()  # a graph reads the tables where they lay when it was captured
        widths = sorted({self._key(1, w)[1] for w in _powers(MIN_WIDTH, EAGER_WIDTH)}, reverse=True)
        for width in widths:  # largest first, so that the smaller ones reuse its memory in the pool
            for rows in reversed(_powers(1, self.max_rows)):
                if rows * width <= self.max_slots:
                    self._graph((rows, width))

    def _key(self, rows: int, width: int) -> tuple[int, int]:
        return pow2(rows), min(pow2(width, MIN_WIDTH), self.model.config.max_position_embeddings)

    def fits(self, rows: int, width: int) -> bool:
        key = self._key(rows, width)
        return rows <= self.max_rows and key[0] * key[1] <= self.max_slots

    def forward(self, ids: list[int], block_tables: list[list[int]], starts: list[int],
                block_size: int) -> torch.Tensor:
        """Hidden states of one tick: row i adds token ids[i] at position starts[i] of the sequence whose blocks
        are block_tables[i], attending to positions up to its own (each row's K/V is stored before any row
        attends, in every layer)."""
        ctxs = np.add(starts, 1)
        slots = context_slots(block_tables, ctxs, block_size)
        n, width = slots.shape
        key = self._key(n, width)
        graph, (rows, cols) = self._graph(key), key
        padded = np.full((rows, cols), self.scratch, dtype=np.int64)
        padded[:n, :width] = slots
        allowed = np.zeros((rows, cols), dtype=bool)
        allowed[:, 0] = True
        allowed[:n] = attendable(ctxs, cols, self.window)
        put = np.zeros((3, rows), dtype=np.int64)
        put[0, :n], put[1, :n], put[2] = ids, starts, self.scratch
        put[2, :n] = slots[np.arange(n), ctxs - 1]
        for static, values in zip((graph.ids, graph.positions, graph.slot_mapping), put, strict=True):
            static.copy_(torch.from_numpy(values))
        graph.slots.copy_(torch.from_numpy(padded))
        graph.mask.view(rows, cols).copy_(torch.from_numpy(allowed))
        graph.graph.replay()
        return graph.out[:n]

    def _graph(self, key: tuple[int, int]) -> Graph:
        if key not in self.graphs:
            self.graphs[key] = Graph(self.model, self.kv, *key, self.scratch, self.pool)
        return self.graphs[key]


def _powers(low: int, high: int) -> list[int]:
    """Powers of two from low up to high."""
    return [1 << i for i in range(low.bit_length() - 1, high.bit_length())]
