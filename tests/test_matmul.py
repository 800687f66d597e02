import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_model_parity import forward_batch, prompts, tables
from threadpoolctl import threadpool_info

from shoal.model import load_model, tiles, tune
from shoal.model.matmul import (
    ROW_BUCKETS,
    Linear,
    bucket,
    column_major,
    flipped,
    in_copies,
    openblas,
    pack,
    packable,
    packed_product,
    plain,
    product,
    set_threads,
    tiled,
    ways_for,
)
from shoal.model.simd import PANEL


def test_buckets_hold_their_rows():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 64, 65, 512, 513)] == [0, 1, 2, 2, 3, 3, 4, 6, 7, 7, 7]
    assert all(ROW_BUCKETS[bucket(n)] >= n for n in range(1, ROW_BUCKETS[-1] + 1))


@pytest.mark.parametrize("shape", [(7,), (1, 7), (5, 7), (3, 4, 7), (54, 7), (100, 7)])  # 5, 12, 54 rows: padded
@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_every_way_and_layout_computes_the_linear_map(shape, columns, bias):
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(11, 7, generator=g), torch.randn(*shape, generator=g)
    b = torch.randn(11, generator=g) if bias else None
    expected = F.linear(x, weight, b)
    w = column_major(weight) if columns else weight
    for ways in [(), *((way,) * len(ROW_BUCKETS) for way in (plain, flipped, openblas))]:
        got = product(x, w, b, ways)
        assert got.shape == expected.shape and got.is_contiguous()
        torch.testing.assert_close(got, expected)
    got = packed_product(x, pack(weight), b)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("in_place", [False, True])
def test_a_linear_multiplies_each_copy_in_the_buckets_that_take_it(in_place):
    linear = Linear(8, 2 * PANEL, bias=True)
    weight = linear.weight.detach().clone()
    # copies that tell which weight multiplied: the packed one twice the weight, the panels three times
    linear.panels = tiles.pack(3 * weight)
    if in_place:
        linear.weight = torch.nn.Parameter(pack(2 * weight), requires_grad=False)
        linear.ways = (tiled, packed_product, tiled, *(packed_product,) * (len(ROW_BUCKETS) - 3))
        factors = ((1, 3), (2, 2), (3, 3), (4, 3), (5, 2), (600, 2))
    else:
        linear.packed = pack(2 * weight)
        linear.ways = (flipped, plain, packed_product, tiled, *(packed_product,) * (len(ROW_BUCKETS) - 4))
        factors = ((1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (9, 2), (600, 2))
    with torch.inference_mode():
        for rows, factor in factors:
            x = torch.randn(rows, 8)
            torch.testing.assert_close(linear(x), F.linear(x, factor * weight, linear.bias))


def test_load_model_tunes_every_linear_and_keeps_the_head_tied(hf_models):
    _, path = hf_models("qwen2")
    model = load_model(path, device="cpu")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(len(m.ways) in (0, len(ROW_BUCKETS)) for m in linears)
    assert model.lm_head.weight is model.embed_tokens.weight and not model.lm_head.weight.is_mkldnn  # tied: a copy
    for m in linears:
        assert m.weight.is_mkldnn == (in_copies(m.ways) and m is not model.lm_head)
        assert (m.packed is not None) == (packed_product in m.ways and not m.weight.is_mkldnn)
        assert (m.panels is not None) == (tiled in m.ways)
        assert m.weight.is_mkldnn or m.weight.is_contiguous() or m.weight.stride() == (1, m.weight.shape[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_weights_give_the_logits_of_plain_ones(hf_models, dtype):
    if not packable(getattr(torch, dtype)):
        pytest.skip(f"oneDNN packs no {dtype} weights on this CPU ({torch.backends.cpu.get_cpu_capability()})")
    _, path = hf_models("qwen2")
    model = load_model(path, device="cpu", dtype=dtype)
    seqs = prompts(model.config.vocab_size, [9, 1, 4])
    bt = tables([9, 1, 4])

    def logits() -> torch.Tensor:
        return forward_batch(model, seqs, model.new_cache(sum(map(len, bt))), bt)

    linears = [m for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head]
    for m in linears:
        m.weight, m.ways = torch.nn.Parameter(dense(m.weight), requires_grad=False), ()
    plain_logits = logits()
    for m in linears:
        m.weight = torch.nn.Parameter(pack(m.weight), requires_grad=False)
        m.ways = (packed_product,) * len(ROW_BUCKETS)  # as `tune` chooses where it packs a weight in place
    tolerance = 1e-4 if dtype == "float32" else 0.1
    torch.testing.assert_close(logits(), plain_logits, atol=tolerance, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_model_loads_on_any_cpu_packed_only_where_onednn_can(hf_models, dtype):
    # An AVX2-only CPU cannot pack these dtypes: loading tried, and failed with oneDNN's error
    _, path = hf_models("qwen2")
    model = load_model(path, device="cpu", dtype=dtype)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if not packable(model.dtype):
        assert not any(m.weight.is_mkldnn or m.packed is not None for m in linears)
    seqs, bt = prompts(model.config.vocab_size, [9, 1, 4]), tables([9, 1, 4])
    assert torch.isfinite(forward_batch(model, seqs, model.new_cache(sum(map(len, bt))), bt)).all()


def dense(weight: torch.Tensor) -> torch.Tensor:
    return (weight.to_dense() if weight.is_mkldnn else weight).contiguous()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_forced_layouts_and_ways_give_the_tuned_logits(hf_models, arch):
    # Whatever the timing picks on this machine, every combination must compute the same logits.
    _, path = hf_models(arch)
    model = load_model(path, device="cpu")
    seqs = prompts(model.config.vocab_size, [9, 1, 4])
    bt = tables([9, 1, 4])

    def logits() -> torch.Tensor:
        return forward_batch(model, seqs, model.new_cache(sum(map(len, bt))), bt)

    tuned = logits()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for columns in (False, True):
        for way in (plain, flipped, openblas):
            for m in linears:
                weight = dense(m.weight)
                if m.weight.is_mkldnn:  # a packed weight cannot take dense data: it is replaced
                    m.weight = torch.nn.Parameter(weight, requires_grad=False)
                m.weight.data = column_major(weight) if columns else weight  # .data: a tied head stays tied
                m.ways = (way,) * len(ROW_BUCKETS)
            torch.testing.assert_close(logits(), tuned, atol=1e-5, rtol=0)


@pytest.mark.parametrize("wanted", [True, False])
def test_an_engines_config_says_whether_its_weights_get_packed_copies(monkeypatch, tmp_path, tiny_model_dir, wanted):
    from shoal.engine import Engine, EngineConfig

    ways = (plain, *(packed_product,) * (len(ROW_BUCKETS) - 1))  # a packed copy for 2 rows and more
    monkeypatch.setattr(tune, "_choose", lambda out, inp, dtype, count, packs, *_: ("row", ways if packs else ()))
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path))  # no choice kept from an earlier load: this one chooses
    engine = Engine.from_dir(tiny_model_dir("llama"), EngineConfig(packed_copies=wanted))
    try:
        linears = [m for m in engine.model.modules() if isinstance(m, Linear)]
        assert linears and all((m.packed is not None) == wanted for m in linears)
    finally:
        engine.close()


def test_numpy_blas_is_offered_for_float32_only():
    assert openblas in ways_for(torch.float32)
    assert openblas not in ways_for(torch.bfloat16) and openblas not in ways_for(torch.float16)


def test_set_threads_sets_numpy_blas_threads_with_torchs():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        blas = [p for p in threadpool_info() if p["user_api"] == "blas"]
        assert torch.get_num_threads() == 1 and blas and all(p["num_threads"] == 1 for p in blas)
    finally:
        set_threads(before)


def test_set_threads_holds_as_numba_starts_its_threads():
    # a fresh process, where numba has not started its threads: starting them set torch's count to every core
    code = ("import shoal, numba, torch; from shoal.model.matmul import set_threads; set_threads(1); "
            "print(torch.get_num_threads(), numba.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_shoal_makes_torchs_threads_wait_passively_unless_told(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env |= {"OMP_WAIT_POLICY": given} if given else {}
    out = subprocess.run([sys.executable, "-c", "import os, shoal; print(os.environ['OMP_WAIT_POLICY'])"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


@pytest.mark.parametrize(("packed", "flip", "best"), [
    (0.5, 1.0, "packed_product"), (0.95, 1.0, "plain"),  # clearly faster than plain, or within its noise
    (0.5, 0.4, "flipped"), (1.0, 0.85, "flipped"), (2.0, 0.95, "plain"),
])
def test_the_packed_product_is_timed_in_turn_with_the_ways_and_wins_a_bucket_as_they_do(monkeypatch, packed, flip,
                                                                                           best):
    import shoal.model.matmul as matmul

    calls, times = [], {matmul.packed_product: packed, matmul.flipped: flip}
    monkeypatch.setattr(tune, "_time", lambda ws, x, way, evict: calls.append(way) or times.get(way, 1.0))
    timed, way = tune._fastest([torch.ones(8, 4)], 2, {matmul.packed_product: [torch.ones(8, 4)]})
    assert calls == list(matmul.ways_for(torch.float32, packs=True)) * tune.ROUNDS
    assert timed[matmul.packed_product] == packed and way.__name__ == best


@pytest.mark.parametrize(("free_gb", "wanted", "copied"), [(64, True, True), (0.001, True, False), (64, False, False)])
def test_packed_copies_are_kept_beside_the_weights_while_memory_allows(monkeypatch, tmp_path, hf_models, free_gb,
                                                                       wanted, copied):
    import psutil


    _, path = hf_models("qwen2")
    reference = load_model(path, device="cpu")
    ways = (plain, *(packed_product,) * (len(ROW_BUCKETS) - 1))  # a packed copy for 2 rows and more
    monkeypatch.setattr(tune, "_choose", lambda out, inp, dtype, count, packs, *_: ("row", ways))
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path))  # not the reference's choices: this load chooses
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": free_gb * 2**30}))
    model = load_model(path, device="cpu", packed_copies=wanted)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all((m.packed is not None) == copied and m.ways == (ways if copied else ()) for m in linears)
    assert not any(m.weight.is_mkldnn for m in linears) and model.lm_head.weight is model.embed_tokens.weight
    lengths = [9, 1, 2]
    seqs, bt = prompts(model.config.vocab_size, lengths), tables(lengths)
    got, expected = (forward_batch(m, seqs, m.new_cache(sum(map(len, bt))), bt) for m in (model, reference))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_head_is_timed_up_to_its_rows_and_takes_that_buckets_way_beyond(monkeypatch):

    timed = []

    def fastest(weights, rows, packed=None, evict=None):
        timed.append(rows)
        times = {plain: 1.0, flipped: 0.5 if rows == 64 else 1.0}
        return times, flipped if rows == 64 else plain

    monkeypatch.setattr(tune, "_fastest", fastest)
    ways = tune._choose(8, 4, torch.float32, 1, False, timed_rows=64)[1]
    assert 512 not in timed and 64 in timed
    assert len(ways) == len(ROW_BUCKETS) and ways[-2] is ways[-1] is flipped
    timed.clear()
    assert tune._choose(8, 4, torch.float32, 1, False)[1][-1] is plain and 512 in timed
