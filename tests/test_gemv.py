import pytest
import torch
import torch.nn.functional as F

from shoal.model.gemv import gemv, gemv_on_caller
from shoal.model.matmul import GEMV_ROWS, ROW_BUCKETS, Linear, column_major, plain, ways_for
from shoal.model.tune import _recall

KERNELS = [gemv, gemv_on_caller]


def exact(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The product of bfloat16 operands in float64: what a float32-accumulating kernel approximates."""
    return F.linear(x.double(), weight.double())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize(("out", "k"), [(11, 8), (1152, 896), (5, 4864)])
def test_bfloat16_rows_times_the_weight(kernel, rows, out, k):
    g = torch.Generator().manual_seed(out + k)
    weight = torch.randn(out, k, generator=g).bfloat16()
    x = torch.randn(rows, k, generator=g).bfloat16()
    got = kernel(x, weight)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out) and got.is_contiguous()
    expected = exact(x, weight)
    # within a bfloat16 rounding of the result, as oneDNN's product is
    torch.testing.assert_close(got.double(), expected, rtol=2**-7, atol=1e-3 * k**0.5)
    torch.testing.assert_close(got.double(), F.linear(x, weight).double(), rtol=2**-7, atol=1e-3 * k**0.5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["float32", "column-major", "odd k", "odd offset"])
def test_other_operands_take_the_plain_product(kernel, case):
    g = torch.Generator().manual_seed(0)
    k = 7 if case == "odd k" else 8
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    weight = torch.randn(5, k, generator=g).to(dtype)
    weight = column_major(weight) if case == "column-major" else weight
    x = torch.randn(2, k, generator=g).to(dtype)
    if case == "odd offset":
        weight = torch.randn(5 * k + 1, generator=g).to(dtype)[1:].view(5, k)
        x = torch.randn(2 * k + 1, generator=g).to(dtype)[1:].view(2, k)
    assert torch.equal(kernel(x, weight), F.linear(x, weight))


@pytest.mark.parametrize("kernel", KERNELS)
def test_it_is_timed_for_few_bfloat16_rows_only(kernel):
    assert kernel in ways_for(torch.bfloat16) and kernel in ways_for(torch.bfloat16, packs=True)
    assert kernel in ways_for(torch.bfloat16, rows=GEMV_ROWS)
    assert all(kernel not in ways_for(torch.bfloat16, rows=n) for n in ROW_BUCKETS if n > GEMV_ROWS)
    assert all(kernel not in ways_for(dtype) for dtype in (torch.float32, torch.float16))


def test_a_kept_choice_of_it_is_recalled_and_multiplies():
    names = ["gemv_on_caller", "gemv", *["plain"] * (len(ROW_BUCKETS) - 2)]
    layout, ways = _recall({"layout": "row", "ways": names}, torch.bfloat16, packs=False)
    assert layout == "row" and ways[:2] == (gemv_on_caller, gemv) and all(way is plain for way in ways[2:])
    linear = Linear(64, 24, bias=True, dtype=torch.bfloat16)
    linear.ways = ways
    x = torch.randn(1, 1, 64).bfloat16()
    with torch.inference_mode():
        got = linear(x)
    assert got.shape == (1, 1, 24)
    torch.testing.assert_close(got.double(), exact(x, linear.weight) + linear.bias.double(), rtol=2**-6, atol=0.02)


def test_loading_a_bfloat16_model_compiles_the_kernels(monkeypatch, hf_models):
    import shoal.model.gemv as module
    from shoal.model import load_model

    warmed = []
    monkeypatch.setattr(module, "warm", lambda: warmed.append(True))
    _, path = hf_models("qwen2")
    load_model(path, device="cpu", dtype="float32")
    assert not warmed
    load_model(path, device="cpu", dtype="bfloat16")
    assert warmed


def test_a_bfloat16_model_decodes_with_it_as_with_the_plain_product(monkeypatch, hf_models, tmp_path):
    from shoal.model import load_model, tune
    from shoal.model.generate import generate

    _, path = hf_models("qwen2")
    tokens = {}
    for ways in ((gemv_on_caller, gemv, *[plain] * (len(ROW_BUCKETS) - 2)), ()):
        monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / str(len(ways))))
        monkeypatch.setattr(tune, "_choose", lambda *args, ways=ways: ("row", ways))
        model = load_model(path, device="cpu", dtype="bfloat16")
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        assert linears and all(m.ways == ways for m in linears)
        tokens[ways] = list(generate(model, [3, 14, 15, 92, 65], max_tokens=12))
    assert len(set(map(tuple, tokens.values()))) == 1
