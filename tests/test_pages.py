import mmap
from pathlib import Path

import pytest
import torch

from shoal.model import load_model
from shoal.model.matmul import Linear
from shoal.model.pages import HUGE, move_weights, on_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_kb(t: torch.Tensor) -> int:
    """AnonHugePages of the mapping that holds t's first byte, from /proc/self/smaps."""
    at, inside = t.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= at < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_copy_on_huge_pages_holds_the_same_values_aligned_to_a_page(dtype):
    t = torch.randn(3, HUGE // 4 + 5).to(dtype)
    moved = on_huge_pages(t)
    assert moved.data_ptr() != t.data_ptr() and moved.data_ptr() % HUGE == 0
    assert moved.dtype == dtype and moved.shape == t.shape and torch.equal(moved, t)
    moved[0, 0] = 7  # its own memory, writable
    assert t[0, 0] != 7
    if hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in THP.read_text():
        assert huge_kb(moved) >= 2048


def test_a_column_major_tensor_keeps_its_strides_and_small_tensors_or_views_stay_where_they_are():
    wide = torch.randn(HUGE // 8, 3)
    columns = wide.t().contiguous().t()
    moved = on_huge_pages(columns)
    assert moved.stride() == columns.stride() and torch.equal(moved, wide) and moved.data_ptr() % HUGE == 0
    small, view = torch.ones(100), wide[1:]
    assert on_huge_pages(small) is small and on_huge_pages(view) is view


def test_a_loaded_cpu_model_has_its_weights_moved_with_their_values(tiny_model_dir):
    path = tiny_model_dir("qwen2", vocab_size=16384)  # a head of 16384 x 64 float32: 4 MB
    model = load_model(path, device="cpu")
    before = model.embed_tokens.weight.clone()
    expected = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, Linear)])
    move_weights(model)  # again: every weight of a page or more is copied
    got = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, Linear)])
    assert torch.equal(got, expected) and torch.equal(model.embed_tokens.weight, before)
    assert model.lm_head.weight is model.embed_tokens.weight
    big = [m for m in model.modules() if isinstance(m, Linear) and m.weight.nbytes >= HUGE and not m.weight.is_mkldnn]
    assert model.lm_head in big and all(m.weight.data_ptr() % HUGE == 0 for m in big)
