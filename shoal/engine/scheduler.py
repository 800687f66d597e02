import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable

from shoal.engine.blocks import BlockManager
from shoal.engine.sequence import Sequence, State


class Scheduler:
    """Chooses each tick's work under a token budget and owns sequences between requests.

    A tick takes every decoding sequence first (one token each), then prefill chunks of at most
    `chunk` tokens: running prefills before new admissions, admissions by (priority, arrival).
    When blocks run out it reclaims idle session pins, least recently used first, then preempts
    the most recently admitted sequence, which is recomputed later through the prefix cache.
    """

    def __init__(self, blocks: BlockManager, n_batch: int, chunk: int, n_seq_max: int):
        self.blocks, self.n_batch, self.chunk, self.n_seq_max = blocks, n_batch, chunk, n_seq_max
        self.waiting: list[tuple[int, int, int, Sequence]] = []
        self._ties = itertools.count()
        self.running: list[Sequence] = []
        self.sessions: OrderedDict[str, Sequence] = OrderedDict()
        self.copies: list[tuple[int, int, int]] = []
        self.restore: Callable[[Sequence, int], bool] | None = None  # from a lower tier, given what RAM holds
        self.on_evict: Callable[[Sequence], None] | None = None  # a session pin about to be reclaimed

    def add(self, seq: Sequence) -> None:
        heapq.heappush(self.waiting, (seq.priority, seq.arrival, next(self._ties), seq))
        seq.mark(State.QUEUED)

    def finish(self, seq: Sequence, pin: bool) -> None:
        """Take seq out of the queue or the batch; with pin, a session's sequence keeps its blocks."""
        if seq not in self.running:
            self.waiting = [w for w in self.waiting if w[-1] is not seq]
            heapq.heapify(self.waiting)
            return
        self.running.remove(seq)
        self.blocks.register(seq, partial=True)
        if pin and seq.session_id is not None:
            self.sessions[seq.session_id] = seq
            self.sessions.move_to_end(seq.session_id)
        else:
            self.blocks.free(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget, batch = self.n_batch, {}
        for seq in [s for s in self.running if not s.is_prefill] + [s for s in self.running if s.is_prefill]:
            if seq not in self.running or seq.paused_since is not None or budget == 0:
                continue
            n = min(seq.num_pending, self.chunk, budget)
            if self._make_room(seq, n, batch):
                self.blocks.grow(seq, n)
                batch[seq] = n
                budget -= n
        while self.waiting and budget and len(self.running) < self.n_seq_max:
            seq, copies = self.waiting[0][-1], len(self.copies)
            self._admit(seq)
            n = min(seq.num_pending, self.chunk, budget)
            if not self._reclaim(seq, n):
                del self.copies[copies:]
                self.blocks.free(seq)
                break
            heapq.heappop(self.waiting)
            self.running.append(seq)
            seq.mark(State.SCHEDULED)
            self.blocks.grow(seq, n)
            batch[seq] = n
            budget -= n
        return list(batch.items())

    def _make_room(self, seq: Sequence, n: int, scheduled: dict[Sequence, int]) -> bool:
        """Free blocks for seq's next n tokens; False if seq itself had to be preempted."""
        while not self._reclaim(seq, n):
            victim = next(s for s in reversed(self.running) if s not in scheduled)
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _reclaim(self, seq: Sequence, n: int) -> bool:
        """Release idle session pins, least recently used first, until seq's next n tokens fit."""
        while self.sessions and not self.blocks.can_grow(seq, n):
            pinned = self.sessions.popitem(last=False)[1]
            if self.on_evict is not None:
                self.on_evict(pinned)
            self.blocks.free(pinned)
        return self.blocks.can_grow(seq, n)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.preemptions += 1
        self.add(seq)

    def _admit(self, seq: Sequence) -> None:
        """Resolve where seq's prefix comes from: its session's pinned sequence or the prefix cache."""
        if seq.block_table:
            return
        first = seq.preemptions == 0
        pinned = self.sessions.pop(seq.session_id, None) if seq.session_id else None
        if pinned and seq.token_ids[:len(pinned)] == pinned.token_ids:
            seq.block_table, seq.chain = pinned.block_table, pinned.chain
            seq.num_computed = min(pinned.num_computed, len(seq) - 1)
            seq.num_registered = min(pinned.num_registered, seq.num_computed // self.blocks.block_size)
            kind = "sticky"
        else:
            if pinned:
                self.blocks.free(pinned)
            if self.restore is None or not self.restore(seq, self.blocks.peek(seq.token_ids)):
                self.copies += self.blocks.allocate_prefix(seq)
            kind = "exact" if seq.num_computed == len(seq) - 1 else "partial" if seq.num_computed else "cold"
        if first:
            seq.cache_hit_kind, seq.cached_tokens = kind, seq.num_computed

    def end_session(self, session_id: str) -> bool:
        seq = self.sessions.pop(session_id, None)
        if seq:
            self.blocks.free(seq)
        return seq is not None

    def take_copies(self) -> list[tuple[int, int, int]]:
        copies, self.copies = self.copies, []
        return copies
