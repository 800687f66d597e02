"""Save points and warm restore: the engine's prefix cache on disk (seed 001).

Rows are written at the seed's save points: `cold` (a prompt's block-aligned prefix after a
prefill that found little in cache), `continued` (every `continued_every` generated tokens),
`finish` (a request's whole context, under its finish_key), `evict` (a cached block about to be
reused, with the context it ends, or a session pin about to be reclaimed) and `shutdown` (every
pinned session when the engine stops). The KV is copied out in the model thread; a writer
thread publishes it, through a bounded queue that drops a save rather than stall the engine,
except `evict` and `shutdown`, which write at once because the memory is about to go. A row
already on disk (or on its way) is never written again. A request resumes from disk when the
row there is longer than what RAM holds: its parent_key's row first (waiting briefly for that
row's save to land), else the longest block-aligned prefix.
"""

import logging
import queue
import threading
import time
from collections import Counter

import torch

from shoal.engine.blocks import BlockManager
from shoal.engine.disk import DiskCache, Row
from shoal.engine.sequence import Sequence
from shoal.model.kv import PagedKVCache

log = logging.getLogger("shoal.engine")


class Saver:
    def __init__(self, disk: DiskCache, blocks: BlockManager, kv: PagedKVCache, min_tokens: int = 64,
                 continued_every: int = 256, queue_size: int = 16, resume_wait_ms: float = 500.0,
                 evict_every_s: float = 0.1):
        self.disk, self.blocks, self.kv = disk, blocks, kv
        self.min_tokens, self.continued_every, self.resume_wait_ms = min_tokens, continued_every, resume_wait_ms
        self.evict_every_s, self._evict_at = evict_every_s, 0.0
        self.counts: Counter[str] = Counter(dict.fromkeys(
            ("hits_disk", "misses_disk", "restored_tokens", "saves_dropped", "writer_errors"), 0))
        self._queue: queue.Queue[Row | None] = queue.Queue(maxsize=queue_size)
        self._inflight: set[str] = set()
        self._landed = threading.Condition()
        self._writer = threading.Thread(target=self._write, name="shoal-kv-writer", daemon=True)
        self._writer.start()

    # save points (model thread) ---------------------------------------------------------------

    def after_token(self, seq: Sequence) -> None:
        """`cold` once the prompt is in (when the cache gave little of it), `continued` as generation grows."""
        generated, bs = len(seq.completion_ids), self.blocks.block_size
        if generated == 1 and seq.cache_hit_kind in ("cold", "partial"):
            n = (seq.num_prompt_tokens - 1) // bs * bs
            if n >= self.min_tokens and n > seq.cached_tokens:
                self.save(seq, n, "cold")
        elif generated > 1 and generated % self.continued_every == 0:
            n = seq.num_computed // bs * bs
            if n >= self.min_tokens:
                self.save(seq, n, "continued")

    def save(self, seq: Sequence, n: int, reason: str, key: str | None = None, now: bool = False) -> None:
        """Write the first n computed tokens of seq (under `key`, else their prefix key)."""
        self._save(seq.block_table, seq.token_ids[:n], reason, key, now)

    def evict(self, block_id: int) -> None:
        """A full cached block is about to be reused: write down the context it ends, if every block of it is
        still cached, at most one such write per `evict_every_s` (they stall the tick that reuses the block)."""
        ids = self.blocks.chain(block_id)
        if ids is None or len(ids) * self.blocks.block_size < self.min_tokens or time.monotonic() < self._evict_at:
            return
        self._evict_at = time.monotonic() + self.evict_every_s
        self._save(ids, [t for i in ids for t in self.blocks.blocks[i].tokens], "evict", None, True)

    def _save(self, table: list[int], tokens: list[int], reason: str, key: str | None, now: bool) -> None:
        key = key or self.blocks.keys(tokens)[-1]
        with self._landed:
            if key in self._inflight or self.disk.has(key):
                return
            if not now:
                self._inflight.add(key)  # before the writer can see it, so it is never left marked
        row = Row(key, tokens, *self._gather(table, len(tokens)), reason)
        if now:
            self.disk.save(row)
            return
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.counts["saves_dropped"] += 1
            with self._landed:
                self._inflight.discard(key)

    def finish(self, seq: Sequence, key: str, now: bool = False, reason: str = "finish") -> None:
        """A finished context under its finish_key: every token but the last, which was never fed. One cut short
        in its prefill is saved as the block-aligned prefix it got through, under that prefix's own key."""
        if seq.num_computed == len(seq) - 1 and seq.num_computed >= self.min_tokens:
            self.save(seq, seq.num_computed, reason, key, now)
        elif (n := seq.num_computed // self.blocks.block_size * self.blocks.block_size) >= self.min_tokens:
            self.save(seq, n, reason, now=now)

    def _gather(self, table: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self._slots(table, n)
        return self.kv.k[:, slots].cpu(), self.kv.v[:, slots].cpu()

    def _slots(self, table: list[int], n: int) -> torch.Tensor:
        bs, i = self.blocks.block_size, torch.arange(n)
        return torch.tensor(table, dtype=torch.long)[i // bs] * bs + i % bs

    # restore (model thread) -------------------------------------------------------------------

    def restore(self, seq: Sequence, in_ram: int) -> bool:
        """Give an empty seq its prefix from disk if a row there is longer than the `in_ram` tokens RAM holds
        and fits; False leaves seq to the RAM cache."""
        key = self._probe(seq, in_ram)
        row = self.disk.load(key) if key else None
        if (row is None or seq.token_ids[:len(row.tokens)] != row.tokens or not in_ram < len(row.tokens) < len(seq)):
            return False
        n = len(row.tokens)
        if not self.blocks.can_grow(seq, n):
            return False
        self.blocks.grow(seq, n)
        seq.chain = self.blocks.root
        slots = self._slots(seq.block_table, n).to(self.kv.k.device)
        self.kv.k[:, slots] = row.k.to(self.kv.k.device, self.kv.k.dtype)
        self.kv.v[:, slots] = row.v.to(self.kv.v.device, self.kv.v.dtype)
        seq.num_computed = n
        self.blocks.register(seq)
        self.counts["hits_disk"] += 1
        self.counts["restored_tokens"] += n
        return True

    def _probe(self, seq: Sequence, in_ram: int) -> str | None:
        bs = self.blocks.block_size
        keys = self.blocks.keys(seq.token_ids[:-1])
        if seq.parent_key is not None and seq.parent_key in keys:
            parent_len = keys.index(seq.parent_key) + 1  # its row holds all of it but the last token
            if parent_len - 1 <= in_ram:
                return None  # RAM already has it: no reading, no waiting
            self._await(seq.parent_key)
            if self.disk.has(seq.parent_key):
                return seq.parent_key
        for n in range(len(keys) // bs * bs, in_ram, -bs):
            if self.disk.has(keys[n - 1]):
                return keys[n - 1]
        self.counts["misses_disk"] += 1
        return None

    def _await(self, key: str) -> None:
        deadline = time.monotonic() + self.resume_wait_ms / 1000
        with self._landed:
            while key in self._inflight and time.monotonic() < deadline:
                self._landed.wait(deadline - time.monotonic())

    # writer thread ----------------------------------------------------------------------------

    def _write(self) -> None:
        while (row := self._queue.get()) is not None:
            try:
                self.disk.save(row)
            except (OSError, ValueError) as e:  # a failed save costs the row, never the writer
                self.counts["writer_errors"] += 1
                log.warning("KV save failed", extra={"error": str(e), "reason": row.reason})
            with self._landed:
                self._inflight.discard(row.key)
                self._landed.notify_all()

    def close(self) -> None:
        """Let the queued saves land, then stop the writer."""
        self._queue.put(None)
        self._writer.join()

    def stats(self) -> dict:
        return {**self.disk.stats(), **self.counts, "save_queue": self._queue.qsize()}
