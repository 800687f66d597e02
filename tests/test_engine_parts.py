"""The engine's parts alone: block manager, scheduler, sampler, text stream, the runner's logits."""

import pytest
import torch
from engine_helpers import QUESTIONS, run, together
from tokenizers import AddedToken

from shoal.engine.blocks import BlockManager
from shoal.engine.params import SamplingParams
from shoal.engine.sampler import Sampler, inverse_cdf, pick, pick_rows
from shoal.engine.scheduler import Scheduler
from shoal.engine.sequence import Sequence
from shoal.engine.stream import TextStream, marker_ids
from shoal.model import DEMO_PATH
from shoal.model.tokenizer import Tokenizer

ROOT = b"\0" * 16


def seq(tokens: list[int], name: str = "s", **params) -> Sequence:
    generator = torch.Generator().manual_seed(params.get("seed") or 0)
    return Sequence(name, list(tokens), SamplingParams(**params), generator)


def computed(blocks: BlockManager, s: Sequence) -> Sequence:
    """Pretend the model ran over all of s's tokens but the last."""
    blocks.allocate_prefix(s)
    blocks.grow(s, s.num_pending)
    s.num_computed = len(s) - 1
    blocks.register(s)
    return s


def test_full_blocks_are_shared_and_a_partial_block_is_copied():
    blocks = BlockManager(8, 4, ROOT)
    first = computed(blocks, seq(range(10)))  # 9 computed: blocks [0-3], [4-7] registered
    second = seq([*range(6), 99, 98])
    copies = blocks.allocate_prefix(second)
    assert second.block_table[0] == first.block_table[0] and blocks.blocks[first.block_table[0]].ref == 2
    assert copies == [(first.block_table[1], second.block_table[1], 2)] and second.num_computed == 6


def test_a_free_block_keeps_its_content_until_evicted_least_recently_freed_first():
    blocks = BlockManager(4, 4, ROOT)
    a = computed(blocks, seq(range(9), "a"))
    blocks.free(a)
    assert blocks.num_free == 4
    again = seq(range(9), "again")
    assert blocks.allocate_prefix(again) == [] and again.num_computed == 8
    blocks.free(again)
    filler = seq(range(100, 108), "filler")
    blocks.grow(filler, 8)  # takes the two blocks that held nothing, then the LRU cached one
    blocks.grow(filler, 12)
    late = seq(range(9), "late")
    blocks.allocate_prefix(late)
    assert late.num_computed == 4


def test_keys_depend_on_the_model_fingerprint():
    a, b = BlockManager(4, 4, b"a" * 16), BlockManager(4, 4, b"b" * 16)
    assert a.keys([1, 2, 3]) != b.keys([1, 2, 3]) and a.keys([1, 2, 3]) == a.keys([1, 2, 3])
    assert a.keys([1, 2, 3, 4, 5])[:3] == a.keys([1, 2, 3])


def test_a_tick_takes_decodes_first_then_prefill_chunks_under_the_budget():
    blocks = BlockManager(64, 16, ROOT)
    sched = Scheduler(blocks, n_batch=40, chunk=16, n_seq_max=8)
    decoding = [seq(range(i, i + 5), f"d{i}") for i in range(3)]
    for d in decoding:
        sched.add(d)
    sched.schedule()
    for d in decoding:
        d.num_computed = len(d) - 1
    long = seq(range(200, 300), "long")
    other = seq(range(300, 400), "other")
    sched.add(long)
    sched.add(other)
    batch = dict(sched.schedule())
    assert [batch[d] for d in decoding] == [1, 1, 1]
    assert batch[long] == 16 and batch[other] == 16 and sum(batch.values()) <= 40
    long.num_computed += 16
    other.num_computed += 16
    batch = dict(sched.schedule())
    assert list(batch)[:3] == decoding and batch[long] == 16 and batch[other] == 16


def test_running_out_of_blocks_preempts_the_most_recently_admitted():
    blocks = BlockManager(3, 4, ROOT)
    sched = Scheduler(blocks, n_batch=64, chunk=64, n_seq_max=8)
    a, b = seq(range(4), "a"), seq(range(10, 14), "b")
    for s in (a, b):
        sched.add(s)
    sched.schedule()
    for s in (a, b):
        s.num_computed = 4
        s.token_ids.append(7)
    batch = dict(sched.schedule())
    assert a in batch and b not in batch and b.preemptions == 1 and sched.waiting[0][-1] is b


def sample(logits: list[float], tokens=(0,), eos=(), **params) -> int:
    return Sampler(list(eos)).sample(torch.tensor(logits), seq(tokens, **params))[0]


def test_truncation_and_penalties():
    logits = [1.0, 3.0, 2.9, 0.5]
    assert sample(logits, temperature=0) == 1
    assert all(sample(logits, temperature=5, top_k=1, seed=s) == 1 for s in range(10))
    assert all(sample(logits, temperature=5, top_p=0.01, seed=s) == 1 for s in range(10))
    assert {sample(logits, temperature=1, min_p=0.5, seed=s) for s in range(40)} == {1, 2}
    assert sample(logits, temperature=0, logit_bias={3: 10.0}) == 3
    assert sample(logits, tokens=[0, 1], temperature=0, repetition_penalty=2.0) == 2
    assert sample(logits, tokens=[0, 1], temperature=0, presence_penalty=0.5) == 1  # the prompt is not penalised
    assert sample(logits, tokens=[0], eos=[1], temperature=0, min_tokens=1) == 2


def test_seeded_sampling_repeats():
    logits = torch.randn(50).tolist()
    draws = [sample(logits, temperature=1, seed=7) for _ in range(3)]
    assert len(set(draws)) == 1 and len({sample(logits, temperature=1, seed=s) for s in range(20)}) > 1


def test_sampled_frequencies_follow_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0])
    s = seq([0], temperature=2.0, seed=3)
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[Sampler([]).sample(logits, s)[0]] += 1
    expected = torch.softmax(logits / 2.0, -1) * 4000
    assert counts[4] == 0 and ((counts - expected).abs() < 4 * expected.sqrt() + 1).all(), (counts, expected)


@pytest.fixture(scope="module")
def marked_tokenizer():
    tok = Tokenizer.from_dir(DEMO_PATH)
    tok.backend.add_special_tokens([AddedToken(t, special=False) for t in
                                    ("<think>", "</think>", "<tool_call>", "</tool_call>")])
    return tok


def test_thinking_and_tool_calls_become_their_own_pieces(marked_tokenizer):
    tok = marked_tokenizer
    stream = TextStream(tok, [], marker_ids(tok))
    pieces = []
    for t in tok.encode("<think>sum it</think>It is 5.<tool_call>{\"name\": \"add\"}</tool_call>done"):
        pieces += stream.push(t)
    pieces += stream.flush()
    kinds: dict[str, str] = {}
    for kind, text in pieces:
        kinds[kind] = kinds.get(kind, "") + text
    assert kinds == {"thinking": "sum it", "text": "It is 5.done", "tool_call": '{"name": "add"}'}
    assert [k for k, _ in pieces].count("tool_call") == 1


def test_text_that_may_start_a_stop_string_is_held_back_then_released(marked_tokenizer):
    tok = marked_tokenizer
    stream = TextStream(tok, ["STOP"], {})
    out = [stream.push(t) for t in tok.encode("a ST b STO")]
    assert "".join(text for piece in out for _, text in piece) == "a ST b "
    assert stream.flush() == [("text", "STO")] and not stream.stopped


def test_plain_requests_sampled_together_take_the_tokens_each_takes_alone():
    logits = torch.randn(6, 300) * 3
    params = [dict(temperature=0), dict(temperature=0.7, seed=1), dict(temperature=1.3, seed=2),
              dict(temperature=0.7, seed=1), dict(temperature=1.0), dict(temperature=0.2, seed=9)]
    alone = [Sampler([]).sample(row, seq([0], **p))[0] for row, p in zip(logits, params, strict=True)]
    seqs = [seq([0], **p) for p in params]
    assert all(Sampler.plain(s) for s in seqs)
    assert Sampler.sample_plain(logits, seqs) == alone
    assert not any(Sampler.plain(seq([0], **p)) for p in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1),
                                                          dict(logit_bias={1: 1.0}), dict(repetition_penalty=1.1),
                                                          dict(logprobs=2), dict(min_tokens=3)))


def test_pick_takes_the_token_of_an_exact_inverse_cdf_over_a_large_vocabulary():
    logits = torch.randn(4, 151_936, generator=torch.Generator().manual_seed(0)) * 3
    for row in logits:
        for u in (0.0, 0.1, 0.37, 0.5, 0.9, 0.999999):
            exact = inverse_cdf(torch.softmax(row.double() / 0.7, -1), torch.tensor(u, dtype=torch.float64))
            assert pick(row, 1 / 0.7, u) == int(exact)


def test_pick_rows_takes_each_rows_own_pick_or_argmax_over_a_large_vocabulary():
    logits = torch.randn(9, 151_936, generator=torch.Generator().manual_seed(1)) * 3
    scales = [1 / 0.7, 0.0, 1.0, 1 / 1.3, 0.0, 5.0, 1 / 0.7, 1.0, 2.0]
    us = [0.0, 0.0, 0.37, 0.5, 0.0, 0.9, 0.999999, 0.1, 0.61]
    alone = [pick(row, s, u) if s else int(row.argmax()) for row, s, u in zip(logits, scales, us, strict=True)]
    assert pick_rows(logits, scales, us) == alone
    assert pick_rows(logits[::2], scales[::2], us[::2]) == alone[::2]  # rows of a strided view


def test_pick_never_takes_a_token_truncated_to_minus_inf():
    logits = torch.full((5000,), -float("inf"))
    logits[[7, 2100, 4999]] = torch.tensor([0.0, 1.0, 0.5])
    assert {pick(logits, 1.0, u / 50) for u in range(50)} == {7, 2100, 4999}
    assert pick(logits, 1.0, 0.999999) == 4999 and pick(logits, 1.0, 0.0) == 7


def test_a_bfloat16_engine_writes_each_ticks_logits_into_a_kept_buffer(make_engine):
    engine = make_engine(dtype="bfloat16")
    runner, seen = engine.runner, []
    forward = runner.forward

    def spy(batch):
        seqs, logits = forward(batch)
        buffer = runner.logits.data_ptr() if runner.logits is not None else None
        seen.append((logits.dtype, logits.shape[0] == len(seqs), logits.data_ptr() == buffer, buffer))
        return seqs, logits

    runner.forward = spy
    got = run(together(engine, QUESTIONS[:3], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)))
    assert [len(ids) for _, ids, _ in got] == [6] * 3
    assert {dtype for dtype, *_ in seen} == {torch.float32} and all(rows and kept for _, rows, kept, _ in seen)
    assert len({buffer for *_, buffer in seen}) <= 3 < len(seen)  # one more a tick with more rows than any before
    hidden = torch.randn(2, engine.model.config.hidden_size, dtype=torch.bfloat16)
    out = torch.empty(5, engine.model.config.vocab_size)
    written = engine.model.compute_logits(hidden, out)
    assert written.data_ptr() == out.data_ptr() and written.shape == (2, engine.model.config.vocab_size)
    torch.testing.assert_close(written, engine.model.compute_logits(hidden), atol=0, rtol=0)
