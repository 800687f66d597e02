"""The sixteen-lane vector loops (model/simd.py) against numpy, on float32 and on bfloat16 bits."""

import numpy as np
import pytest
import torch
from numba import njit

from shoal.model import simd
from shoal.model.fused import array
from shoal.model.simd import HEADS, PANEL, accumulate16, largest16, prefetch, scores16

DIM, STRIDE, AT = 32, 72, 8  # a head of 32 elements in rows 72 apart, from an offset


def _scores():
    """scores16 compiled now, with the token group simd.GROUP holds now (a kernel compiles once)."""
    @njit
    def scores(k, q, dim, out):
        prefetch(k, AT, 16 * STRIDE)
        scores16(k, AT, STRIDE, q, 4, dim, out, 3)
    return scores


@njit
def _accumulate(v, p, heads, count, out):
    accumulate16(v, AT, STRIDE, p, 2, 20, heads, count, DIM, out, 5)


def rows(dtype: torch.dtype, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Flat memory as the kernels read it (float32, or bfloat16 bits), and the 16 rows of dim it holds as float64."""
    flat = torch.randn(AT + 16 * STRIDE, generator=torch.Generator().manual_seed(0)).to(dtype)
    wanted = flat.double()[AT:].view(16, STRIDE)[:, :dim].numpy()
    return array(flat), wanted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 48])
@pytest.mark.parametrize("group", [8, 16])  # AVX2's and AVX-512's, whatever this CPU has
def test_scores16_takes_sixteen_rows_dot_products_at_once(monkeypatch, dtype, dim, group):
    monkeypatch.setattr(simd, "GROUP", group)
    k, wanted = rows(dtype, dim)
    q = np.random.default_rng(1).standard_normal(4 + dim).astype(np.float32)
    out = np.full(3 + 16 + 2, 7.0, np.float32)
    _scores()(k, q, dim, out)
    np.testing.assert_allclose(out[3:19], wanted @ q[4:].astype(np.float64), rtol=1e-5, atol=1e-5)
    assert (out[:3] == 7).all() and (out[19:] == 7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [1, 5, 16])
@pytest.mark.parametrize("heads", [1, 3, HEADS])
def test_accumulate16_adds_each_heads_weighted_sum_of_rows(dtype, count, heads):
    v, wanted = rows(dtype)
    p = np.random.default_rng(2).random(2 + 20 * HEADS).astype(np.float32)  # a head's weights 20 apart
    out = np.random.default_rng(3).standard_normal(5 + HEADS * DIM + 3).astype(np.float32)
    before = out.copy()
    _accumulate(v, p, heads, count, out)
    for h in range(heads):
        row = slice(5 + h * DIM, 5 + (h + 1) * DIM)
        want = before[row] + p[2 + 20 * h:2 + 20 * h + count] @ wanted[:count]
        np.testing.assert_allclose(out[row], want, rtol=1e-5, atol=1e-5)
    untouched = np.r_[0:5, 5 + heads * DIM:len(out)]
    assert (out[untouched] == before[untouched]).all()


def test_largest16_is_the_maximum_of_its_range_only():
    values = np.random.default_rng(4).standard_normal(64).astype(np.float32)
    values[0], values[40] = 99.0, -np.inf
    assert njit(lambda a: largest16(a, 16, 32))(values) == values[16:48].max()


@pytest.mark.parametrize("group", [8, 16])  # AVX2's and AVX-512's, whatever this CPU has
@pytest.mark.parametrize("count", [1, 2, 4, 6])
@pytest.mark.parametrize("depth", [1, 7, 33])
@pytest.mark.parametrize("ahead", [0, 5])  # fetching ahead, past the panel's end too, changes nothing
@pytest.mark.parametrize("add", [False, True])
def test_tile_multiplies_a_few_rows_by_a_panel(monkeypatch, group, count, depth, ahead, add):
    monkeypatch.setattr(simd, "GROUP", group)
    kernel = simd.tile(count, ahead)  # built now, with this group

    @njit
    def multiply(a, panel, out):
        kernel(a, 3, depth + 2, panel, PANEL, depth, out, 1, PANEL + 5, add)

    g = np.random.default_rng(count)
    a = g.standard_normal(3 + count * (depth + 2)).astype(np.float32)  # rows `depth + 2` apart, from 3 on
    panel = g.standard_normal((depth + 1) * PANEL).astype(np.float32)  # the panel from PANEL on
    out = np.full(1 + count * (PANEL + 5), 7.0, np.float32)
    multiply(a, panel, out)
    rows = np.stack([a[3 + r * (depth + 2):3 + r * (depth + 2) + depth] for r in range(count)]).astype(np.float64)
    wanted = rows @ panel[PANEL:].reshape(depth, PANEL)
    got = out[1:].reshape(count, PANEL + 5)
    np.testing.assert_allclose(got[:, :PANEL], 7 * add + wanted, rtol=1e-5, atol=1e-5)
    assert out[0] == 7 and (got[:, PANEL:] == 7).all()
