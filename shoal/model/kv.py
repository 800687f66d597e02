from dataclasses import dataclass

import numpy as np
import torch

from shoal.model import paged

BLOCK_SIZE = 16


class PagedKVCache:
    """K and V for a range of layers in one pool of fixed-size blocks, addressed by flat slot ids.

    Slot s lives in block s // block_size at offset s % block_size. A sequence owns a block
    table (a list of block ids); which blocks those are is the caller's business.
    """

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 block_size: int = BLOCK_SIZE):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        if self.in_place:
            paged.warm(dtype)

    @property
    def in_place(self) -> bool:
        """Whether decoding rows attend where their K/V lie (model/paged.py), not through a gather."""
        return paged.supports(self.k, self.block_size)

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k[:, : self.block_size].nbytes

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def copy(self, src_block: int, dst_block: int, n: int) -> None:
        """Copy the first n slots of one block into another, in every layer."""
        src, dst = src_block * self.block_size, dst_block * self.block_size
        self.k[:, dst:dst + n] = self.k[:, src:src + n]
        self.v[:, dst:dst + n] = self.v[:, src:src + n]

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Rows of one slot's whole K (or V): a CPU index_select copies a 2-D tensor's rows whole, a 3-D one's
        # element by element (3x slower in bfloat16, 1.4x in float32)
        return tuple(c[layer].flatten(1).index_select(0, slots).view(-1, *c.shape[2:]) for c in (self.k, self.v))


@dataclass
class SequenceView:
    """One sequence's part of a forward: where its new tokens go and what they attend to."""

    start: int
    query_len: int
    context_slots: torch.Tensor
    mask: torch.Tensor | None
    causal: bool


@dataclass
class PagedRows:
    """Every sequence that adds one token, attended in place: rows of the flat batch, block tables, and the
    context positions [begins, lengths) each attends to."""

    rows: torch.Tensor
    tables: np.ndarray
    lengths: np.ndarray
    begins: np.ndarray


@dataclass
class DecodeGroup:
    """Every sequence that adds one token, attended in one padded call: rows of the flat batch, each
    row's context slots padded to the longest, and which of them it may attend to."""

    rows: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class AttentionBatch:
    """Attention metadata for one batched forward over sequences of different lengths (no padding).

    Tokens of all sequences are concatenated; sequence i contributes query_len tokens at
    positions [context_len - query_len, context_len). Sequences adding a single token attend in place
    (`paged`, where the cache allows it) or form decode groups of similar context length; the others
    (prefill chunks) are attended one by one.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seqs: list[SequenceView]
    decode: list[DecodeGroup]
    paged: PagedRows | None
    span: int  # the longest context: every position is below it

    @classmethod
    def build(cls, block_tables: list[list[int]], starts: list[int], query_lens: list[int],
              block_size: int = BLOCK_SIZE, sliding_window: int | None = None,
              device: torch.device | str = "cpu", in_place: bool = False) -> "AttentionBatch":
        # Every sequence's context slots in one [n, width] array, so the work per tick is a few array ops whatever
        # the batch size; rows past a sequence's context hold slots it never attends to. numpy, not torch: these
        # are small index arrays, and a numpy op costs a fraction of a torch op's dispatch (it runs every step of
        # every stage, on the decode path).
        ctxs = np.add(starts, query_lens)
        all_slots, width = context_slots(block_tables, ctxs, block_size), int(ctxs.max())
        lens = np.asarray(query_lens)
        first = np.cumsum(lens) - lens
        seq = np.repeat(np.arange(len(ctxs)), lens)
        positions = np.asarray(starts)[seq] + np.arange(len(seq)) - first[seq]
        seqs = []
        for i in np.flatnonzero(lens > 1).tolist():
            start, qlen = starts[i], query_lens[i]
            mask, causal = _mask(start, qlen, sliding_window)
            seqs.append(SequenceView(int(first[i]), qlen, _tensor(all_slots[i, :start + qlen], device),
                                     None if mask is None else mask.to(device), causal))
        decoding = np.flatnonzero(lens == 1)
        in_place = in_place and len(decoding) > 0
        # On a GPU, padding is cheap and launching each group's kernels is not: there they attend as one group
        if in_place or not len(decoding):
            parts = []
        elif torch.device(device).type == "cpu":
            parts = _by_length(decoding, ctxs)
        else:
            parts = [decoding]
        groups = [_decode_group(all_slots, first, ctxs, rows, sliding_window, device) for rows in parts]
        rows = _paged_rows(all_slots, block_size, first, ctxs, decoding, sliding_window) if in_place else None
        return cls(_tensor(positions, device), _tensor(all_slots[seq, positions], device), seqs, groups, rows, width)


def context_slots(block_tables: list[list[int]], ctxs: np.ndarray, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """Each sequence's context slots, [n, longest context]; a row past its own context holds slots it never
    attends to."""
    for table, ctx in zip(block_tables, ctxs.tolist(), strict=True):
        if len(table) * block_size < ctx:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {ctx} tokens")
    width, blocks = int(ctxs.max()), max(len(t) for t in block_tables)
    table = np.array([t + [0] * (blocks - len(t)) for t in block_tables], dtype=np.int64)
    return (table[:, :, None] * block_size + np.arange(block_size)).reshape(len(ctxs), -1)[:, :width]


def _tensor(a: np.ndarray, device: torch.device | str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _by_length(decode: np.ndarray, ctxs: np.ndarray) -> list[np.ndarray]:
    """The decoding sequences in groups whose shortest context is over half their longest: each group is padded
    to its longest, so short contexts batched with long ones do not gather and attend the long ones' width
    (at 64 sequences of 100-600 tokens, attention was 30% of a decode step, half of it padding)."""
    order = decode[np.argsort(-ctxs[decode], kind="stable")].tolist()
    groups, begin = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or 2 * ctxs[order[i]] <= ctxs[order[begin]]:
            groups.append(np.sort(order[begin:i]))
            begin = i
    return groups


def attendable(lengths: np.ndarray, width: int, window: int | None) -> np.ndarray:
    """[n, width]: which of its first `width` context positions each row, whose token sits at lengths - 1,
    attends to."""
    k = np.arange(width)[None, :]
    allowed = k < lengths[:, None]
    if window is not None:
        allowed &= k > lengths[:, None] - 1 - window
    return allowed


def _paged_rows(all_slots: np.ndarray, block_size: int, first: np.ndarray, ctxs: np.ndarray,
                decoding: np.ndarray, window: int | None) -> PagedRows:
    tables = (all_slots[decoding, ::block_size] // block_size).astype(np.int32)  # every block a context reaches
    lengths = ctxs[decoding].astype(np.int32)
    begins = np.zeros_like(lengths) if window is None else np.maximum(0, lengths - window).astype(np.int32)
    return PagedRows(torch.from_numpy(first[decoding]), tables, lengths, begins)


def _decode_group(all_slots: np.ndarray, first: np.ndarray, ctxs: np.ndarray, decode: np.ndarray,
                  window: int | None, device: torch.device | str) -> DecodeGroup:
    lengths = ctxs[decode]
    width = int(lengths.max())
    allowed = attendable(lengths, width, window)
    # Where every row attends to its whole width (one sequence, or all of one length) no mask is needed, and
    # attention without one takes a faster kernel.
    mask = None if allowed.all() else _tensor(allowed[:, None, None, :], device)
    return DecodeGroup(_tensor(first[decode], device), _tensor(all_slots[decode, :width], device), mask)


def _mask(start: int, qlen: int, window: int | None) -> tuple[torch.Tensor | None, bool]:
    ctx = start + qlen
    if window is None or ctx <= window:
        if start == 0:
            return None, qlen > 1
        if qlen == 1:
            return None, False
    q = torch.arange(start, ctx)[:, None]
    k = torch.arange(ctx)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed, False
