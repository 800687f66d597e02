"""Disk tier of the prefix KV cache: one crash-safe, checksummed file per row.

A row is the KV of a token prefix (all layers this worker holds). Rows live in ``root/namespace/<key>.kv``;
only complete, fsynced files ever get that name. A save reserves ``<key>.reserve`` (O_EXCL, holds the
writer's pid), writes ``<key>.<pid>.<tid>.tmp``, fsyncs it, hard-links it to the final name, fsyncs the
directory, then drops the temp file and the reservation. A new cache removes what dead writers left behind.
File: ``SHOALKV1``, u64le header length, JSON header (padded so the payload is 64-byte aligned), k bytes, v bytes.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SAVE_REASONS = ("cold", "continued", "finish", "evict", "shutdown")
MAGIC = b"SHOALKV1"
_ALIGN = 64
_STALE_EMPTY_RESERVE_S = 60.0
_KEY_RE = re.compile(r"[0-9a-fA-F]{1,128}")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,199}")
_FLOATS = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in _FLOATS if hasattr(torch, name)}
_COUNTERS = ("loads", "load_bytes", "load_seconds", "misses", "corrupt", "conflicts", "exists", "evictions",
             "save_bytes", "save_seconds", "save_errors", *(f"saves_{r}" for r in SAVE_REASONS))


@dataclass
class Row:
    key: str
    tokens: list[int]
    k: torch.Tensor
    v: torch.Tensor
    reason: str = "finish"


class CorruptRow(Exception):
    pass


def _valid_key(key: object) -> bool:
    return isinstance(key, str) and _KEY_RE.fullmatch(key) is not None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_start(pid: int) -> str | None:
    """The process's start time (Linux, clock ticks since boot): tells the writer from a process that reused its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _writer_alive(reservation: str, mtime: float) -> bool:
    parts = reservation.split()  # "<pid> [<start time>]"
    if not parts or not parts[0].isdigit():  # a writer between creating and filling it, or one that died there
        return time.time() - mtime < _STALE_EMPTY_RESERVE_S
    pid = int(parts[0])
    return _pid_alive(pid) and (len(parts) < 2 or _proc_start(pid) in (None, parts[1]))


def _flat_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskCache:
    def __init__(self, root: str | Path, budget_bytes: int, namespace: str):
        if not _NAMESPACE_RE.fullmatch(namespace):
            raise ValueError(f"bad cache namespace {namespace!r}")
        self.namespace = namespace
        self.budget_bytes = budget_bytes
        self.dir = Path(root) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, least recently used first
        self._pins: dict[str, int] = {}
        self._bytes = 0
        self._stats: dict[str, int | float] = dict.fromkeys(_COUNTERS, 0)
        self._recover()

    def _recover(self) -> None:
        """Index published rows (oldest mtime first); remove what dead writers and old quarantines left behind."""
        rows: list[tuple[float, str, int]] = []
        for entry in sorted(os.scandir(self.dir), key=lambda e: e.name.endswith(".tmp")):  # reservations first
            name, path = entry.name, Path(entry.path)
            with contextlib.suppress(OSError):
                if name.endswith(".kv") and _KEY_RE.fullmatch(name[:-3]):
                    st = entry.stat()
                    rows.append((st.st_mtime, name[:-3], st.st_size))
                elif name.endswith(".reserve") and not _writer_alive(path.read_text(), entry.stat().st_mtime):
                    path.unlink()
                elif name.endswith(".tmp"):  # a live writer holds its key's reservation until its temp is gone
                    parts = name.split(".")
                    if (len(parts) != 4 or not parts[1].isdigit() or not _pid_alive(int(parts[1]))
                            or not (self.dir / f"{parts[0]}.reserve").exists()):
                        path.unlink()
                elif name.endswith(".corrupt"):
                    path.unlink()  # quarantined files are kept for inspection until the next start
        with self._lock:
            for _, key, size in sorted(rows):
                self._index[key] = size
                self._bytes += size
            self._evict(protect="")  # the budget may have shrunk since the last run

    def has(self, key: str) -> bool:
        """Whether a published row exists; a malformed key (it may come from a client) is simply absent."""
        return _valid_key(key) and self._lookup(key)

    def save(self, row: Row) -> str:
        """Publish a row: "saved", "exists" (never rewritten) or "conflict" (another writer holds the key).

        Raises ValueError for a malformed row and OSError (after cleaning up, counted in save_errors) for I/O errors.
        """
        t0 = time.perf_counter()
        header, k_bytes, v_bytes = self._encode(row)
        final, reserve = self._path(row.key, ".kv"), self._path(row.key, ".reserve")
        if final.exists():
            return self._count("exists")
        if not self._reserve(reserve):
            self._count("conflicts")
            return "conflict"
        tmp = self._path(row.key, f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            if final.exists():
                return self._count("exists")
            self._write_tmp(tmp, header, k_bytes, v_bytes)
            size = tmp.stat().st_size
            try:
                os.link(tmp, final)
            except FileExistsError:
                return self._count("exists")
            except OSError as e:  # filesystem without hard links: the reservation makes replace safe
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                os.replace(tmp, final)
            _fsync_dir(self.dir)
        except OSError:
            self._count("save_errors")
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            with contextlib.suppress(FileNotFoundError):
                reserve.unlink()
        with self._lock:
            self._bytes += size - self._index.pop(row.key, 0)
            self._index[row.key] = size
            self._stats[f"saves_{row.reason}"] += 1
            self._stats["save_bytes"] += size
            self._stats["save_seconds"] += time.perf_counter() - t0
            self._evict(protect=row.key)
        return "saved"

    def load(self, key: str) -> Row | None:
        """The row, or None if absent or bad (a bad file is counted in `corrupt` and quarantined)."""
        t0 = time.perf_counter()
        if not _valid_key(key):
            self._count("misses")
            return None
        path = self._path(key, ".kv")
        with self.pinned(key):
            if not self._lookup(key):
                self._count("misses")
                return None
            try:
                with open(path, "rb", buffering=0) as f:
                    buf = bytearray(os.fstat(f.fileno()).st_size)
                    view, got = memoryview(buf), 0
                    while got < len(buf) and (n := f.readinto(view[got:])):
                        got += n
                row = self._decode(key, buf, got)
            except FileNotFoundError:
                self._drop(key)
                self._count("misses")
                return None
            except (OSError, CorruptRow):
                self._drop(key)
                self._count("corrupt")
                with contextlib.suppress(OSError):
                    os.replace(path, self._path(key, ".corrupt"))
                return None
            with contextlib.suppress(OSError):
                os.utime(path)
            with self._lock:
                if key in self._index:
                    self._index.move_to_end(key)
                self._stats["loads"] += 1
                self._stats["load_bytes"] += len(buf)
                self._stats["load_seconds"] += time.perf_counter() - t0
            return row

    @contextlib.contextmanager
    def pinned(self, key: str) -> Iterator[None]:
        """Keep `key` from being evicted (by this process) while the block runs."""
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            return {**self._stats, "bytes": self._bytes, "rows": len(self._index)}

    def _path(self, key: str, suffix: str) -> Path:
        if not _valid_key(key):
            raise ValueError(f"bad cache key {key!r}")
        return self.dir / f"{key}{suffix}"

    def _count(self, name: str) -> str:
        with self._lock:
            self._stats[name] += 1
        return name

    def _lookup(self, key: str) -> bool:
        """True if the row is published; rows published by other processes are indexed on first sight."""
        path = self._path(key, ".kv")
        with self._lock:
            if key in self._index:
                return True
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        with self._lock:
            if key not in self._index:
                self._index[key] = size
                self._bytes += size
        return True

    def _drop(self, key: str) -> None:
        with self._lock:
            self._bytes -= self._index.pop(key, 0)

    def _evict(self, protect: str) -> None:  # caller holds the lock
        for key in list(self._index):
            if self._bytes <= self.budget_bytes:
                break
            if key == protect or self._pins.get(key):
                continue
            with contextlib.suppress(FileNotFoundError):
                self._path(key, ".kv").unlink()
            self._bytes -= self._index.pop(key)
            self._stats["evictions"] += 1

    def _reserve(self, reserve: Path) -> bool:
        try:
            fd = os.open(reserve, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, f"{os.getpid()} {_proc_start(os.getpid()) or ''}".strip().encode())
        except OSError:
            reserve.unlink()
            raise
        finally:
            os.close(fd)
        return True

    def _encode(self, row: Row) -> tuple[bytes, memoryview, memoryview]:
        k, v = row.k, row.v
        dtype = str(k.dtype).removeprefix("torch.")
        if row.reason not in SAVE_REASONS:
            raise ValueError(f"bad save reason {row.reason!r}")
        if dtype not in _DTYPES or v.dtype != k.dtype or k.shape != v.shape or k.dim() != 4:
            raise ValueError(f"k/v must be 4-d, same float dtype and shape: {k.shape} {k.dtype}, {v.shape} {v.dtype}")
        if k.shape[1] != len(row.tokens) or min(k.shape) < 1:
            raise ValueError(f"k/v shape {tuple(k.shape)} does not match {len(row.tokens)} tokens")
        k_bytes, v_bytes = _flat_bytes(k), _flat_bytes(v)
        h = hashlib.blake2b(digest_size=16)
        h.update(k_bytes)
        h.update(v_bytes)
        meta = {"key": row.key, "namespace": self.namespace, "dtype": dtype, "shape": list(k.shape),
                "tokens": [int(t) for t in row.tokens], "reason": row.reason, "checksum": h.hexdigest()}
        header = json.dumps(meta, separators=(",", ":")).encode()
        header += b" " * (-(len(MAGIC) + 8 + len(header)) % _ALIGN)
        return MAGIC + len(header).to_bytes(8, "little") + header, k_bytes, v_bytes

    def _write_tmp(self, tmp: Path, header: bytes, k_bytes: memoryview, v_bytes: memoryview) -> None:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(k_bytes)
            f.write(v_bytes)
            f.flush()
            os.fsync(f.fileno())

    def _decode(self, key: str, buf: bytearray, size: int) -> Row:
        start = len(MAGIC) + 8
        if size != len(buf) or size < start or buf[: len(MAGIC)] != MAGIC:
            raise CorruptRow("short file or bad magic")
        off = start + int.from_bytes(buf[len(MAGIC) : start], "little")
        try:
            meta = json.loads(bytes(buf[start:off])) if off <= size else None
        except (ValueError, RecursionError) as e:  # ValueError covers UnicodeDecodeError
            raise CorruptRow(f"bad header: {e}") from e
        if not isinstance(meta, dict) or meta.get("key") != key or meta.get("namespace") != self.namespace:
            raise CorruptRow("header missing, or for another key or namespace")
        shape, tokens, dtype = meta.get("shape"), meta.get("tokens"), _DTYPES.get(str(meta.get("dtype")))
        if (dtype is None or meta.get("reason") not in SAVE_REASONS or not isinstance(shape, list) or len(shape) != 4
                or not all(type(d) is int and d > 0 for d in shape)
                or not isinstance(tokens, list) or len(tokens) != shape[1] or not all(type(t) is int for t in tokens)):
            raise CorruptRow("bad header fields")
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        nbytes = numel * dtype.itemsize
        if size - off != 2 * nbytes:
            raise CorruptRow(f"payload is {size - off} bytes, expected {2 * nbytes}")
        if hashlib.blake2b(memoryview(buf)[off:], digest_size=16).hexdigest() != meta.get("checksum"):
            raise CorruptRow("checksum mismatch")
        k = torch.frombuffer(buf, dtype=dtype, count=numel, offset=off).view(shape)
        v = torch.frombuffer(buf, dtype=dtype, count=numel, offset=off + nbytes).view(shape)
        return Row(key=key, tokens=tokens, k=k, v=v, reason=meta["reason"])
