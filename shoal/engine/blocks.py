import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.engine.sequence import Sequence


@dataclass(eq=False)
class Block:
    id: int
    ref: int = 0
    keys: list[bytes] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # of a full block: its tokens and its chain's key before it
    parent: bytes = b""


def _token(t: int) -> bytes:
    return t.to_bytes(4, "little")


def prefix_keys(parent: bytes, tokens: list[int]) -> list[bytes]:
    """Chained keys of tokens[:1], tokens[:2], ... after `parent` (a block's key is its last one)."""
    h = hashlib.blake2b(parent, digest_size=16)
    keys = []
    for t in tokens:
        h.update(_token(t))
        keys.append(h.digest())
    return keys


def chain_keys(root: bytes, tokens: list[int], block_size: int) -> list[str]:
    """The prefix-cache key of tokens[:1], tokens[:2], ... (a finished context's key is its last)."""
    parent, keys = root, []
    for start in range(0, len(tokens), block_size):
        keys += prefix_keys(parent, tokens[start:start + block_size])
        parent = keys[-1]
    return [k.hex() for k in keys]


class BlockManager:
    """Paged KV blocks with a prefix cache.

    A block that holds computed tokens is registered under the chained key of every prefix of
    its tokens (parent key + token ids, seeded with the model fingerprint), so a lookup reuses
    whole blocks and then the longest matching head of one more block, which is copied. Blocks
    whose refcount drops to zero keep their content and keys, and are evicted least recently
    freed first.
    """

    def __init__(self, num_blocks: int, block_size: int, fingerprint: bytes):
        self.block_size = block_size
        self.root = fingerprint
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.cache: dict[bytes, tuple[int, int]] = {}
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.on_evict: Callable[[int], None] | None = None  # a full cached block is about to be reused

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free_ids)

    def _take(self, block_id: int | None = None) -> int:
        """A free block for new content (the least recently freed unless named): its old keys go."""
        block_id = next(iter(self.free_ids)) if block_id is None else block_id
        del self.free_ids[block_id]
        block = self.blocks[block_id]
        if block.tokens and self.on_evict is not None:
            self.on_evict(block_id)
        block.tokens = []
        for key in block.keys:
            del self.cache[key]
        block.keys, block.ref = [], 1
        return block_id

    def _share(self, block_id: int) -> int:
        self.free_ids.pop(block_id, None)
        self.blocks[block_id].ref += 1
        return block_id

    def _longest(self, keys: list[bytes]) -> tuple[int, int]:
        for n in range(len(keys), 0, -1):
            if keys[n - 1] in self.cache:
                return self.cache[keys[n - 1]][0], n
        return -1, 0

    def allocate_prefix(self, seq: Sequence) -> list[tuple[int, int, int]]:
        """Give an empty sequence the longest cached prefix of its tokens but the last.

        Whole blocks are shared. A block that matches only in its first n tokens is taken over if
        free, or else copied: the copies (source, destination, n) must run before the next forward.
        """
        assert not seq.block_table
        usable, bs = seq.token_ids[:-1], self.block_size
        parent, copies = self.root, []
        for start in range(0, len(usable), bs):
            keys = prefix_keys(parent, usable[start:start + bs])
            src, n = self._longest(keys)
            if n == bs:
                seq.block_table.append(self._share(src))
                seq.num_computed, parent = start + n, keys[-1]
                continue
            if n and src in self.free_ids:
                seq.block_table.append(self._take(src))
                seq.num_computed = start + n
            elif n and self.free_ids:
                seq.block_table.append(self._take())
                copies.append((src, seq.block_table[-1], n))
                seq.num_computed = start + n
            break
        seq.num_registered, seq.chain = seq.num_computed // bs, parent
        self.queried_tokens += len(usable)
        self.hit_tokens += seq.num_computed
        return copies

    def peek(self, tokens: list[int]) -> int:
        """How many of tokens[:-1] the cache holds, without taking anything."""
        usable, bs, parent = tokens[:-1], self.block_size, self.root
        for start in range(0, len(usable), bs):
            keys = prefix_keys(parent, usable[start:start + bs])
            _, n = self._longest(keys)
            if n < bs:
                return start + n
            parent = keys[-1]
        return len(usable)

    def can_grow(self, seq: Sequence, n: int) -> bool:
        return self._needed(seq, n) <= self.num_free

    def grow(self, seq: Sequence, n: int) -> None:
        """Make the block table hold the next n tokens."""
        for _ in range(self._needed(seq, n)):
            seq.block_table.append(self._take())

    def _needed(self, seq: Sequence, n: int) -> int:
        return max(0, -(-(seq.num_computed + n) // self.block_size) - len(seq.block_table))

    def register(self, seq: Sequence, partial: bool = False) -> None:
        """Publish the newly computed full blocks of seq, and with partial its last unfilled one."""
        bs = self.block_size
        while (seq.num_registered + 1) * bs <= seq.num_computed:
            i = seq.num_registered
            seq.chain = self._publish(seq.block_table[i], seq.chain, seq.token_ids[i * bs:(i + 1) * bs], seq)
            seq.num_registered += 1
        tail = seq.token_ids[seq.num_registered * bs:seq.num_computed]
        if partial and tail:
            self._publish(seq.block_table[seq.num_registered], seq.chain, tail, seq)

    def _publish(self, block_id: int, parent: bytes, tokens: list[int], seq: Sequence) -> bytes:
        block = self.blocks[block_id]
        keys = prefix_keys(parent, tokens)
        if len(tokens) == self.block_size and not block.tokens and keys[-1] not in self.cache:
            block.tokens, block.parent = list(tokens), parent
        for n, key in enumerate(keys, 1):
            if key not in self.cache:
                self.cache[key] = (block_id, n)
                block.keys.append(key)
                seq.created_tokens += self.block_size if n == self.block_size else 0
        return keys[-1]

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref -= 1
            if block.ref == 0:
                self.free_ids[block_id] = None
                if not block.keys:
                    self.free_ids.move_to_end(block_id, last=False)
        seq.block_table, seq.num_computed, seq.num_registered, seq.chain = [], 0, 0, self.root

    def chain(self, block_id: int) -> list[int] | None:
        """The full blocks from the start of the context to this one, while they are all still cached."""
        ids, parent = [block_id], self.blocks[block_id].parent
        while parent != self.root:
            found = self.cache.get(parent)
            if found is None or found[1] != self.block_size or not self.blocks[found[0]].tokens:
                return None
            ids.append(found[0])
            parent = self.blocks[found[0]].parent
        return ids[::-1]

    def keys(self, tokens: list[int]) -> list[str]:
        return chain_keys(self.root, tokens, self.block_size)
