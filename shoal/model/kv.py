from dataclasses import dataclass

import torch

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
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)


@dataclass
class SequenceView:
    """One sequence's part of a forward: where its new tokens go and what they attend to."""

    start: int
    query_len: int
    context_slots: torch.Tensor
    mask: torch.Tensor | None
    causal: bool


@dataclass
class DecodeGroup:
    """Every sequence that adds one token, attended in one padded call: rows of the flat batch, each
    row's context slots padded to the longest, and which of them it may attend to."""

    rows: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor


@dataclass
class AttentionBatch:
    """Attention metadata for one batched forward over sequences of different lengths (no padding).

    Tokens of all sequences are concatenated; sequence i contributes query_len tokens at
    positions [context_len - query_len, context_len). Sequences adding a single token form the
    decode group; the others (prefill chunks) are attended one by one.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seqs: list[SequenceView]
    decode: DecodeGroup | None

    @classmethod
    def build(cls, block_tables: list[list[int]], starts: list[int], query_lens: list[int],
              block_size: int = BLOCK_SIZE, sliding_window: int | None = None,
              device: torch.device | str = "cpu") -> "AttentionBatch":
        positions, slots, seqs, decode, offset = [], [], [], [], 0
        for table, start, qlen in zip(block_tables, starts, query_lens, strict=True):
            ctx = start + qlen
            if len(table) * block_size < ctx:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {ctx} tokens")
            pos = torch.arange(ctx)
            context_slots = torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
            positions.append(pos[start:])
            slots.append(context_slots[start:])
            if qlen == 1:
                decode.append((offset, context_slots))
            else:
                mask, causal = _mask(start, qlen, sliding_window)
                seqs.append(SequenceView(offset, qlen, context_slots.to(device),
                                         None if mask is None else mask.to(device), causal))
            offset += qlen
        group = _decode_group(decode, sliding_window, device) if decode else None
        return cls(torch.cat(positions).to(device), torch.cat(slots).to(device), seqs, group)


def _decode_group(decode: list[tuple[int, torch.Tensor]], window: int | None,
                  device: torch.device | str) -> DecodeGroup:
    width = max(len(s) for _, s in decode)
    slots = torch.zeros(len(decode), width, dtype=torch.long)
    lengths = torch.tensor([len(s) for _, s in decode])
    for i, (_, s) in enumerate(decode):
        slots[i, :len(s)] = s
    k = torch.arange(width)[None, :]
    allowed = k < lengths[:, None]
    if window is not None:
        allowed &= k > lengths[:, None] - 1 - window
    rows = torch.tensor([row for row, _ in decode])
    return DecodeGroup(rows.to(device), slots.to(device), allowed[:, None, None, :].to(device))

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
