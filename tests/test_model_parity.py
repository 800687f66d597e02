import pytest
import torch

from shoal.model import fused, load_model
from shoal.model.generate import generate
from shoal.model.kv import AttentionBatch

ARCHS = ["llama", "llama-linear", "mistral", "qwen2", "qwen3"]
LENGTHS = [11, 3, 17, 1]


@pytest.fixture(params=["torch", "on-caller", "threaded"], ids=lambda p: f"{p}-ops")
def ops(request, monkeypatch):
    """Every elementwise chain through torch's ops, or through model/fused.py's kernels on the calling thread (a tiny
    model's tensors take these by themselves), or split among numba's threads."""
    if request.param == "torch":
        monkeypatch.setattr(fused, "supports", lambda x: False)
    elif request.param == "threaded":
        monkeypatch.setattr(fused, "_pick", lambda kernel, x: kernel.threaded)


def prompts(vocab: int, lengths=LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def tables(lengths: list[int], block_size: int = 16) -> list[list[int]]:
    out, nxt = [], 0
    for n in lengths:
        blocks = -(-n // block_size) + 1
        out.append(list(range(nxt, nxt + blocks))[::-1])  # reversed: blocks need not be contiguous
        nxt += blocks
    return out


def forward_batch(model, seqs: list[list[int]], kv, block_tables, starts=None, in_place=False):
    starts = starts or [0] * len(seqs)
    # A head size the in-place kernel does not take (qwen3's 24 here) attends through the gather, as in serving
    batch = AttentionBatch.build(block_tables, starts, [len(s) for s in seqs],
                                 sliding_window=model.config.sliding_window, in_place=in_place and kv.in_place)
    hidden = model(torch.tensor([t for s in seqs for t in s]), batch, kv)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.usefixtures("ops")
def test_batched_logits_match_transformers(hf_models, arch):
    hf, path = hf_models(arch)
    model = load_model(path, device="cpu")
    seqs = prompts(model.config.vocab_size)
    bt = tables(LENGTHS)
    kv = model.new_cache(num_blocks=sum(map(len, bt)))
    logits = forward_batch(model, seqs, kv, bt).split(LENGTHS)
    for ids, got in zip(seqs, logits, strict=True):
        torch.testing.assert_close(got, hf_logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("in_place", [False, True], ids=["gathered", "in-place"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.usefixtures("ops")
def test_incremental_decode_equals_full_forward(hf_models, arch, in_place):
    _, path = hf_models(arch)
    model = load_model(path, device="cpu")
    ids = prompts(model.config.vocab_size, [20])[0]
    bt = tables([20])
    full = forward_batch(model, [ids], model.new_cache(len(bt[0])), bt)
    kv = model.new_cache(len(bt[0]))
    steps = [forward_batch(model, [ids[:9]], kv, bt)]
    for pos in range(9, 20):
        steps.append(forward_batch(model, [ids[pos:pos + 1]], kv, bt, [pos], in_place))
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.usefixtures("ops")
def test_greedy_generation_matches_transformers(hf_models, arch):
    hf, path = hf_models(arch)
    model = load_model(path, device="cpu")
    ids = prompts(model.config.vocab_size, [6])[0]
    ours = list(generate(model, ids, max_tokens=12))
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert ours == out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.usefixtures("ops")
def test_layer_ranges_compose_exactly(hf_models, arch):
    _, path = hf_models(arch)
    whole = load_model(path, device="cpu")
    first, second = load_model(path, (0, 1), "cpu"), load_model(path, (1, 4), "cpu")
    assert not hasattr(first, "norm") and not hasattr(second, "embed_tokens")
    seqs = prompts(whole.config.vocab_size)
    bt = tables(LENGTHS)
    batch = AttentionBatch.build(bt, [0] * len(seqs), LENGTHS)
    tokens = torch.tensor([t for s in seqs for t in s])
    n = sum(map(len, bt))
    expected = whole.compute_logits(whole(tokens, batch, whole.new_cache(n)))
    hidden = first(tokens, batch, first.new_cache(n))
    sent = hidden.clone()
    got = second.compute_logits(second(hidden, batch, second.new_cache(n)))
    assert torch.equal(got, expected)
    assert torch.equal(hidden, sent)  # a stage's input is not its residual stream


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_decoding_sequences_of_far_apart_lengths_attend_in_groups_and_match_each_alone(hf_models, arch):
    _, path = hf_models(arch)
    model = load_model(path, device="cpu")
    lengths = [40, 9, 21, 38]
    seqs = prompts(model.config.vocab_size, [n + 1 for n in lengths])
    bt = tables([n + 1 for n in lengths])
    kv = model.new_cache(sum(map(len, bt)))
    forward_batch(model, [s[:-1] for s in seqs], kv, bt)
    batch = AttentionBatch.build(bt, lengths, [1] * len(seqs))
    assert [d.rows.tolist() for d in batch.decode] == [[0, 2, 3], [1]]  # 9 is under half of 40
    together = forward_batch(model, [s[-1:] for s in seqs], kv, bt, lengths)
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        alone = forward_batch(model, [s[-1:]], kv, [bt[i]], [n])
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.usefixtures("ops")
def test_bfloat16_logits_are_transformers_float32_ones_within_bfloat16s_rounding(hf_models, arch):
    hf, path = hf_models(arch)
    model = load_model(path, device="cpu", dtype="bfloat16")
    seqs = prompts(model.config.vocab_size)
    bt = tables(LENGTHS)
    logits = forward_batch(model, seqs, model.new_cache(sum(map(len, bt))), bt).float().split(LENGTHS)
    for ids, got in zip(seqs, logits, strict=True):
        expected = hf_logits(hf, ids)
        assert (got - expected).abs().max() < 0.03 * expected.abs().max()
