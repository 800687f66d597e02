import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import njit

from shoal.model import fused
from shoal.model.rope import apply_rotary


@njit
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = fused.exp(x[i])


def test_exp_is_within_a_few_roundings_and_is_0_below_float32s_range_and_finite_above():
    x = np.linspace(-87, 87.9, 200_001, dtype=np.float32)
    out = np.empty_like(x)
    _exp_all(x, out)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - exact) / exact) < 5e-7
    ends = np.array([-np.inf, -1e30, -88, 89, 1e30, np.inf], dtype=np.float32)
    _exp_all(ends, out[:6])
    assert out[:3].tolist() == [0, 0, 0] and out[3:6].tolist() == [np.exp(np.float32(88))] * 3


def test_cpu_float32_and_bfloat16_tensors_take_the_kernels_split_among_threads_from_each_kernels_grain_on():
    assert fused.supports(torch.zeros(64, 896)) and fused.supports(torch.zeros(1, 896, dtype=torch.bfloat16))
    assert not fused.supports(torch.zeros(64, 896, dtype=torch.float16))
    assert fused._pick(fused._NORM, torch.zeros(512, 896)) is fused._norm
    # one sequence's decode, and the light loops of a 64-sequence one: on the calling thread, in one pass
    for kernel, x in ((fused._NORM, torch.zeros(1, 896)), (fused._NORM, torch.zeros(64, 896)),
                      (fused._ROTATE, torch.zeros(64, 16, 64))):
        on_caller = fused._pick(kernel, x)
        assert on_caller is kernel.caller and not on_caller.targetoptions.get("parallel")
    # SiLU's exp makes each element dearer: its threads pay off at fewer rows
    assert fused._pick(fused._SILU_MUL, torch.zeros(64, 4864)) is fused._silu_mul


@njit
def _round_all(x, out):
    for i in range(x.shape[0]):
        out[i] = fused.narrow(out, x[i])


def test_narrow_rounds_to_the_nearest_bfloat16_ties_to_even_as_torch_does():
    x = torch.cat([torch.randn(100_000) * 1e3, torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3e38, 0.0])])
    out = torch.empty(len(x), dtype=torch.bfloat16)
    _round_all(x.numpy(), fused.array(out))
    assert torch.equal(out, x.bfloat16())


# each chain rounds to bfloat16 once, where torch rounds after every op: within a rounding or two of float32 math
BF16 = dict(atol=1e-2, rtol=8e-3)


@pytest.mark.parametrize("rows", [1, 64])
def test_bfloat16_chains_are_float32_math_rounded_once(rows):
    x, residual, weight = (torch.randn(*shape).bfloat16() for shape in ((rows, 896), (rows, 896), (896,)))
    total = (residual.float() + x.float()).bfloat16()
    normed, stream = fused.add_rms_norm(x, residual, weight, 1e-6)
    assert stream is residual and torch.equal(residual, total) and normed.dtype == torch.bfloat16
    torch.testing.assert_close(normed.float(), F.rms_norm(total.float(), (896,), weight.float(), 1e-6), **BF16)
    gate, up = (torch.randn(rows, 4864) * 40).bfloat16(), torch.randn(rows, 4864).bfloat16()
    expected = F.silu(gate.float()) * up.float()
    torch.testing.assert_close(fused.silu_mul(torch.cat([gate, up], dim=1)).float(), expected, **BF16)
    q, cos, sin = (torch.randn(*shape).bfloat16() for shape in ((rows, 16, 64), (rows, 1, 64), (rows, 1, 64)))
    expected = apply_rotary(q.float(), cos.float(), sin.float())
    torch.testing.assert_close(fused.rotate(q, cos, sin).float(), expected, **BF16)


@pytest.mark.parametrize("rows", [1, 40, 512])
def test_add_rms_norm_adds_into_the_residual_and_norms_the_sum(rows):
    x, residual, weight = torch.randn(rows, 896), torch.randn(rows, 896), torch.randn(896)
    total = residual + x
    normed, stream = fused.add_rms_norm(x, residual, weight, 1e-6)
    assert stream is residual and torch.equal(residual, total)
    torch.testing.assert_close(normed, F.rms_norm(total, (896,), weight, 1e-6), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(fused.rms_norm(x, weight, 1e-6), F.rms_norm(x, (896,), weight, 1e-6),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 64])
def test_silu_mul_takes_gate_then_up_and_returns_a_contiguous_half(rows):
    gate, up = torch.randn(rows, 4864) * 40, torch.randn(rows, 4864)  # past exp's range both ways
    gate_up = torch.cat([gate, up], dim=1)
    expected = F.silu(gate) * up
    out = fused.silu_mul(gate_up)
    assert out.shape == (rows, 4864) and out.is_contiguous() and torch.equal(gate_up, torch.cat([gate, up], dim=1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_the_copy_for_the_calling_thread_keeps_the_kernels_error_model():
    # Python's model checks each divisor, and that branch kept silu_mul's thread-less loop from vectorizing
    kernel = fused._SILU_MUL
    assert kernel.threaded.targetoptions["error_model"] == kernel.caller.targetoptions["error_model"] == "numpy"
    assert fused._NORM.caller.targetoptions.get("error_model", "python") == "python"


@pytest.mark.parametrize("rows", [1, 64])
def test_rotate_turns_a_strided_view_in_place_as_apply_rotary_does(rows):
    qkv = torch.randn(rows, 18 * 64)
    q = qkv[:, :16 * 64].view(rows, 16, 64)  # q and k heads of a fused projection: rows are strided
    cos, sin = torch.randn(rows, 1, 64), torch.randn(rows, 1, 64)
    expected, rest = apply_rotary(q, cos, sin), qkv[:, 16 * 64:].clone()
    fused.rotate(q, cos, sin)
    torch.testing.assert_close(q, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(qkv[:, 16 * 64:], rest)


def test_rotate_names_heads_that_are_not_side_by_side():
    cos = sin = torch.ones(3, 1, 64)
    with pytest.raises(ValueError, match="side-by-side heads"):
        fused.rotate(torch.randn(3, 64, 4).transpose(1, 2), cos, sin)
    assert fused.rotate(torch.empty(0, 4, 64), cos[:0], sin[:0]).shape == (0, 4, 64)
