"""OpenMP's worker pools: a thread that hands work to the engine gives its own up (model/openmp.py)."""

import os
import threading
import time

import torch
from engine_helpers import run

from shoal.engine import Engine, SamplingParams
from shoal.model import DEMO_PATH, openmp


def threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def ended(tids: set[str], timeout: float = 5.0) -> bool:
    """Whether these threads end within the timeout (a released worker ends a moment after the call)."""
    deadline = time.monotonic() + timeout
    while tids & threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not tids & threads()


def test_release_ends_the_calling_threads_openmp_workers():
    assert os.environ["GOMP_SPINCOUNT"] == "100000"  # set by shoal before torch loads
    assert openmp._runtime() is not None  # torch's libgomp, already loaded: never a second one
    seen, before = {}, torch.get_num_threads()
    torch.set_num_threads(2)

    def work() -> None:
        alone = threads()
        torch.ones(2**22).sum()  # a parallel op: this thread's pool gets a worker
        seen["workers"] = threads() - alone
        openmp.release()
        seen["ended"] = ended(seen["workers"])
        openmp.release()  # a thread with no pool: nothing to end

    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(before)
    assert seen["workers"] and seen["ended"]


def test_a_thread_that_queues_a_request_releases_its_workers(monkeypatch):
    engine = Engine.from_dir(DEMO_PATH)
    calls = []
    monkeypatch.setattr(openmp, "release", lambda: calls.append(threading.current_thread()))
    try:
        async def ask() -> None:
            await engine.submit([5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True)).result()

        run(ask())
    finally:
        engine.close()
    assert calls == [threading.current_thread()]


def test_the_engines_thread_runs_numba_on_the_processs_threads():
    import numba

    from shoal.model.matmul import set_threads

    before = torch.get_num_threads()
    set_threads(1)  # a new thread's numba count would be every core
    engine = Engine.from_dir(DEMO_PATH)
    try:
        seen = threading.Event()
        counts = []
        engine._commands.put(lambda: counts.append(numba.get_num_threads()) or seen.set())
        assert seen.wait(10)
    finally:
        engine.close()
        set_threads(before)
    assert counts == [1]
