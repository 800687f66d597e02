import torch

from shoal.engine.sequence import Sequence
from shoal.model.graphs import DecodeGraphs
from shoal.model.kv import AttentionBatch, PagedKVCache
from shoal.model.transformer import Transformer


def num_blocks_for(model: Transformer, kv_cache_mb: float, block_size: int) -> int:
    c = model.config
    per_block = 2 * model.num_layers * block_size * c.num_key_value_heads * c.head_dim * model.dtype.itemsize
    return int(kv_cache_mb * 2**20 // per_block)


class Runner:
    """Runs one batched forward over the chunks a tick scheduled, on the model's layer range."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, max_rows: int, graphs: bool = True):
        self.model = model
        graphs = graphs and model.device.type == "cuda" and model.is_first and model.is_last
        # With graphs, one block more than the engine hands out: its first slot takes the padding rows' K/V
        self.kv: PagedKVCache = model.new_cache(num_blocks + graphs, block_size)
        self.graphs = DecodeGraphs(model, self.kv, num_blocks * block_size, max_rows) if graphs else None
        self.logits: torch.Tensor | None = None  # see _buffer

    def copy(self, copies: list[tuple[int, int, int]]) -> None:
        for src, dst, n in copies:
            self.kv.copy(src, dst, n)

    def forward(self, batch: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """The sequences whose chunk reaches their last token, and their fp32 logits [n, vocab] in that order, on
        the model's device. The other rows only store their K/V: the last layer skips their output."""
        rows, seqs, end = [], [], 0
        for seq, n in batch:
            end += n
            if seq.num_computed + n == len(seq):
                rows.append(end - 1)
                seqs.append(seq)
        device = self.model.device
        # With no row sampled, the last layer still runs one row: no product meets zero rows
        keep = None if len(rows) == end else torch.tensor(rows or [end - 1], dtype=torch.long, device=device)
        ids = [t for seq, n in batch for t in seq.token_ids[seq.num_computed:seq.num_computed + n]]
        if self.graphs is not None and len(ids) <= self.graphs.max_rows:
            # Each token a row of its own that attends to its context so far, as a decoding sequence's does: a
            # small tick replays a graph, prefill chunks included (a cached prompt's few new tokens)
            starts = [seq.num_computed + j for seq, n in batch for j in range(n)]
            if self.graphs.fits(len(ids), max(starts) + 1):
                tables = [seq.block_table for seq, n in batch for _ in range(n)]
                hidden = self.graphs.forward(ids, tables, starts, self.kv.block_size)
                return self._logits(seqs, hidden if keep is None else hidden[keep])
        meta = AttentionBatch.build([seq.block_table for seq, _ in batch], [seq.num_computed for seq, _ in batch],
                                    [n for _, n in batch], self.kv.block_size, self.model.config.sliding_window,
                                    device, self.kv.in_place)
        return self._logits(seqs, self.model(torch.tensor(ids, device=device), meta, self.kv, keep=keep))

    def _logits(self, seqs: list[Sequence], hidden: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        if not seqs:
            return [], hidden.new_empty(0, 0)
        return seqs, self.model.compute_logits(hidden, self._buffer(len(hidden)))

    def _buffer(self, rows: int) -> torch.Tensor | None:
        """Where a tick's float32 logits go: a buffer the next tick overwrites (a tick samples its own), of at least
        `rows` rows; none for a float32 model, whose LM head writes float32 logits itself."""
        if self.model.dtype == torch.float32:
            return None
        if self.logits is None or len(self.logits) < rows:
            self.logits = torch.empty(rows, self.model.config.vocab_size, device=self.model.device)
        return self.logits
