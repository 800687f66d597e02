import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from shoal.engine.disk import MAGIC, DiskCache, Row

NS = "fp0123abcd-L0-4"
BIG = 1 << 40


def key_of(name: str) -> str:
    return hashlib.blake2b(name.encode(), digest_size=16).hexdigest()


def make_row(name: str, n: int = 8, dtype: torch.dtype = torch.float32, reason: str = "finish", seed: int = 0) -> Row:
    g = torch.Generator().manual_seed(seed)
    shape = (3, n, 2, 4)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    return Row(key=key_of(name), tokens=[(7 * i + seed) % 101 for i in range(n)], k=k, v=v, reason=reason)


def assert_same(a: Row, b: Row) -> None:
    assert a.key == b.key and a.tokens == b.tokens and a.reason == b.reason
    assert a.k.dtype == b.k.dtype and a.v.dtype == b.v.dtype
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".kv"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    cache = DiskCache(tmp_path, BIG, NS)
    row = make_row("a", dtype=dtype, reason="cold")
    assert not cache.has(row.key)
    assert cache.save(row) == "saved"
    assert cache.has(row.key)
    got = cache.load(row.key)
    assert got is not None
    assert_same(got, row)
    size = (tmp_path / NS / f"{row.key}.kv").stat().st_size
    assert cache.load(key_of("missing")) is None
    s = cache.stats()
    assert s["saves_cold"] == 1 and s["saves_finish"] == 0
    assert s["rows"] == 1 and s["bytes"] == size == s["save_bytes"] == s["load_bytes"]
    assert s["loads"] == 1 and s["misses"] == 1 and s["corrupt"] == 0
    assert s["save_seconds"] > 0 and s["load_seconds"] > 0
    assert leftovers(tmp_path / NS) == []


def test_restart_and_namespaces(tmp_path: Path) -> None:
    row = make_row("a", dtype=torch.bfloat16)
    other = DiskCache(tmp_path, BIG, NS)  # opened before the save: sees rows other instances publish
    assert DiskCache(tmp_path, BIG, NS).save(row) == "saved"
    again = DiskCache(tmp_path, BIG, NS)
    assert again.stats()["rows"] == 1 and again.has(row.key)
    got = again.load(row.key)
    assert got is not None
    assert_same(got, row)
    assert other.has(row.key) and other.load(row.key) is not None
    foreign = DiskCache(tmp_path, BIG, "other-model-L0-4")
    assert not foreign.has(row.key) and foreign.load(row.key) is None


def test_existing_row_is_not_rewritten(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, BIG, NS)
    row = make_row("a")
    assert cache.save(row) == "saved"
    path = tmp_path / NS / f"{row.key}.kv"
    before = path.stat()
    time.sleep(0.01)
    assert cache.save(make_row("a", seed=5)) == "exists"
    assert DiskCache(tmp_path, BIG, NS).save(row) == "exists"
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    got = cache.load(row.key)
    assert got is not None
    assert_same(got, row)
    assert cache.stats()["exists"] == 1 and cache.stats()["saves_finish"] == 1


def test_reservation_held_by_another_process(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, BIG, NS)
    row = make_row("a")
    reserve = tmp_path / NS / f"{row.key}.reserve"
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY)\n"
         "os.write(fd, str(os.getpid()).encode()); os.close(fd)\n"
         "print('ready', flush=True); time.sleep(60)\n",
         str(reserve)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert cache.save(row) == "conflict"
        assert DiskCache(tmp_path, BIG, NS).save(row) == "conflict"  # a live writer's reservation is kept
        assert reserve.exists() and not cache.has(row.key)
        assert cache.stats()["conflicts"] == 1
    finally:
        child.kill()
        child.wait()
    assert DiskCache(tmp_path, BIG, NS).save(row) == "saved"  # the dead writer's reservation is cleaned up
    assert leftovers(tmp_path / NS) == []


def test_reservation_of_a_reused_pid_is_stale(tmp_path: Path) -> None:
    d = tmp_path / NS
    DiskCache(tmp_path, BIG, NS)
    row = make_row("a")
    # written by an earlier process that had our pid (a restarted container), and one being filled right now
    (d / f"{row.key}.reserve").write_text(f"{os.getpid()} 1")
    (d / f"{row.key}.{os.getpid()}.1.tmp").write_bytes(b"partial")
    (d / f"{key_of('b')}.reserve").write_text("")
    cache = DiskCache(tmp_path, BIG, NS)
    assert leftovers(d) == [f"{key_of('b')}.reserve"]
    assert cache.save(row) == "saved"
    assert cache.save(make_row("b")) == "conflict"


def test_concurrent_threads_make_one_row(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, BIG, NS)
    rows = [make_row("a", seed=i) for i in range(8)]
    barrier = threading.Barrier(len(rows))
    results: list[str] = []

    def work(r: Row) -> None:
        barrier.wait()
        results.append(cache.save(r))

    threads = [threading.Thread(target=work, args=(r,)) for r in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("saved") == 1 and set(results) <= {"saved", "exists", "conflict"}
    assert [p.name for p in (tmp_path / NS).iterdir()] == [f"{rows[0].key}.kv"]
    got = cache.load(rows[0].key)
    assert got is not None and any(torch.equal(got.k, r.k) for r in rows)
    s = cache.stats()
    assert s["rows"] == 1 and s["conflicts"] + s["exists"] == len(rows) - 1


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-5])


def _flip_payload_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x40
    p.write_bytes(bytes(data))


def _garbage(p: Path) -> None:
    p.write_bytes(MAGIC + (10**9).to_bytes(8, "little") + b"{")


def _deep_header(p: Path) -> None:
    p.write_bytes(MAGIC + (100_000).to_bytes(8, "little") + b"[" * 100_000)


def _empty(p: Path) -> None:
    p.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _flip_payload_byte, _garbage, _deep_header, _empty])
def test_damaged_file_is_rejected(tmp_path: Path, damage) -> None:
    cache = DiskCache(tmp_path, BIG, NS)
    row = make_row("a")
    cache.save(row)
    path = tmp_path / NS / f"{row.key}.kv"
    damage(path)
    assert cache.load(row.key) is None
    assert cache.stats()["corrupt"] == 1 and cache.stats()["rows"] == 0 and cache.stats()["bytes"] == 0
    assert not path.exists() and (tmp_path / NS / f"{row.key}.corrupt").exists()
    assert not cache.has(row.key)
    assert cache.save(row) == "saved" and cache.load(row.key) is not None
    DiskCache(tmp_path, BIG, NS)
    assert not (tmp_path / NS / f"{row.key}.corrupt").exists()  # quarantine is cleared at the next start


def test_foreign_rows_are_rejected(tmp_path: Path) -> None:
    theirs = DiskCache(tmp_path, BIG, "another-model-L0-4")
    row = make_row("a")
    theirs.save(row)
    theirs.save(make_row("b"))
    ours_dir = tmp_path / NS
    cache = DiskCache(tmp_path, BIG, NS)
    # a row from another namespace copied in, and a row filed under another key
    (ours_dir / f"{row.key}.kv").write_bytes((tmp_path / "another-model-L0-4" / f"{row.key}.kv").read_bytes())
    (ours_dir / f"{key_of('c')}.kv").write_bytes((tmp_path / "another-model-L0-4" / f"{key_of('b')}.kv").read_bytes())
    assert cache.load(row.key) is None and cache.load(key_of("c")) is None
    assert cache.stats()["corrupt"] == 2 and cache.stats()["loads"] == 0


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DiskCache(tmp_path, BIG, "../escape")
    cache = DiskCache(tmp_path, BIG, NS)
    row = make_row("a")
    with pytest.raises(ValueError):
        cache.save(Row(key="../../x", tokens=row.tokens, k=row.k, v=row.v))
    with pytest.raises(ValueError):
        cache.save(Row(key=row.key, tokens=row.tokens, k=row.k, v=row.v, reason="bogus"))
    with pytest.raises(ValueError):
        cache.save(Row(key=row.key, tokens=row.tokens[:-1], k=row.k, v=row.v))
    with pytest.raises(ValueError):
        cache.save(Row(key=row.key, tokens=row.tokens, k=row.k, v=row.v.half()))
    assert leftovers(tmp_path / NS) == [] and not cache.has(row.key)
    cache.save(row)
    for bad in ("../" + row.key, row.key + "/x", "", "zz", None):
        assert not cache.has(bad) and cache.load(bad) is None  # type: ignore[arg-type]
    assert cache.stats()["misses"] == 5


KILLED_WRITER = """
import os, signal, sys, threading
import torch
from shoal.engine.disk import DiskCache, Row
cache = DiskCache(sys.argv[1], 1 << 40, sys.argv[2])
row = Row(key=sys.argv[3], tokens=list(range(4)), k=torch.ones(1, 4, 1, 2), v=torch.zeros(1, 4, 1, 2))
assert cache._reserve(cache._path(row.key, ".reserve"))
header, k, v = cache._encode(row)
cache._write_tmp(cache._path(row.key, f".{os.getpid()}.{threading.get_ident()}.tmp"), header, k, v)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill9_during_save(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, BIG, NS)
    key = key_of("a")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path), NS, key], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    names = leftovers(tmp_path / NS)
    assert f"{key}.reserve" in names and any(n.endswith(".tmp") for n in names)
    assert not cache.has(key) and cache.load(key) is None
    assert cache.save(make_row("a")) == "conflict"  # the stale reservation is only cleaned up at start
    fresh = DiskCache(tmp_path, BIG, NS)
    assert leftovers(tmp_path / NS) == [] and not fresh.has(key)
    assert fresh.save(make_row("a")) == "saved"
    got = fresh.load(key)
    assert got is not None
    assert_same(got, make_row("a"))


def test_eviction_is_lru_within_budget(tmp_path: Path) -> None:
    probe = DiskCache(tmp_path / "probe", BIG, NS)
    probe.save(make_row("x"))
    size = int(probe.stats()["bytes"])
    cache = DiskCache(tmp_path, int(3.5 * size), NS)
    for name in "abc":
        assert cache.save(make_row(name, reason="continued")) == "saved"
    assert cache.load(key_of("a")) is not None  # "a" becomes the most recently used
    cache.save(make_row("d"))
    assert [cache.has(key_of(n)) for n in "abcd"] == [True, False, True, True]
    cache.save(make_row("e"))
    assert [cache.has(key_of(n)) for n in "abcde"] == [True, False, False, True, True]
    s = cache.stats()
    assert s["evictions"] == 2 and s["rows"] == 3 and s["bytes"] == 3 * size <= cache.budget_bytes
    assert sorted(p.name for p in (tmp_path / NS).iterdir()) == sorted(f"{key_of(n)}.kv" for n in "ade")
    # load touches the file, and a restart orders rows by mtime: "a" is now more recent than "d" and "e"
    time.sleep(0.05)
    assert cache.load(key_of("a")) is not None
    restarted = DiskCache(tmp_path, int(3.5 * size), NS)
    assert restarted.stats()["bytes"] == 3 * size
    restarted.save(make_row("f"))
    assert [restarted.has(key_of(n)) for n in "adef"] == [True, False, True, True]
    smaller = DiskCache(tmp_path, int(1.5 * size), NS)  # a restart with a smaller budget trims to it, LRU first
    assert smaller.stats()["bytes"] == size and smaller.stats()["evictions"] == 2
    assert [smaller.has(key_of(n)) for n in "aef"] == [False, False, True]


def test_pinned_row_survives_eviction(tmp_path: Path) -> None:
    probe = DiskCache(tmp_path / "probe", BIG, NS)
    probe.save(make_row("x"))
    size = int(probe.stats()["bytes"])
    cache = DiskCache(tmp_path, int(2.5 * size), NS)
    hot = make_row("hot", dtype=torch.bfloat16)
    assert cache.save(hot) == "saved"
    pinned, stop = threading.Event(), threading.Event()
    loads: list[bool] = []

    def reader() -> None:
        with cache.pinned(hot.key):
            pinned.set()
            while not stop.is_set():
                got = cache.load(hot.key)
                loads.append(got is not None and torch.equal(got.k, hot.k))

    t = threading.Thread(target=reader)
    t.start()
    pinned.wait()
    try:
        for i in range(12):
            assert cache.save(make_row(f"cold{i}", seed=i)) == "saved"
            assert cache.stats()["bytes"] <= cache.budget_bytes
            time.sleep(0.002)
    finally:
        stop.set()
        t.join()
    assert loads and all(loads)
    assert cache.has(hot.key) and cache.stats()["evictions"] >= 10
    # unpinned and no longer used: it goes once newer rows need the room
    cache.save(make_row("late1"))
    cache.save(make_row("late2"))
    assert not cache.has(hot.key)
