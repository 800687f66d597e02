import json
import logging
import threading

import pytest
import torch
from filelock import FileLock

import shoal.model.matmul as matmul
from shoal.model import load_model, tiles, tune, tunings
from shoal.model.matmul import ROW_BUCKETS, Linear, flipped, packable, packed_product, plain
from shoal.model.simd import PANEL


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path))
    return tmp_path / "tunings.json"


def choosing(monkeypatch, choice=("row", ())) -> list:
    """Make `_choose` return `choice` without timing; returns the list of its calls."""
    calls = []

    def choose(*args):
        calls.append(args)
        return choice

    monkeypatch.setattr(tune, "_choose", choose)
    return calls


def test_a_second_load_takes_the_kept_choices_without_timing(monkeypatch, hf_models, cache):
    _, path = hf_models("qwen2")
    ways = (flipped, *(packed_product if packable(torch.float32) else plain,) * (len(ROW_BUCKETS) - 1))
    first = choosing(monkeypatch, ("column", ways))
    load_model(path, device="cpu")
    assert first and cache.is_file()
    kept = json.loads(cache.read_text())[tunings.machine()]
    assert len(kept) == len(first)
    assert all(c == {"layout": "column", "ways": [way.__name__ for way in ways]} for c in kept.values())
    again = choosing(monkeypatch)
    model = load_model(path, device="cpu")
    assert again == []
    for m in (m for m in model.modules() if isinstance(m, Linear)):
        assert m.ways == ways and (m.packed is not None) == (packed_product in ways)
        assert m.weight is model.embed_tokens.weight or m.weight.stride() == (1, m.weight.shape[0])  # column-major


def test_a_corrupt_file_is_timed_again_and_replaced(monkeypatch, hf_models, cache, caplog):
    _, path = hf_models("qwen2")
    cache.write_text("{not json")
    calls = choosing(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="shoal.model"):
        load_model(path, device="cpu")
    assert calls and "tunings file unreadable" in caplog.text
    assert len(json.loads(cache.read_text())[tunings.machine()]) == len(calls)


def test_a_kept_choice_that_is_no_valid_choice_is_made_again_alone(monkeypatch, hf_models, cache, caplog):
    _, path = hf_models("qwen2")
    choosing(monkeypatch)
    load_model(path, device="cpu")
    everything = json.loads(cache.read_text())
    key = sorted(everything[tunings.machine()])[0]
    everything[tunings.machine()][key]["ways"] = ["by hand"] * len(ROW_BUCKETS)
    cache.write_text(json.dumps(everything))
    calls = choosing(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="shoal.model"):
        load_model(path, device="cpu")
    assert len(calls) == 1 and "not a valid choice" in caplog.text
    assert json.loads(cache.read_text())[tunings.machine()][key]["ways"] == []


def test_choices_are_kept_per_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tunings.machine()
        torch.set_num_threads(2)
        assert tunings.machine() != one and "2 threads" in tunings.machine()
    finally:
        torch.set_num_threads(threads)


def test_a_cache_directory_that_cannot_be_made_costs_only_the_keeping(monkeypatch, hf_models, tmp_path, caplog):
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "a file" / "cache"))
    _, path = hf_models("qwen2")
    with caplog.at_level(logging.WARNING, logger="shoal.model"):
        model = load_model(path, device="cpu")
    assert "tunings not kept" in caplog.text
    assert torch.isfinite(model.lm_head.weight).all()


def test_one_process_tunes_at_a_time(cache):
    entered = threading.Event()

    def tune() -> None:
        with tunings.remembered() as known:
            known["shape"] = {"layout": "row", "ways": []}
            entered.set()

    cache.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{cache}.lock")
    with lock:
        waiting = threading.Thread(target=tune)
        waiting.start()
        assert not entered.wait(0.5)
    waiting.join(10)
    assert entered.is_set() and "shape" in json.loads(cache.read_text())[tunings.machine()]


def test_a_lock_held_too_long_costs_only_the_keeping(monkeypatch, cache, caplog):
    monkeypatch.setattr(tunings, "LOCK_WAIT_S", 0.2)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{cache}.lock"), caplog.at_level(logging.WARNING, logger="shoal.model"), \
            tunings.remembered() as known:
        assert known == {}
        known["shape"] = {"layout": "row", "ways": []}
    assert "tunings not kept" in caplog.text and not cache.exists()


def test_the_lm_head_is_timed_up_to_64_rows_the_other_weights_up_to_a_prefill_tick(monkeypatch, hf_models, cache):
    _, path = hf_models("qwen2")
    calls = choosing(monkeypatch)
    model = load_model(path, device="cpu")
    head = tuple(model.lm_head.weight.shape)
    tops = {(rows, inp): top for rows, inp, _, _, _, top, *_ in calls}
    assert tops[head] == 64 and {top for shape, top in tops.items() if shape != head} == {ROW_BUCKETS[-1]}
    assert any("at 64 rows or fewer" in key for key in json.loads(cache.read_text())[tunings.machine()])


@pytest.mark.parametrize("larger", [True, False])
def test_a_model_larger_than_the_last_level_cache_is_timed_from_memory(monkeypatch, hf_models, cache, larger):
    _, path = hf_models("qwen2")
    evictions = []
    monkeypatch.setattr(tune, "last_level_cache", lambda: 1 if larger else 2**40)
    monkeypatch.setattr(tune.Evict, "__call__", lambda self: evictions.append(self))
    load_model(path, device="cpu")
    keys = json.loads(cache.read_text())[tunings.machine()]
    assert bool(evictions) == larger and len({id(e) for e in evictions}) == larger  # one buffer for the whole load
    assert all(key.endswith(", from memory") == larger for key in keys)


def test_a_choice_is_kept_under_the_ways_it_was_made_among(monkeypatch, hf_models, cache):
    _, path = hf_models("qwen2")
    calls = choosing(monkeypatch)
    model = load_model(path, device="cpu")
    timed = len(calls)
    keys = json.loads(cache.read_text())[tunings.machine()]
    assert timed and len(keys) == timed
    for rows, inp, *_, panels in calls:  # the tiled product is offered for weights of whole panels
        offered = "/".join(way.__name__ for way in matmul.ways_for(model.dtype, packable(model.dtype), panels=panels))
        offered += f" ({tiles.VARIANT})" * panels  # a choice among tiles of another kind is made again
        assert panels == (rows % PANEL == 0)
        assert sum(key.startswith(f"{rows}x{inp} ") and f" by {offered}, " in key for key in keys) == 1
    load_model(path, device="cpu")
    assert len(calls) == timed  # the same ways: the kept choices are taken
    monkeypatch.setattr(tune, "ways_for", lambda dtype, packs=False, rows=1, panels=False: (plain, flipped))
    load_model(path, device="cpu")
    assert len(calls) == 2 * timed  # chosen among other ways: timed again


def test_eviction_reads_twice_the_last_level_cache_at_most_a_gib(monkeypatch):
    for cache_bytes, read in ((3 * 2**20, 6 * 2**20), (2**30, 2**30)):
        monkeypatch.setattr(tune, "last_level_cache", lambda cache_bytes=cache_bytes: cache_bytes)
        evict = tune.Evict()
        evict()
        assert evict.buffer.nbytes == read


def test_the_last_level_cache_is_the_largest_linux_reports(monkeypatch, tmp_path):
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "491520K"), ("index4", "junk")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(f"{size}\n")
    monkeypatch.setattr(tune, "CPU_CACHES", tmp_path)
    tune.last_level_cache.cache_clear()
    try:
        assert tune.last_level_cache() == 491520 * 2**10
        monkeypatch.setattr(tune, "CPU_CACHES", tmp_path / "none")
        tune.last_level_cache.cache_clear()
        assert tune.last_level_cache() == 32 * 2**20
    finally:
        tune.last_level_cache.cache_clear()
