"""`tune`'s choices kept on disk, per machine: a model loads again without timing its products (they took 20-25 s
of a 0.5B model's 25-35 s load on 2 cores), and every process on a machine (a stage and its replica, a restart)
multiplies alike rather than by its own noisy timing. Delete the file to time again."""

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy
import platformdirs
import torch
from filelock import FileLock

log = logging.getLogger("shoal.model")
LOCK_WAIT_S = 600  # past this, a process tunes beside the one holding the lock (a big model, a stuck lock)


def path() -> Path:
    """The file: in SHOAL_CACHE_DIR if set, else in the user's cache directory (~/.cache/shoal on Linux)."""
    return Path(os.environ.get("SHOAL_CACHE_DIR") or platformdirs.user_cache_dir("shoal")) / "tunings.json"


def cpuinfo() -> str:
    """The kernel's description of the CPU (empty where there is none, off Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def machine() -> str:
    """What a choice depends on besides the weight's shape: the CPU, the libraries that multiply, the threads."""
    info = cpuinfo()
    name = re.search(r"^model name\s*:\s*(.*)$", info, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.MULTILINE)
    digest = hashlib.sha256((flags.group(1) if flags else "").encode()).hexdigest()[:12]
    return (f"{name.group(1).strip() if name else 'unknown CPU'} (flags {digest}); torch {torch.__version__}; "
            f"numpy {numpy.__version__}; {torch.get_num_threads()} threads")


@contextmanager
def remembered() -> Iterator[dict[str, dict]]:
    """This machine's choices, by shape key, for the caller to read and add to; saved when it is done. The file is
    locked meanwhile, so one process tunes at a time: two timing at once on the same cores time each other. A file
    that cannot be read or written costs the timing only: the choices are made again, and a warning says why."""
    file = path()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{file}.lock")
        lock.acquire(timeout=LOCK_WAIT_S)  # its Timeout is an OSError
    except OSError as e:
        log.warning("tunings not kept: %s", e, extra={"path": str(file)})
        yield {}
        return
    try:
        everything, key = _read(file), machine()
        mine = dict(everything.get(key, {}))
        yield mine
        if mine != everything.get(key):
            _write(file, {**everything, key: mine})
    finally:
        lock.release()


def _read(file: Path) -> dict[str, dict]:
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError("not an object of machines, each an object of choices")
        return data
    except (OSError, ValueError) as e:
        log.warning("tunings file unreadable, timing again: %s", e, extra={"path": str(file)})
        return {}


def _write(file: Path, data: dict) -> None:
    partial = file.with_name(f"{file.name}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps(data, indent=1, sort_keys=True))
        partial.replace(file)  # atomic: a reader sees the old file or the new, never half of one
    except OSError as e:
        log.warning("tunings not kept: %s", e, extra={"path": str(file)})
        partial.unlink(missing_ok=True)
