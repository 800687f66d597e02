"""The CPU paged decode attention (model/paged.py) against SDPA over gathered K/V."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shoal.model import load_model, paged
from shoal.model.kv import AttentionBatch, PagedKVCache

BLOCK = 16


def scattered_tables(lengths: list[int], seed: int = 0, block: int = BLOCK) -> tuple[list[list[int]], int]:
    """Block tables over a shuffled pool, so no sequence's blocks lie in order."""
    counts = [-(-n // block) for n in lengths]
    pool = np.random.default_rng(seed).permutation(sum(counts)).tolist()
    tables, at = [], 0
    for c in counts:
        tables.append(pool[at:at + c])
        at += c
    return tables, sum(counts)


def reference(q: torch.Tensor, cache: PagedKVCache, table: list[int], begin: int, end: int) -> torch.Tensor:
    block = cache.block_size
    slots = (torch.tensor(table)[:, None] * block + torch.arange(block)).flatten()[begin:end]
    k, v = (c[0][slots].float().transpose(0, 1)[None] for c in (cache.k, cache.v))
    return F.scaled_dot_product_attention(q.float()[None, :, None], k, v, enable_gqa=True).reshape(-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("lengths", [[1, 5, 16, 17, 40, 77], [17, 40]], ids=["a task a sequence", "a task a head"])
@pytest.mark.parametrize("serial_work", [paged.SERIAL_WORK, 0], ids=["on the caller", "on numba's threads"])
@pytest.mark.parametrize("block", [BLOCK, 2 * BLOCK])
def test_in_place_attention_equals_sdpa_over_gathered_context(monkeypatch, dtype, tol, window, lengths, serial_work,
                                                              block):
    monkeypatch.setattr(paged, "SERIAL_WORK", serial_work)
    tables, blocks = scattered_tables(lengths, block=block)
    cache = PagedKVCache(1, blocks, 2, 32, dtype=dtype, block_size=block)
    cache.k.normal_()
    cache.v.normal_()
    q = torch.randn(len(lengths), 6, 32, dtype=dtype)
    padded = np.zeros((len(lengths), max(map(len, tables))), dtype=np.int32)
    for row, t in zip(padded, tables, strict=True):
        row[:len(t)] = t
    ends = np.array(lengths, dtype=np.int32)
    begins = np.zeros_like(ends) if window is None else np.maximum(0, ends - window).astype(np.int32)
    got = paged.attend(q, cache.k[0], cache.v[0], padded, ends, begins, block)
    assert got.dtype == dtype and got.shape == (len(lengths), 6 * 32)
    for i, t in enumerate(tables):
        want = reference(q[i], cache, t, int(begins[i]), lengths[i])
        torch.testing.assert_close(got[i].float(), want, atol=tol, rtol=0)


def test_keys_outside_the_window_do_not_swamp_the_softmax():
    """Scores are taken 16 tokens at a time, some of them before the window: their keys, however large, must not
    set the softmax's maximum (every attended score's exp would come out 0)."""
    tables, blocks = scattered_tables([40])
    cache = PagedKVCache(1, blocks, 1, 16)
    cache.v.normal_()
    slots = torch.tensor(tables[0])[:, None] * BLOCK + torch.arange(BLOCK)
    cache.k[0, slots.flatten()[:20]] = 1e3  # before the window
    cache.k[0, slots.flatten()[20:40]] = 0.01
    q = torch.ones(1, 1, 16)
    got = paged.attend(q, cache.k[0], cache.v[0], np.array(tables, np.int32), np.array([40], np.int32),
                       np.array([20], np.int32), BLOCK)
    torch.testing.assert_close(got[0], reference(q[0], cache, tables[0], 20, 40), atol=1e-5, rtol=0)


def test_a_head_size_the_kernel_does_not_take_is_refused_by_name():
    cache = PagedKVCache(1, 2, 2, 24)
    with pytest.raises(ValueError, match=r"not a torch\.float32 cpu cache with 24 and 16"):
        paged.attend(torch.ones(1, 2, 24), cache.k[0], cache.v[0], np.zeros((1, 1), np.int32), np.ones(1, np.int32),
                     np.zeros(1, np.int32), BLOCK)


def test_only_caches_it_reads_attend_in_place():
    assert PagedKVCache(1, 2, 2, 16).in_place
    assert PagedKVCache(1, 2, 2, 32, dtype=torch.bfloat16, block_size=32).in_place
    assert not PagedKVCache(1, 2, 2, 16, dtype=torch.float16).in_place  # numba has no float16
    assert not PagedKVCache(1, 2, 2, 24).in_place  # its vector loops take 16 elements of a head at a time
    assert not PagedKVCache(1, 2, 2, 16, block_size=8).in_place  # and 16 tokens of a block


def mixed_tick(model) -> tuple[torch.Tensor, list[list[int]], list[int], list[int], PagedKVCache]:
    """A tick of decoding rows among prefill chunks, two of those starting fresh, over scattered blocks whose
    earlier context is computed: its token ids, tables, starts, new token counts and cache."""
    done = [30, 9, 21]  # context already computed
    new = [1, 12, 1, 1, 6]
    starts = [*done[:1], 0, *done[1:], 0]
    tables, blocks = scattered_tables([s + n for s, n in zip(starts, new, strict=True)], seed=1)
    kv = model.new_cache(blocks)
    g = torch.Generator().manual_seed(0)
    for table, start in zip(tables, starts, strict=True):
        if start:
            ids = torch.randint(1, model.config.vocab_size, (start,), generator=g)
            model(ids, AttentionBatch.build([table], [0], [start], sliding_window=model.config.sliding_window), kv)
    return torch.randint(1, model.config.vocab_size, (sum(new),), generator=g), tables, starts, new, kv


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_a_tick_of_prefill_chunks_and_decoding_rows_gives_the_same_logits_in_place(hf_models, arch):
    model = load_model(hf_models(arch)[1], device="cpu")
    ids, tables, starts, new, kv = mixed_tick(model)
    logits = {}
    for in_place in (False, True):
        batch = AttentionBatch.build(tables, starts, new, sliding_window=model.config.sliding_window,
                                     in_place=in_place)
        assert (batch.paged is not None, len(batch.decode) > 0) == (in_place, not in_place)
        logits[in_place] = model.compute_logits(model(ids, batch, kv))
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=0)


def test_the_last_layer_runs_the_kept_rows_alone_and_they_come_out_as_in_the_whole_tick(hf_models):
    model = load_model(hf_models("qwen2")[1], device="cpu")
    ids, tables, starts, new, kv = mixed_tick(model)
    batch = AttentionBatch.build(tables, starts, new, sliding_window=model.config.sliding_window)
    whole = model(ids, batch, kv)
    stored = kv.k[-1].clone()
    kv.k[-1, batch.slot_mapping] = 0  # the tick's own K, stored again below
    mlp_rows = []
    model.layers[-1].mlp.register_forward_hook(lambda m, args, out: mlp_rows.append(len(args[0])))
    keep = torch.tensor([12, 0, 20])  # the last rows of the chunks that end their prompts, in another order
    kept = model(ids, batch, kv, keep=keep)
    assert mlp_rows == [3]
    torch.testing.assert_close(kept, whole[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(kv.k[-1], stored, atol=0, rtol=0)  # every row's K still stored


@pytest.mark.parametrize("workers", [2, 3])
def test_each_threads_share_of_the_decode_attention_holds_about_equal_work(workers):
    work = np.arange(640, 0, -10)  # the oldest sequences first, with the longest contexts, as in serving
    order = paged._balanced(work, workers)
    assert sorted(order.tolist()) == list(range(len(work)))
    shares = [work[part].sum() for part in np.array_split(order, workers)]  # contiguous, as prange splits them
    assert max(shares) <= 1.03 * work.sum() / workers
