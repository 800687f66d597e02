import pytest
import torch
from test_model_parity import forward_batch, prompts, tables

import shoal.model.matmul as matmul
from shoal.model import load_model, tiles, tune
from shoal.model.matmul import ROW_BUCKETS, Linear, column_major, packed_product, plain, tiled
from shoal.model.simd import PANEL


@pytest.fixture(params=[None, (8, 64)], ids=["own-blocks", "blocks-of-8"])
def blocks(request, monkeypatch):
    """This CPU's depth blocks, and blocks of 8 up to 64 rows (forced, so that an AVX2 CPU runs them too)."""
    if request.param:
        monkeypatch.setattr(tiles, "DEPTH", request.param[0])
        monkeypatch.setattr(tiles, "BLOCKED_ROWS", request.param[1])


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 6, 7, 11, 13, 64, 100, 200])
@pytest.mark.parametrize(("out", "inp"), [(PANEL, 0), (PANEL, 1), (2 * PANEL, 7), (3 * PANEL, 17), (4 * PANEL, 100),
                                          (PANEL, 293)])
def test_the_tiled_product_computes_the_linear_map_for_any_rows(blocks, rows, out, inp):
    g = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(out, inp, generator=g), torch.randn(rows, inp, generator=g)
    for w in (weight, column_major(weight)):
        got = tiles.product(x, tiles.pack(w))
        assert got.shape == (rows, out) and got.is_contiguous()
        torch.testing.assert_close(got, x @ weight.T, rtol=1e-5, atol=1e-4)  # sums of up to 293 in another order
    torch.testing.assert_close(tiles.product(x[:, :].t().contiguous().t(), tiles.pack(weight)), x @ weight.T,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [0, 1, 7, 64, 200])
@pytest.mark.parametrize(("out", "inp"), [(PANEL, 0), (2 * PANEL, 7), (PANEL, 293)])
def test_the_tiled_product_adds_a_bias(blocks, rows, out, inp):
    g = torch.Generator().manual_seed(rows)
    weight, x, bias = torch.randn(out, inp, generator=g), torch.randn(rows, inp, generator=g), torch.randn(out)
    torch.testing.assert_close(tiles.product(x, tiles.pack(weight), bias), x @ weight.T + bias, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tiled(x, tiles.pack(weight), bias), x @ weight.T + bias, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 6, 7, 13, 64, 200])
@pytest.mark.parametrize(("out", "inp"), [(PANEL, 0), (PANEL, 2), (2 * PANEL, 6), (3 * PANEL, 18), (PANEL, 294)])
def test_the_tiled_product_of_bfloat16_sums_in_float32_and_rounds_once(blocks, rows, out, inp):
    g = torch.Generator().manual_seed(rows)
    weight, x, bias = (torch.randn(*shape, generator=g).bfloat16() for shape in ((out, inp), (rows, inp), (out,)))
    for b in (None, bias):
        got = tiles.product(x, tiles.pack(weight), b)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out) and got.is_contiguous()
        exact = x.double() @ weight.double().T + (0 if b is None else b.double())
        # within one rounding to bfloat16 (2 ** -8 of the value) of the exact sums
        assert torch.all((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4)


def test_panels_hold_whole_panels_of_float32_and_even_bfloat16_weights():
    assert tiles.supports(2 * PANEL, 7, torch.float32) and tiles.supports(151936, 896, torch.float32)
    assert tiles.supports(2 * PANEL, 8, torch.bfloat16) and not tiles.supports(2 * PANEL, 7, torch.bfloat16)
    assert not tiles.supports(PANEL + 8, 8, torch.float32) and not tiles.supports(PANEL, 8, torch.float16)
    assert tiled in matmul.ways_for(torch.float32, panels=True) and tiled not in matmul.ways_for(torch.float32)
    assert tiled in matmul.ways_for(torch.bfloat16, panels=True)
    panels = tiles.pack(torch.arange(PANEL * 4, dtype=torch.bfloat16).reshape(PANEL, 4))  # weight[j, e] = 4j + e
    assert panels.reshape(-1)[:2 * PANEL].tolist() == [4 * j + t for j in range(PANEL) for t in (0, 1)]
    assert panels.reshape(-1)[2 * PANEL:4 * PANEL].tolist() == [4 * j + t for j in range(PANEL) for t in (2, 3)]


def test_the_tiled_product_is_timed_on_its_copies_in_turn_with_the_ways(monkeypatch):
    calls = []
    monkeypatch.setattr(tune, "_time", lambda ws, x, way, evict: calls.append((way, ws)) or (0.5 if way is tiled
                                                                                              else 1.0))
    weights, panels = [torch.ones(PANEL, 4)], [tiles.pack(torch.ones(PANEL, 4))]
    times, way = tune._fastest(weights, 2, {tiled: panels})
    assert [w for w, _ in calls] == list(matmul.ways_for(torch.float32, panels=True)) * tune.ROUNDS
    assert all(ws is (panels if w is tiled else weights) for w, ws in calls)
    assert way is tiled and times[tiled] == 0.5


def test_a_weight_keeps_both_kinds_of_copy_while_memory_holds_them():
    ways = (tiled, packed_product, packed_product, plain)
    assert tune._afforded(ways, 100, tied=False, spare=200) == (ways, 200)
    # one copy's room: the kind more buckets take, the other's buckets multiply plainly
    assert tune._afforded(ways, 100, tied=False, spare=150) == ((plain, packed_product, packed_product, plain), 100)
    assert tune._afforded(ways, 100, tied=False, spare=50) == ((plain,) * 4, 0)
    even = (tiled, packed_product, plain)  # as many buckets each: the first of COPIED, in every process alike
    assert tune._afforded(even, 100, tied=False, spare=150) == ((plain, packed_product, plain), 100)
    # where every bucket multiplies a copy, the weight itself is packed in place: only the panels take room
    copied = (tiled, tiled, packed_product)
    assert tune._afforded(copied, 100, tied=False, spare=100) == (copied, 100)
    assert tune._afforded(copied, 100, tied=True, spare=100) == ((tiled, tiled, plain), 100)  # a shared weight stays
    assert tune._afforded((packed_product,) * 3, 100, tied=False, spare=-10) == ((packed_product,) * 3, 0)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(("dtype", "atol"), [("float32", 1e-4), ("bfloat16", 0.05)])
def test_a_model_multiplying_in_panels_gives_the_logits_of_plain_products(monkeypatch, tmp_path, hf_models, dtype,
                                                                          atol, packed):
    if packed and not matmul.packable(getattr(torch, dtype)):
        pytest.skip(f"oneDNN packs no {dtype} weights on this CPU")
    _, path = hf_models("qwen2")
    reference = load_model(path, device="cpu", dtype=dtype)
    # with `packed`, one row multiplies the panels and more rows oneDNN's packed weight, as on an AMX Xeon
    chosen = (tiled, *(packed_product if packed else tiled,) * (len(ROW_BUCKETS) - 1))
    monkeypatch.setattr(tune, "_choose", lambda out, inp, dtype, count, packs, timed, evict, panels:
                        ("row", chosen if panels and (packs or not packed) else ()))
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path))  # not the reference's choices: this load chooses
    model = load_model(path, device="cpu", dtype=dtype)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    paneled = [m for m in linears if m.ways == chosen]
    assert paneled and all(m.panels.shape == (m.out_features // PANEL, m.in_features, PANEL) for m in paneled)
    assert all(m.panels is None and m.ways == () for m in linears if m not in paneled)
    # the weight itself is packed, but for the head, which the embedding shares: it keeps a packed copy
    assert all(m.weight.is_mkldnn == (packed and m is not model.lm_head) for m in paneled)
    assert all((m.packed is not None) == (packed and m is model.lm_head) for m in paneled)
    assert model.lm_head.weight is model.embed_tokens.weight
    lengths = [9, 1, 2]
    seqs, bt = prompts(model.config.vocab_size, lengths), tables(lengths)
    got, expected = (forward_batch(m, seqs, m.new_cache(sum(map(len, bt))), bt) for m in (model, reference))
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
